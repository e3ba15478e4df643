"""Keypoint heatmaps to keypoint candidates: 3x3 non-maximum suppression and sub-cell refinement (SPEC §8.1).

Runs in torch on the maps' device; only the (N,) candidate arrays leave it. Coordinates are map coordinates:
cell (row i, col j) is the point (x=j, y=i); `simplepose.decode` maps them to image pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from simplepose.decode.config import DecoderConfig

LOG = logging.getLogger(__name__)

@dataclass(frozen=True)
class Peaks:
    """Candidates in map coordinates, sorted by type then raster order (id = row index).

    xy: float64 (N, 2) x, y in map cells; scores: float64 (N,); types: int64 (N,) reference keypoint index.
    Tensors on the maps' device.
    """

    xy: torch.Tensor
    scores: torch.Tensor
    types: torch.Tensor


def _max3x3(maps: torch.Tensor) -> torch.Tensor:
    """(K, H, W) -> (K, H, W) max over each cell's in-map 3x3 neighbourhood; separable, several times faster
    than max_pool2d on one CPU core."""
    padded = F.pad(maps, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _local_maxima(maps: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """maps float (K, H, W) -> (peak mask bool (K, H, W), (type, row, col) int64 (N,)) of the cells >= every
    in-map 8-neighbour and >= threshold, in type then row-major order (SPEC §15.4)."""
    mask = maps >= torch.clamp(_max3x3(maps), min=threshold)
    return mask, torch.nonzero(mask, as_tuple=True)


def _windows(maps: torch.Tensor, t: torch.Tensor, r: torch.Tensor, c: torch.Tensor, radius: int,
             fill: float = 0.0) -> torch.Tensor:
    """(2*radius+1)^2 neighbourhoods of cells: maps (K, H, W), t/r/c (N,) -> (N, 2r+1, 2r+1), `fill` outside.
    Gathers only the N windows (no padded copy of the maps)."""
    height, width = maps.shape[-2:]
    d = torch.arange(-radius, radius + 1, device=maps.device)
    rows = r[:, None, None] + d[None, :, None]
    cols = c[:, None, None] + d[None, None, :]
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    values = maps[t[:, None, None], rows.clamp(0, height - 1), cols.clamp(0, width - 1)]
    return torch.where(inside, values, torch.full_like(values, fill))


def reference_peaks(maps: torch.Tensor, config: DecoderConfig) -> Peaks:
    """The authors' find_peaks, bugs included (SPEC §8.1, §15.4).

    maps: float32 or float64 (18, H, W) at original image resolution; peaks are found on the float32 cast.
    Every plateau cell is a peak (ties survive). Refinement: the centroid of the raw (2r+1)^2 window with the
    authors' AXIS SWAP (x gets the row offset, y the column offset) and the window mean as score; a window
    that leaves the map keeps the integer cell and the raw peak value. The arithmetic runs in numpy on the
    gathered windows so that float32 sums round exactly as the authors' numpy code did.
    """
    maps32 = maps.to(torch.float32)
    _, (t, r, c) = _local_maxima(maps32, config.keypoint_threshold)
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
    return Peaks(torch.from_numpy(np.stack([x, y], axis=1)).to(dev), torch.from_numpy(score).to(dev), t)


def _cells_above(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """int64 (K,) ascending flat indices of the cells of maps (K, h, w) that are >= threshold.

    The one dense pass of the default decoder. On CPU it runs in numpy: torch's CPU compare + nonzero is about
    7x slower than numpy's on one core (0.4 ms vs 0.06 ms for a 480x640 image's stride-4 maps).
    """
    if maps.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(maps.numpy() >= np.float32(threshold)))
    return torch.nonzero(maps.reshape(-1) >= threshold).squeeze(1)


def _neighbours(shape: tuple[int, int, int], cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (K, 8) of the 8-neighbours of flat cells (K,) in raster order (the 4 raster-earlier first),
    and whether each lies inside its own map (K, 8) bool."""
    _, height, width = shape
    d_row = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 1], device=cells.device)
    d_col = torch.tensor([-1, 0, 1, -1, 1, -1, 0, 1], device=cells.device)
    row, col = (cells // width) % height, cells % width
    rows, cols = row[:, None] + d_row, col[:, None] + d_col
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    return cells[:, None] + d_row * width + d_col, inside


def _log_parabola(low: torch.Tensor, mid: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertex of the parabola through (-1, low), (0, mid), (1, high) (log values): (offset in [-0.5, 0.5],
    log-value gain at the vertex). Exact for a sampled Gaussian; 0 where the fit is not concave."""
    curvature = low - 2 * mid + high
    slope = 0.5 * (high - low)
    concave = curvature < 0
    offset = torch.where(concave, -slope / curvature.clamp(max=-1e-12), torch.zeros_like(mid)).clamp(-0.5, 0.5)
    gain = slope * offset + 0.5 * curvature * offset * offset
    return offset, torch.where(concave, gain, torch.zeros_like(mid))


def stride_peaks(maps: torch.Tensor, config: DecoderConfig) -> Peaks:
    """Our peaks on maps of any stride: maps float32 (18, h, w) -> Peaks in map cells.

    Only the cells >= keypoint_threshold are examined (a few hundred per image), each against its in-map
    8-neighbours. `tie_free_nms`: a peak next to a raster-earlier peak is dropped, so a plateau of equal maxima
    gives one candidate. `refinement`: "log_parabola" fits a parabola to the log values of the 4-neighbourhood
    along each axis (exact for a Gaussian, which is what the targets are; a neighbour outside the map mirrors
    the other side), "centroid" is the authors' (2r+1)^2 window centroid with the axes the right way round,
    "none" keeps cell centres. `peak_value_score`: score = the fitted peak value (clipped to 1) instead of
    the mean of the (2r+1)^2 window.
    Raises ValueError when a value it reads is NaN or infinite.
    """
    flat = maps.reshape(-1)
    cells = _cells_above(maps, config.keypoint_threshold)
    near, inside = _neighbours(maps.shape, cells)
    around = torch.where(inside, flat[near.clamp(0, flat.numel() - 1)], float("-inf"))
    centre = flat[cells]
    if not (torch.isfinite(centre).all() and not torch.isnan(around).any()):
        raise ValueError("decode: keypoint heatmaps contain NaN or inf")
    is_peak = centre >= around.amax(dim=1)
    if config.tie_free_nms:
        peak_cells = cells[is_peak]
        earlier = near[:, :4]
        position = torch.searchsorted(peak_cells, earlier).clamp(max=max(len(peak_cells) - 1, 0))
        earlier_is_peak = inside[:, :4] & (peak_cells[position] == earlier) if len(peak_cells) else inside[:, :4] & False
        is_peak = is_peak & ~earlier_is_peak.any(dim=1)
    cells, around, value = cells[is_peak], around[is_peak], centre[is_peak].to(torch.float64)
    height, width = maps.shape[1:]
    types, row, col = cells // (height * width), (cells // width) % height, cells % width
    xy = torch.stack([col, row], dim=1).to(torch.float64)
    score = value
    if config.refinement == "log_parabola":
        logs = torch.log(torch.cat([around, centre[is_peak][:, None]], dim=1).to(torch.float64).clamp(min=1e-6))
        left, right, up, down, mid = logs[:, 3], logs[:, 4], logs[:, 1], logs[:, 6], logs[:, 8]
        left, right = torch.where(inside[is_peak][:, 3], left, right), torch.where(inside[is_peak][:, 4], right, left)
        up, down = torch.where(inside[is_peak][:, 1], up, down), torch.where(inside[is_peak][:, 6], down, up)
        dx, gain_x = _log_parabola(left, mid, right)
        dy, gain_y = _log_parabola(up, mid, down)
        xy = xy + torch.stack([dx, dy], dim=1)
        score = (value * torch.exp(gain_x + gain_y)).clamp(max=1.0)
    if config.refinement == "centroid" or not config.peak_value_score:
        win = torch.nan_to_num(_windows(maps, types, row, col, config.refine_radius, fill=0.0).to(torch.float64))
        if config.refinement == "centroid":
            w = win.clamp(min=0)
            d = torch.arange(-config.refine_radius, config.refine_radius + 1, device=maps.device,
                             dtype=torch.float64)
            total = w.sum(dim=(1, 2)).clamp(min=1e-12)
            xy = xy + torch.stack([(w * d).sum(dim=(1, 2)), (w * d[:, None]).sum(dim=(1, 2))], dim=1) / total[:, None]
        if not config.peak_value_score:
            score = win.mean(dim=(1, 2))
    return Peaks(xy, score, types)
