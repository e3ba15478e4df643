"""Keypoint heatmaps to keypoint candidates: 3x3 non-maximum suppression and sub-cell refinement (docs/method.md §9.1).

Runs in torch on the maps' device; only the (N,) candidate arrays leave it. Coordinates are map coordinates:
cell (row i, col j) is the point (x=j, y=i); `simplepose.decode` maps them to image pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from simplepose.decode.config import DecoderConfig
from simplepose.skeleton import NUM_KEYPOINTS

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peaks:
    """Candidates in map coordinates, sorted by image, type, then raster order (id = row index).

    xy: float64 (N, 2) x, y in map cells; scores: float64 (N,); types: int64 (N,) reference keypoint index;
    images: int64 (N,) index of the candidate's image in the batch. Tensors on the maps' device.
    """

    xy: torch.Tensor
    scores: torch.Tensor
    types: torch.Tensor
    images: torch.Tensor


def _cells_above(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """int64 (K,) ascending flat indices of the cells of maps (K, h, w) that are >= threshold.

    The one dense pass of the default decoder. On CPU it runs in numpy: torch's CPU compare + nonzero is about
    7x slower than numpy's on one core (0.4 ms vs 0.06 ms for a 480x640 image's stride-4 maps).
    """
    if maps.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(maps.numpy() >= np.float32(threshold)))
    return torch.nonzero(maps.reshape(-1) >= threshold).squeeze(1)


def _neighbours(heights: torch.Tensor, widths: torch.Tensor, cells: torch.Tensor):
    """Flat indices (K, 8) of the 8-neighbours of flat cells (K,) of maps (18, heights, widths) (per cell),
    in raster order (the 4 raster-earlier first), and whether each lies inside its own map (K, 8) bool."""
    d_row = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 1], device=cells.device)
    d_col = torch.tensor([-1, 0, 1, -1, 1, -1, 0, 1], device=cells.device)
    row, col = (cells // widths) % heights, cells % widths
    rows, cols = row[:, None] + d_row, col[:, None] + d_col
    inside = (rows >= 0) & (rows < heights[:, None]) & (cols >= 0) & (cols < widths[:, None])
    return cells[:, None] + d_row * widths[:, None] + d_col, inside


@dataclass(frozen=True)
class _Maxima:
    """The cells >= threshold of a batch of maps (18, h_i, w_i) and their 8-neighbourhoods; (n,) / (n, 8)."""

    cells: torch.Tensor  # int64 flat indices within the cell's own maps, ascending per image
    images: torch.Tensor  # int64 image of each cell
    heights: torch.Tensor  # int64 map height of each cell's image
    widths: torch.Tensor  # int64 map width of each cell's image
    inside: torch.Tensor  # bool: neighbour inside the map
    around: torch.Tensor  # neighbour values, -inf outside
    centre: torch.Tensor  # cell values
    is_peak: torch.Tensor  # bool: >= every in-map neighbour


def _local_maxima(batch: list[torch.Tensor], threshold: float) -> _Maxima:
    """Cells >= threshold and >= each in-map 8-neighbour (docs/method.md §9.1: ties all survive here), for a batch of
    maps (18, h_i, w_i). Only the few cells above the threshold are compared, not the whole maps; the work
    after the per-image scan and gather is one set of tensor operations for the batch.
    Raises ValueError on NaN/inf values read."""
    device = batch[0].device
    per_image = [_cells_above(maps, threshold) for maps in batch]
    counts = torch.tensor([len(c) for c in per_image], device=device)
    images = torch.repeat_interleave(torch.arange(len(batch), device=device), counts)
    shapes = torch.tensor([maps.shape[1:] for maps in batch], device=device, dtype=torch.int64).reshape(-1, 2)
    cells = torch.cat(per_image)
    heights, widths = shapes[images, 0], shapes[images, 1]
    near, inside = _neighbours(heights, widths, cells)
    both = torch.cat([cells[:, None], near], dim=1)
    values = torch.cat([maps.reshape(-1)[part.clamp(0, maps.numel() - 1)]
                        for maps, part in zip(batch, torch.split(both, counts.tolist()))])
    centre, around = values[:, 0], torch.where(inside, values[:, 1:], float("-inf"))
    if not (torch.isfinite(centre).all() and not torch.isnan(around).any()):
        raise ValueError("decode: keypoint heatmaps contain NaN or inf")
    return _Maxima(cells, images, heights, widths, inside, around, centre, centre >= around.amax(dim=1))


def _unravel(cells: torch.Tensor, heights, widths) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices (n,) of maps (18, heights, widths) -> (type, row, col) int64 (n,)."""
    return cells // (heights * widths), (cells // widths) % heights, cells % widths


