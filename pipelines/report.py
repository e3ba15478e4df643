"""One self-contained HTML page about a labeling run: what `simplepose report RUN OUT.html` writes.

The page shows the objects per status, persons per image, the person-score and keypoint-score
distributions, the detection rate of each COCO keypoint, the model and settings of the run (`_run.json`,
`_manifest.json`) and overlay thumbnails of the best, worst and some random images. It makes no request
anywhere when opened: no scripts, styles or fonts from elsewhere (a Content-Security-Policy forbids them), and
every picture is a `data:` URI. Charts are PNGs drawn by matplotlib (Agg, no pyplot state), the optional
extra `simplepose[report]`; without it the page keeps its tables and thumbnails and says how to get charts.

Memory stays bounded whatever the run's size: the tables are read part by part (one chunk's rows at a time)
and only the columns needed; histograms use fixed bins (their ranges come from the Parquet column
statistics); thumbnails are a bounded sample (`thumbnails` best, worst and random images). Incomplete runs
(no `_SUCCESS`: running, or killed) are reported from their committed chunks and say so at the top.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping

import cv2
import numpy as np
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.label import run_folder, tables
from pipelines.images import DEFAULT_MAX_PIXELS, STATUSES, decode_image
from pipelines.overlay import NO_PERSONS, draw_poses, poses_by_image
from simplepose.skeleton import COCO_KEYPOINTS

LOG = logging.getLogger(__name__)

CHARTS_HINT = "pip install simplepose[report]"
"""What the page tells its reader when matplotlib is missing."""

SCORE_BINS = 30
FAILURE_EXAMPLES = 20
_KEYPOINT_SCORES = [f"{name}_score" for name in COCO_KEYPOINTS]
_IMAGE_COLUMNS = ["input_index", "image_id", "uri", "status", "error", "num_persons"]
_POSE_COLUMNS = ["image_id", "person_index", "score", *_KEYPOINT_SCORES]


@dataclasses.dataclass(frozen=True)
class ReportSummary:
    """run_id: None when the folder has no `_run.json` and no part says; complete: `_SUCCESS` exists;
    images, persons: rows in the committed chunks; thumbnails: overlays embedded; charts: matplotlib drew them."""

    run_id: str | None
    complete: bool
    images: int
    persons: int
    thumbnails: int
    charts: bool
    output: str


def write_report(run_output: str, out_uri: str, *, thumbnails: int = 8, keypoint_threshold: float = 0.0,
                 thumbnail_size: int = 320, seed: int = 0, storage_options: Mapping | None = None) -> ReportSummary:
    """Write the HTML report of the run in `run_output` to `out_uri` (both any fsspec URI)."""
    page, summary = build_report(run_output, thumbnails=thumbnails, keypoint_threshold=keypoint_threshold,
                                 thumbnail_size=thumbnail_size, seed=seed, storage_options=storage_options)
    storage.write_atomic(out_uri, page.encode(), storage_options)
    summary = dataclasses.replace(summary, output=out_uri)
    LOG.info("report of run %s (%d images, %d persons, %d thumbnails) written to %s", summary.run_id,
             summary.images, summary.persons, summary.thumbnails, out_uri)
    return summary


def build_report(run_output: str, *, thumbnails: int = 8, keypoint_threshold: float = 0.0, thumbnail_size: int = 320,
                 seed: int = 0, storage_options: Mapping | None = None) -> tuple[str, ReportSummary]:
    """(the HTML page, its summary) of the run in `run_output`; `thumbnails` images per group (best, worst,
    random; 0 = none), keypoints counted as detected when their score > `keypoint_threshold`."""
    if thumbnails < 0:
        raise ValueError(f"build_report: thumbnails must be >= 0, got {thumbnails}")
    if thumbnail_size < 32:
        raise ValueError(f"build_report: thumbnail_size must be >= 32 pixels, got {thumbnail_size}")
    folder = run_folder.RunFolder(run_output, storage_options)
    image_parts = _parts(folder.uri("images"), storage_options)
    run = folder.read_json("_run.json")
    if run is None and not image_parts:
        raise ValueError(f"{run_output} has no _run.json and no images/ table: not the output folder of a labeling run")
    manifest = folder.read_json("_manifest.json")
    complete = storage.exists(folder.uri("_SUCCESS"), storage_options)
    committed = {run_folder.chunk_of(name) for name in image_parts}
    pose_parts = [name for name in _parts(folder.uri("poses"), storage_options)
                  if run_folder.chunk_of(name) in committed]  # a poses part without its images part is not committed
    if run is None:  # parts written by a job whose _run.json is gone: their metadata names the run
        run = {**_part_metadata(folder.uri("images", image_parts[0]), storage_options).get("run", {}), "settings": {}}

    images = _image_stats(folder, image_parts, thumbnails, seed)
    poses = _pose_stats(folder, pose_parts, thumbnails, keypoint_threshold)
    chosen = _choose_thumbnails(folder, images, poses, thumbnails, storage_options)
    max_pixels = int((run.get("settings") or {}).get("max_pixels") or DEFAULT_MAX_PIXELS)
    cards = _thumbnail_cards(run_output, chosen, thumbnail_size, max_pixels, storage_options)
    charts = _charts(images, poses, keypoint_threshold)

    progress = folder.read_json("_inputs/_complete.json")
    page = _page(run_output, run, manifest, complete, progress, len(image_parts), images, poses, keypoint_threshold,
                 charts, cards)
    summary = ReportSummary(run.get("run_id"), complete, images.images, poses.persons,
                            sum(1 for c in cards if c["src"]), charts is not None, "")
    return page, summary


# ----------------------------------------------------------------------------------------------------- reading


def _parts(table_uri: str, storage_options: Mapping | None) -> list[str]:
    """Names of the committed-format part files of one table, by chunk."""
    names = [n for n in storage.list_names(table_uri, storage_options) if run_folder.chunk_of(n) is not None]
    return sorted(names, key=run_folder.chunk_of)


def _read_part(uri: str, columns: list[str], storage_options: Mapping | None):
    with storage.open_binary(uri, storage_options) as f:
        return pq.read_table(f, columns=columns)


def _part_metadata(uri: str, storage_options: Mapping | None) -> dict:
    with storage.open_binary(uri, storage_options) as f:
        return tables.read_metadata(pq.read_schema(f))


@dataclasses.dataclass
class _ImageStats:
    images: int = 0
    status: Counter = dataclasses.field(default_factory=Counter)
    persons_per_image: Counter = dataclasses.field(default_factory=Counter)  # over images with status ok
    failures: list = dataclasses.field(default_factory=list)  # the first FAILURE_EXAMPLES rows not ok
    sample: list = dataclasses.field(default_factory=list)  # bottom-k random keys: a uniform sample of ok images


def _image_stats(folder: run_folder.RunFolder, parts: list[str], thumbnails: int, seed: int) -> _ImageStats:
    stats = _ImageStats()
    rng = np.random.default_rng(seed)
    keep = 3 * thumbnails  # random images are drawn from these, after removing the best and worst ones
    sample_keys, sample_rows = np.zeros(0), []
    for name in parts:
        table = _read_part(folder.uri("images", name), _IMAGE_COLUMNS, folder.options)
        status = np.asarray(table["status"].to_pylist(), dtype=object)
        stats.images += len(status)
        values, counts = np.unique(status, return_counts=True) if len(status) else ([], [])
        stats.status.update(dict(zip(map(str, values), map(int, counts))))
        ok = status == "ok"
        values, counts = np.unique(table["num_persons"].to_numpy()[ok], return_counts=True)
        stats.persons_per_image.update(dict(zip(map(int, values), map(int, counts))))
        if len(stats.failures) < FAILURE_EXAMPLES and not ok.all():
            bad = np.flatnonzero(~ok)[:FAILURE_EXAMPLES - len(stats.failures)]
            stats.failures.extend(table.take(bad).select(["input_index", "uri", "status", "error"]).to_pylist())
        if keep and ok.any():  # bottom-k of random keys; only the rows that enter the sample become dicts
            rows = np.flatnonzero(ok)
            old = len(sample_keys)
            keys = np.r_[sample_keys, rng.random(len(rows))]
            order = np.argsort(keys, kind="stable")[:keep]
            entering = order[order >= old] - old
            picked = table.take(rows[entering]).select(["input_index", "image_id", "uri"]).to_pylist()
            new_rows = dict(zip(entering.tolist(), picked))
            sample_rows = [sample_rows[i] if i < old else new_rows[i - old] for i in order]
            sample_keys = keys[order]
    stats.sample = sample_rows
    return stats


@dataclasses.dataclass
class _PoseStats:
    persons: int = 0
    score_edges: np.ndarray | None = None
    score_counts: np.ndarray | None = None
    score_sum: float = 0.0
    score_min: float = np.inf
    score_max: float = -np.inf
    keypoint_edges: np.ndarray | None = None
    keypoint_counts: np.ndarray | None = None  # over detected keypoints (score > 0) of every person
    detected: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(COCO_KEYPOINTS), np.int64))
    best: list = dataclasses.field(default_factory=list)  # (score, image_id) of the images whose best person is best
    worst: list = dataclasses.field(default_factory=list)


def _pose_stats(folder: run_folder.RunFolder, parts: list[str], thumbnails: int, threshold: float) -> _PoseStats:
    stats = _PoseStats()
    if not parts:
        return stats
    ranges = _column_ranges(folder, parts, ["score", *_KEYPOINT_SCORES])
    stats.score_edges = _edges(*ranges["score"])
    stats.score_counts = np.zeros(SCORE_BINS, np.int64)
    keypoint_max = max(ranges[c][1] for c in _KEYPOINT_SCORES)
    stats.keypoint_edges = _edges(0.0, keypoint_max if keypoint_max > 0 else 1.0)
    stats.keypoint_counts = np.zeros(SCORE_BINS, np.int64)
    top_scores, top_ids = np.zeros(0, np.float32), np.zeros(0, object)
    for name in parts:
        table = _read_part(folder.uri("poses", name), _POSE_COLUMNS, folder.options)
        if table.num_rows == 0:
            continue
        score = table["score"].to_numpy().astype(np.float64)
        keypoint_scores = np.stack([table[c].to_numpy() for c in _KEYPOINT_SCORES], axis=1)
        stats.persons += len(score)
        stats.score_counts += np.histogram(score, stats.score_edges)[0]
        stats.score_sum += float(score.sum())
        stats.score_min, stats.score_max = min(stats.score_min, score.min()), max(stats.score_max, score.max())
        found = keypoint_scores[keypoint_scores > 0]
        stats.keypoint_counts += np.histogram(found, stats.keypoint_edges)[0]
        stats.detected += (keypoint_scores > threshold).sum(axis=0)
        if thumbnails:  # an image's score is its best person's (person_index 0); keep the extremes only
            first = table["person_index"].to_numpy() == 0
            scores = np.r_[top_scores, score[first]]
            ids = np.r_[top_ids, np.asarray(table["image_id"].to_pylist(), dtype=object)[first]]
            order = np.argsort(-scores, kind="stable")
            keep = np.unique(np.r_[order[:thumbnails], order[-thumbnails:]])
            top_scores, top_ids = scores[keep], ids[keep]
    order = np.argsort(-top_scores, kind="stable")
    ranked = [(float(top_scores[i]), str(top_ids[i])) for i in order]
    stats.best = ranked[:min(thumbnails, (len(ranked) + 1) // 2)]  # a small run: half best, half worst
    stats.worst = [r for r in reversed(ranked) if r not in stats.best][:thumbnails]
    return stats


def _column_ranges(folder: run_folder.RunFolder, parts: list[str], columns: list[str]) -> dict[str, tuple[float, float]]:
    """(min, max) of float columns over the parts: from the Parquet statistics (footers only), else the data."""
    low = dict.fromkeys(columns, np.inf)
    high = dict.fromkeys(columns, -np.inf)
    for name in parts:
        uri = folder.uri("poses", name)
        with storage.open_binary(uri, folder.options) as f:
            meta = pq.ParquetFile(f).metadata
        index = {meta.schema.column(i).name: i for i in range(meta.num_columns)}
        missing = []
        for column in columns:
            for g in range(meta.num_row_groups):
                s = meta.row_group(g).column(index[column]).statistics
                if meta.row_group(g).num_rows == 0:
                    continue
                if s is None or not s.has_min_max:
                    missing.append(column)
                    break
                low[column], high[column] = min(low[column], s.min), max(high[column], s.max)
        if missing:
            table = _read_part(uri, missing, folder.options)
            for column in missing:
                values = table[column].to_numpy()
                if len(values):
                    low[column], high[column] = min(low[column], values.min()), max(high[column], values.max())
    return {c: (float(low[c]), float(high[c])) if low[c] <= high[c] else (0.0, 1.0) for c in columns}


def _edges(low: float, high: float) -> np.ndarray:
    if not np.isfinite(low) or not np.isfinite(high):
        low, high = 0.0, 1.0
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, SCORE_BINS + 1)


def _choose_thumbnails(folder: run_folder.RunFolder, images: _ImageStats, poses: _PoseStats, count: int,
                       storage_options: Mapping | None) -> list[dict]:
    """[{group, input_index, image_id, uri, image_score}] of the best, worst and random images."""
    if count == 0:
        return []
    wanted = {image_id: score for score, image_id in poses.best + poses.worst}
    rows = {}
    if wanted:  # where the best and worst images are: one filtered read of three columns
        fs, path = storage.filesystem(folder.uri("images"), storage_options)
        found = pq.read_table(path, filesystem=fs, columns=["input_index", "image_id", "uri"],
                              filters=[("image_id", "in", list(wanted))])
        rows = {r["image_id"]: r for r in found.to_pylist()}
    chosen = []
    for group, ranked in (("best", poses.best), ("worst", poses.worst)):
        for score, image_id in ranked:
            if image_id in rows:
                chosen.append({"group": group, **rows[image_id], "image_score": score})
    taken = {c["image_id"] for c in chosen}
    extra = sorted((r for r in images.sample if r["image_id"] not in taken), key=lambda r: r["input_index"])
    for row in extra[:count]:
        chosen.append({"group": "random", **row, "image_score": wanted.get(row["image_id"])})
    return chosen


def _thumbnail_cards(run_output: str, chosen: list[dict], size: int, max_pixels: int,
                     storage_options: Mapping | None) -> list[dict]:
    """The chosen images with their persons drawn (`pipelines.overlay.draw_poses`), shrunk to fit
    `size` pixels, as JPEG data URIs ("" when the source cannot be read or decoded now)."""
    if not chosen:
        return []
    persons = poses_by_image(run_output, [c["image_id"] for c in chosen], -np.inf, storage_options)
    cards = []
    for row, data in zip(chosen, storage.read_objects([c["uri"] for c in chosen], storage_options)):
        keypoints, scores, boxes = persons.get(row["image_id"], NO_PERSONS)
        card = {**row, "persons": len(scores), "src": "", "problem": ""}
        decoded = decode_image(data, max_pixels) if isinstance(data, bytes) else None
        if decoded is None or decoded.status != "ok":
            card["problem"] = f"source not readable now: {decoded.error if decoded else type(data).__name__}"
        else:
            overlay = draw_poses(decoded.image, keypoints, scores, boxes)
            scale = size / max(overlay.shape[:2])
            if scale < 1:
                overlay = cv2.resize(overlay, (max(1, round(overlay.shape[1] * scale)),
                                               max(1, round(overlay.shape[0] * scale))), interpolation=cv2.INTER_AREA)
            ok, encoded = cv2.imencode(".jpg", overlay, [cv2.IMWRITE_JPEG_QUALITY, 85])
            if ok:
                card["src"] = "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode()
        cards.append(card)
    return cards


# ------------------------------------------------------------------------------------------------------ charts


def _charts(images: _ImageStats, poses: _PoseStats, threshold: float) -> dict[str, str] | None:
    """{name: PNG data URI}, or None without matplotlib."""
    try:  # deferred: matplotlib is optional (extra `report`), the page works without charts
        from matplotlib.figure import Figure
    except ImportError:
        return None

    def figure(height: float = 3.0):
        fig = Figure(figsize=(6.0, height), dpi=100, layout="constrained")
        return fig, fig.add_subplot()

    def png(fig) -> str:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})  # no URL in the PNG's text chunk
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    charts = {}
    if images.persons_per_image:
        fig, ax = figure()
        counts = sorted(images.persons_per_image.items())
        ax.bar([k for k, _ in counts], [v for _, v in counts], width=0.8, color="#4878a8")
        ax.set(xlabel="persons in the image", ylabel="images", title="Persons per image (status ok)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        charts["persons"] = png(fig)
    if poses.persons:
        fig, ax = figure()
        ax.stairs(poses.score_counts, poses.score_edges, fill=True, color="#4878a8")
        ax.set(xlabel="person score", ylabel="persons", title="Person scores")
        charts["scores"] = png(fig)
        fig, ax = figure()
        ax.stairs(poses.keypoint_counts, poses.keypoint_edges, fill=True, color="#6a9f58")
        ax.set(xlabel="keypoint score", ylabel="keypoints", title="Keypoint scores (detected keypoints, all 17 pooled)")
        charts["keypoint_scores"] = png(fig)
        fig, ax = figure(4.6)
        rates = poses.detected / poses.persons
        positions = np.arange(len(COCO_KEYPOINTS))
        ax.barh(positions, rates, color="#c07a3a")
        ax.set_yticks(positions, [n.replace("_", " ") for n in COCO_KEYPOINTS], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.12)
        for y, rate in zip(positions, rates):
            ax.text(rate + 0.01, y, f"{rate:.0%}", va="center", fontsize=7)
        ax.set(xlabel=f"fraction of persons with keypoint score > {threshold:g}", title="Detection rate per keypoint")
        charts["detection"] = png(fig)
    return charts


# -------------------------------------------------------------------------------------------------------- page

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2430;
background:#f4f5f7;font-size:14px;line-height:1.4}
main{max-width:1240px;margin:0 auto;padding:16px 24px 40px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:0 0 10px}
.sub{color:#5a6270;margin:0 0 14px;overflow-wrap:anywhere}
.banner{padding:10px 14px;border-radius:6px;margin:0 0 14px;border:1px solid}
.warn{background:#fff4d6;border-color:#e0b44c}.ok{background:#e5f4e8;border-color:#7ab98a}
.note{background:#eef2f8;border-color:#a8b8d0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px;margin-bottom:14px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 16px;min-width:0}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceef2;
vertical-align:top}th{font-weight:600;color:#3c4450}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.wrap{overflow-wrap:anywhere}
img.chart{display:block;width:100%;height:auto;max-width:600px}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px}
figure{margin:0;background:#fafbfc;border:1px solid #e3e6eb;border-radius:6px;padding:6px}
figure img{display:block;width:100%;height:210px;object-fit:contain;background:#e9ebef;border-radius:3px}
figcaption{font-size:12px;color:#3c4450;margin-top:4px;overflow-wrap:anywhere}
.missing{height:210px;display:flex;align-items:center;justify-content:center;background:#eceef2;color:#7a8290;
font-size:12px;text-align:center;padding:6px}
.tag{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;background:#dde6f3;margin-right:4px}
details{margin-top:8px}summary{cursor:pointer;color:#3c4450}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str] | None, rows: list[list], numeric: set[int] = frozenset(),
           wrap: set[int] = frozenset()) -> str:
    """An HTML table (no header row when `header` is None); columns in `numeric` right-aligned."""
    head = "".join(f'<th class="{"n" if i in numeric else ""}">{_e(h)}</th>' for i, h in enumerate(header or []))
    body = "".join("<tr>" + "".join(
        f'<td class="{"n" if i in numeric else "wrap" if i in wrap else ""}">{_e(v)}</td>' for i, v in enumerate(row))
        + "</tr>" for row in rows)
    head = f"<thead><tr>{head}</tr></thead>" if header else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _flatten(settings: Mapping, prefix: str = "") -> list[list[str]]:
    rows = []
    for key in sorted(settings):
        value = settings[key]
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append([f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)])
    return rows


def _chart_or_hint(charts: dict[str, str] | None, name: str, alt: str, empty: str) -> str:
    if charts is None:
        return f'<p class="banner note">Charts need matplotlib: <code>{_e(CHARTS_HINT)}</code></p>'
    if name not in charts:
        return f"<p>{_e(empty)}</p>"
    return f'<img class="chart" alt="{_e(alt)}" src="{charts[name]}">'


def _page(run_output: str, run: dict, manifest: dict | None, complete: bool, progress: dict | None, parts: int,
          images: _ImageStats, poses: _PoseStats, threshold: float, charts: dict[str, str] | None,
          cards: list[dict]) -> str:
    out = []
    run_id = run.get("run_id", "?")
    model = f"{run.get('model_name', '?')} {run.get('model_version', '')}".strip()
    out.append(f"<h1>Labeling run {_e(run_id)}</h1>")
    out.append(f'<p class="sub">{_e(run_output)} · model <b>{_e(model)}</b> · report made '
               f"{_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>")
    if complete:
        out.append(f'<div class="banner ok">Complete run: {images.images} objects, {poses.persons} persons.</div>')
    else:
        if progress:
            done = (f"{parts} of {progress.get('chunks', '?')} chunks committed ({images.images} of "
                    f"{progress.get('objects', '?')} input objects have rows)")
        else:
            done = (f"{parts} chunk{'' if parts == 1 else 's'} committed ({images.images} objects); the input list "
                    "is not frozen yet")
        out.append(f'<div class="banner warn"><b>Incomplete run</b>: no <code>_SUCCESS</code> marker — the job is '
                   f"still running or was stopped. {_e(done)}. Everything below covers the committed chunks only; "
                   f"re-running the same <code>simplepose label</code> command finishes it.</div>")
    if charts is None:
        out.append(f'<div class="banner note">Charts are left out: they need matplotlib '
                   f"(<code>{_e(CHARTS_HINT)}</code>). Tables and thumbnails are complete.</div>")

    # counts per status + model and settings
    statuses = list(STATUSES) + sorted(set(images.status) - set(STATUSES))
    total = max(images.images, 1)
    rows = [[s, images.status.get(s, 0), f"{images.status.get(s, 0) / total:.1%}", STATUSES.get(s, "")]
            for s in statuses]
    rows.append(["all", images.images, "100%" if images.images else "0%", ""])
    counts = _table(["status", "objects", "share", "meaning"], rows, numeric={1, 2})
    if manifest and complete and dict(manifest.get("counts", {})) != {k: v for k, v in images.status.items() if v}:
        counts += (f'<p class="banner warn">The manifest counts {_e(json.dumps(manifest.get("counts")))} differ from '
                   "the committed parts: the folder was changed after the run finished.</p>")
    ok = images.status.get("ok", 0)
    zero = images.persons_per_image.get(0, 0)
    facts = [["objects", images.images], ["with status ok", ok], ["persons", poses.persons],
             ["persons per ok image (mean)", f"{poses.persons / ok:.2f}" if ok else "—"],
             ["ok images with 0 persons", zero],
             ["most persons in one image", max(images.persons_per_image) if images.persons_per_image else "—"]]
    out.append('<div class="grid"><section><h2>Objects per status</h2>' + counts
               + "<h2 style='margin-top:14px'>Totals</h2>"
               + _table(None, facts, numeric={1})
               + "</section>")
    model_rows = [["run id", run_id], ["model name", run.get("model_name", "?")],
                  ["model version", run.get("model_version", "?")]]
    if manifest:
        if manifest.get("finished_unix"):
            finished = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(manifest["finished_unix"])))
            model_rows.append(["finished", finished])
        for key, label in (("objects", "input objects"), ("chunks", "chunks"),
                           ("last_invocation_seconds", "last invocation, seconds"),
                           ("last_invocation_processed", "last invocation, objects processed")):
            if key in manifest:
                value = manifest[key]
                model_rows.append([label, f"{value:.1f}" if isinstance(value, float) else value])
    settings = _flatten(run.get("settings") or {})
    settings_html = ("<h2 style='margin-top:12px'>Settings (_run.json)</h2>"
                     + _table(["setting", "value"], settings, wrap={1}) if settings
                     else "<p>No settings recorded (<code>_run.json</code> missing).</p>")
    out.append("<section><h2>Model and settings</h2>" + _table(None, model_rows, wrap={1}) + settings_html
               + "</section></div>")

    # distributions
    persons_table = _table(["persons", "images"], sorted(images.persons_per_image.items()), numeric={0, 1})
    score_text = (f"<p>{poses.persons} persons; score min {poses.score_min:.3g}, mean "
                  f"{poses.score_sum / poses.persons:.3g}, max {poses.score_max:.3g} (the scale depends on the "
                  f"decoder mode).</p>" if poses.persons else "<p>No persons detected.</p>")
    out.append('<div class="grid">')
    out.append("<section><h2>Persons per image</h2>"
               + _chart_or_hint(charts, "persons", "histogram of persons per image", "No image with status ok.")
               + (f"<details{' open' if charts is None else ''}><summary>as a table</summary>{persons_table}"
                  "</details>" if images.persons_per_image else "") + "</section>")
    out.append("<section><h2>Person scores</h2>" + score_text
               + _chart_or_hint(charts, "scores", "histogram of person scores", "") + "</section>")
    out.append("<section><h2>Keypoint scores</h2>"
               + _chart_or_hint(charts, "keypoint_scores", "histogram of keypoint scores", "No keypoints detected.")
               + "</section>")
    rates = [[name, int(n), f"{n / poses.persons:.1%}" if poses.persons else "—"]
             for name, n in zip(COCO_KEYPOINTS, poses.detected)]
    out.append(f"<section><h2>Detection rate per keypoint</h2><p>Fraction of persons whose keypoint score is above "
               f"{threshold:g}.</p>"
               + _chart_or_hint(charts, "detection", "detection rate per COCO keypoint", "No persons detected.")
               + f"<details{' open' if charts is None else ''}><summary>as a table</summary>"
               + _table(["keypoint", "persons", "rate"], rates, numeric={1, 2}) + "</details></section>")
    out.append("</div>")

    # failures
    if images.failures:
        failed = sum(v for k, v in images.status.items() if k != "ok")
        rows = [[f["input_index"], f["status"], f["uri"], f["error"]] for f in images.failures]
        out.append(f"<section><h2>Objects not labelled ({failed}; the first {len(rows)})</h2>"
                   + _table(["input", "status", "uri", "error"], rows, numeric={0}, wrap={2, 3}) + "</section>")

    # thumbnails
    out.append('<section style="margin-top:14px"><h2>Overlays</h2>')
    if not cards:
        out.append("<p>No image with status ok to show.</p>")
    for group, title in (("best", "Best images (highest best-person score)"),
                         ("worst", "Worst images (lowest best-person score, images with persons)"),
                         ("random", "Random images (status ok, any number of persons)")):
        group_cards = [c for c in cards if c["group"] == group]
        if not group_cards:
            continue
        out.append(f'<h2 style="font-size:15px;margin-top:12px">{_e(title)}</h2><div class="thumbs">')
        for card in group_cards:
            score = "" if card["image_score"] is None else f" · best score {card['image_score']:.3f}"
            caption = (f'<span class="tag">#{card["input_index"]}</span>{_e(card["image_id"])} · '
                       f'{card["persons"]} person{"" if card["persons"] == 1 else "s"}{_e(score)}')
            picture = (f'<img alt="{_e(card["image_id"])}" src="{card["src"]}">' if card["src"]
                       else f'<div class="missing">{_e(card["problem"])}</div>')
            out.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
        out.append("</div>")
    out.append("</section>")

    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>SimplePose run {_e(run_id)}</title><style>{_STYLE}</style></head>"
            f"<body><main>{''.join(out)}</main></body></html>\n")