def _windows(maps: torch.Tensor, t: torch.Tensor, r: torch.Tensor, c: torch.Tensor, radius: int) -> torch.Tensor:
    """(2*radius+1)^2 neighbourhoods of cells: maps (K, H, W), t/r/c (N,) -> (N, 2r+1, 2r+1), 0 outside.
    Gathers only the N windows (no padded copy of the maps)."""
    height, width = maps.shape[-2:]
    d = torch.arange(-radius, radius + 1, device=maps.device)
    rows = r[:, None, None] + d[None, :, None]
    cols = c[:, None, None] + d[None, None, :]
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    values = maps[t[:, None, None], rows.clamp(0, height - 1), cols.clamp(0, width - 1)]
    return torch.where(inside, values, torch.zeros_like(values))


def reference_peaks(maps: torch.Tensor, config: DecoderConfig) -> Peaks:
    """The authors' find_peaks, bugs included (docs/method.md §9.1).

    maps: float32 or float64 (18, H, W) at original image resolution; peaks are found on the float32 cast.
    Every plateau cell is a peak (ties survive). Refinement: the centroid of the raw (2r+1)^2 window with the
    authors' AXIS SWAP (x gets the row offset, y the column offset) and the window mean as score; a window
    that leaves the map keeps the integer cell and the raw peak value. The arithmetic runs in numpy on the
    gathered windows so that float32 sums round exactly as the authors' numpy code did.
    """
    maps32 = maps.to(torch.float32).contiguous()
    m = _local_maxima([maps32], config.keypoint_threshold)
    t, r, c = _unravel(m.cells[m.is_peak], m.heights[m.is_peak], m.widths[m.is_peak])
    rad = config.refine_radius
    height, width = maps.shape[-2:]
    win = _windows(maps32, t, r, c, rad).cpu().numpy()
    rows, cols = r.cpu().numpy(), c.cpu().numpy()
    inside = (cols - rad >= 0) & (rows - rad >= 0) & (cols + rad <= width - 1) & (rows + rad <= height - 1)
    d_row, d_col = np.mgrid[-rad:rad + 1, -rad:rad + 1]
    total = win.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        off_row = (win * d_row).sum(axis=(1, 2)) / total
        off_col = (win * d_col).sum(axis=(1, 2)) / total
    x = np.where(inside, cols + off_row, cols).astype(np.float64)  # the swap: x += row offset
    y = np.where(inside, rows + off_col, rows).astype(np.float64)
    raw = win[:, rad, rad]
    score = np.where(inside, win.mean(axis=(1, 2)), raw).astype(np.float64)
    dev = maps.device
    return Peaks(torch.from_numpy(np.stack([x, y], axis=1)).to(dev), torch.from_numpy(score).to(dev), t,
                 torch.zeros_like(t))


def _log_parabola(low: torch.Tensor, mid: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertex of the parabola through (-1, low), (0, mid), (1, high) (log values): (offset in [-0.5, 0.5],
    log-value gain at the vertex). Exact for a sampled Gaussian; 0 where the fit is not concave."""
    curvature = low - 2 * mid + high
    slope = 0.5 * (high - low)
    concave = curvature < 0
    offset = torch.where(concave, -slope / curvature.clamp(max=-1e-12), torch.zeros_like(mid)).clamp(-0.5, 0.5)
    gain = slope * offset + 0.5 * curvature * offset * offset
    return offset, torch.where(concave, gain, torch.zeros_like(mid))


def stride_peaks(batch: list[torch.Tensor], config: DecoderConfig) -> Peaks:
    """Our peaks on maps of any stride: a batch of maps float32 (18, h_i, w_i) -> Peaks in map cells.

    Only the cells >= keypoint_threshold are examined (a few hundred per image), each against its in-map
    8-neighbours. `tie_free_nms`: a peak next to a raster-earlier peak is dropped, so a plateau of equal maxima
    gives one candidate. `refinement`: "log_parabola" fits a parabola to the log values of the 4-neighbourhood
    along each axis (exact for a Gaussian, which is what the targets are; a neighbour outside the map mirrors
    the other side), "centroid" is the authors' (2r+1)^2 window centroid with the axes the right way round,
    "none" keeps cell centres. `peak_value_score`: score = the fitted peak value (clipped to 1) instead of
    the mean of the (2r+1)^2 window. `max_candidates` (K > 0): only the K highest-scoring peaks of each type
    of each image are kept (`top_k_per_group`, sorted tensor operations), still in image, type, raster order,
    so that at most 18 K candidates and 30 K^2 pairs per image leave this stage, whatever the maps.
    Raises ValueError when a value it reads is NaN or infinite.
    """
    m = _local_maxima(batch, config.keypoint_threshold)
    keep = m.is_peak & ~_after_a_peak(m) if config.tie_free_nms else m.is_peak
    around, inside, images = m.around[keep], m.inside[keep], m.images[keep]
    value = m.centre[keep].to(torch.float64)
    types, row, col = _unravel(m.cells[keep], m.heights[keep], m.widths[keep])
    xy = torch.stack([col, row], dim=1).to(torch.float64)
    score = value
    if config.refinement == "log_parabola":
        offset, gain = _refine_log_parabola(around, inside, value)
        xy = xy + offset
        score = (value * torch.exp(gain)).clamp(max=1.0)
    if config.refinement == "centroid" or not config.peak_value_score:
        rad = config.refine_radius
        win = torch.cat([_windows(maps, types[images == i], row[images == i], col[images == i], rad)
                         for i, maps in enumerate(batch)]).to(torch.float64)
        if config.refinement == "centroid":
            w = win.clamp(min=0)
            d = torch.arange(-rad, rad + 1, device=w.device, dtype=torch.float64)
            moments = torch.stack([(w * d).sum(dim=(1, 2)), (w * d[:, None]).sum(dim=(1, 2))], dim=1)
            xy = xy + moments / w.sum(dim=(1, 2)).clamp(min=1e-12)[:, None]
        if not config.peak_value_score:
            score = win.mean(dim=(1, 2))
    if config.max_candidates and len(score):
        best = top_k_per_group(images * NUM_KEYPOINTS + types, score, config.max_candidates)
        xy, score, types, images = xy[best], score[best], types[best], images[best]
    return Peaks(xy, score, types, images)


def top_k_per_group(groups: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool (n,): the k highest `scores` of each group (int64 (n,) labels); ties go to the earlier row, so the
    choice is deterministic. Sorted tensor operations only (no loop over groups): rows sorted by descending
    score, then (stably) by group, numbered within their group."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(groups[by_score], stable=True).indices]
    sorted_groups = groups[order]
    first = torch.ones_like(sorted_groups, dtype=torch.bool)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    position = torch.arange(len(order), device=scores.device)
    start = torch.cummax(torch.where(first, position, torch.zeros_like(position)), dim=0).values
    keep = torch.zeros_like(first)
    keep[order] = (position - start) < k
    return keep


def _after_a_peak(m: _Maxima) -> torch.Tensor:
    """bool (n,): a raster-earlier neighbour holds the same value, i.e. the cell continues a plateau whose
    first cell (in raster order) is already a peak (or which rises elsewhere and is no peak at all)."""
    return (m.around[:, :4] == m.centre[:, None]).any(dim=1)


def _refine_log_parabola(around: torch.Tensor, inside: torch.Tensor, value: torch.Tensor):
    """around (n, 8) neighbour values in raster order, inside (n, 8), value (n,) float64 ->
    (offset float64 (n, 2) x, y in cells, log-gain (n,) of the fitted peak over the cell value).
    A neighbour outside the map mirrors the opposite one, so the fit stays on the cell along that axis."""
    logs = torch.log(around.to(torch.float64).clamp(min=1e-6))
    mid = torch.log(value.clamp(min=1e-6))
    up, left, right, down = (torch.where(inside[:, k], logs[:, k], logs[:, 7 - k]) for k in (1, 3, 4, 6))
    dx, gain_x = _log_parabola(left, mid, right)
    dy, gain_y = _log_parabola(up, mid, down)
    return torch.stack([dx, dy], dim=1), gain_x + gain_y
