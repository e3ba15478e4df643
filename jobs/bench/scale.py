"""`simplepose bench scale`: the labeling job's orchestration at 10^4..10^6 objects, without images or Ray.

For each N (a fresh subprocess each, so memory peaks do not mix), on N zero-byte objects under a local prefix
(processing is skipped: the job's driver never reads an object):
  freeze_s                    listing + input freezing: `RunFolder.freeze_inputs(storage.iter_input_uris(...))`
  commit_s                    the driver's commit path: `ChunkWriter.add` of synthetic assembled rows for all N
                              (batches of --batch rows, one person per object), which writes every chunk's
                              poses and images parts, then `RunFolder.totals` and `finish`
  orchestration_ms_per_object (freeze_s + commit_s) / N in milliseconds: flat from 10^4 to 10^6 is the bar
  resume_to_first_row_s       a run whose chunks are all committed but the last: what `run_label_job` does
                              before its pipeline starts (preflight, start, complete, freeze reuse,
                              committed_chunks, pending, ChunkWriter) plus reading the first pending input
                              chunk and adding its first row
  driver_peak_rss_mb          the subprocess's peak resident memory (VmHWM)
Each subprocess first runs the whole path once on 100 objects (imports, first calls), which is not counted.
The last line (with --json) is one JSON object with these figures as lists aligned with `objects`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jobs.bench.machine import describe_machine
from pipelines import preflight, storage
from pipelines.label import run_folder
from pipelines.label.job import ChunkWriter

PER_FOLDER = 1000  # objects per sub-folder of the generated prefix


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--objects", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="object counts to measure (default: 10000 100000 1000000)")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="objects per chunk (the job's default)")
    parser.add_argument("--batch", type=int, default=256, help="rows per assembled batch (the job's default)")
    parser.add_argument("--root", default=None, help="folder for the generated objects and runs (default: a "
                        "folder under the system temporary directory, kept between invocations)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one N in-process


def generate(root: Path, n: int) -> Path:
    """N zero-byte objects in folders of PER_FOLDER; reused when already there."""
    prefix = root / f"in-{n}"
    marker = root / f".in-{n}.done"
    if marker.exists():
        return prefix
    for folder in range(0, n, PER_FOLDER):
        directory = prefix / f"d{folder // PER_FOLDER:05d}"
        directory.mkdir(parents=True, exist_ok=True)
        for i in range(folder, min(n, folder + PER_FOLDER)):
            (directory / f"img{i:08d}.jpg").touch()
    marker.touch()
    return prefix


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_batch(inputs, start: int, stop: int) -> dict:
    """Assembled rows (`pipelines.label.ROW_COLUMNS`) for input rows [start, stop): status ok, one person."""
    n = stop - start

    def raw(value: bytes):  # np.full would turn bytes into np.bytes_ and drop trailing zero bytes
        column = np.empty(n, dtype=object)
        column[:] = [value] * n
        return column

    return {
        "input_index": inputs["input_index"][start:stop], "image_id": inputs["image_id"][start:stop],
        "uri": inputs["uri"][start:stop], "status": np.full(n, "ok", dtype=object),
        "error": np.full(n, "", dtype=object), "size_bytes": np.zeros(n, np.int64),
        "width": np.full(n, 640, np.int32), "height": np.full(n, 480, np.int32),
        "num_persons": np.ones(n, np.int32), "pose_keypoints": raw(np.ones((17, 3), np.float32).tobytes()),
        "pose_scores": raw(np.float32(0.5).tobytes()), "pose_boxes": raw(np.ones(4, np.float32).tobytes()),
    }


def read_inputs(folder, chunk: int) -> dict:

    with storage.open_binary(folder.input_chunk_uri(chunk), folder.options) as f:
        table = pq.read_table(f)
    return {"input_index": table["input_index"].to_numpy(),
            "image_id": np.asarray(table["image_id"].to_pylist(), dtype=object),
            "uri": np.asarray(table["uri"].to_pylist(), dtype=object)}


def warm_up(root: Path, batch: int) -> None:
    """The whole path once on 100 objects, so that imports and first calls are not counted in any N."""
    input_uri = str(generate(root, 100)) + "/"
    run = {"run_id": "warm", "settings": {}, "model_name": "bench", "model_version": "0"}
    folder = run_folder.RunFolder(str(root / "out-warm"))
    folder.start(run, overwrite=True)
    chunks, objects = folder.freeze_inputs(storage.iter_input_uris(input_uri), 50)
    writer = ChunkWriter(folder, run, 50, objects, list(range(chunks)), progress_interval_s=1e9)
    for chunk in range(chunks):
        inputs = read_inputs(folder, chunk)
        writer.add(synthetic_batch(inputs, 0, len(inputs["uri"])))
    folder.totals()
    folder.committed_chunks()


def measure_one(n: int, root: Path, chunk_size: int, batch: int) -> dict:
    prefix = generate(root, n)
    warm_up(root, batch)
    input_uri = str(prefix) + "/"
    output = str(root / f"out-{n}")
    run = {"run_id": run_folder.run_id_for({"bench": "scale", "n": n}), "settings": {"input": input_uri},
           "model_name": "bench", "model_version": "0"}
    folder = run_folder.RunFolder(output)
    folder.start(run, overwrite=True)

    started = time.perf_counter()
    chunks, objects = folder.freeze_inputs(storage.iter_input_uris(input_uri), chunk_size)
    freeze_s = time.perf_counter() - started
    assert objects == n, (objects, n)

    started = time.perf_counter()
    writer = ChunkWriter(folder, run, chunk_size, objects, list(range(chunks)), progress_interval_s=1e9)
    for chunk in range(chunks):
        inputs = read_inputs(folder, chunk)
        for start in range(0, len(inputs["uri"]), batch):
            writer.add(synthetic_batch(inputs, start, min(start + batch, len(inputs["uri"]))))
    writer.check_done()
    totals = folder.totals()
    folder.finish({**run, "objects": objects, "chunks": chunks, "counts": totals["status"]})
    commit_s = time.perf_counter() - started
    assert totals["images"] == n and totals["persons"] == n, totals

    # a run committed but for its last chunk (killed before it): remove that chunk's parts and the markers
    last = chunks - 1
    for name in ("_SUCCESS", "_manifest.json", f"images/{run_folder.part_name(last)}",
                 f"poses/{run_folder.part_name(last)}"):
        os.remove(os.path.join(output, name))

    started = time.perf_counter()
    preflight.check_input(input_uri)
    preflight.check_output(output)
    folder = run_folder.RunFolder(output)
    resumed = folder.start(run, overwrite=False)
    assert resumed and folder.complete() is None
    chunks_again, objects_again = folder.freeze_inputs(storage.iter_input_uris(input_uri), chunk_size)
    pending = sorted(set(range(chunks_again)) - folder.committed_chunks())
    writer = ChunkWriter(folder, run, chunk_size, objects_again, pending, progress_interval_s=1e9)
    [folder.input_chunk_uri(c) for c in pending]  # what build_dataset receives
    inputs = read_inputs(folder, pending[0])
    writer.add(synthetic_batch(inputs, 0, 1))
    resume_s = time.perf_counter() - started
    assert pending == [last], pending

    return {"objects": n, "chunks": chunks, "freeze_s": round(freeze_s, 3), "commit_s": round(commit_s, 3),
            "orchestration_ms_per_object": round((freeze_s + commit_s) / n * 1000, 5),
            "resume_to_first_row_s": round(resume_s, 3), "driver_peak_rss_mb": round(peak_rss_mb(), 1)}


def main(args: argparse.Namespace) -> int:
    root = Path(args.root or os.path.join(tempfile.gettempdir(), "simplepose-bench-scale"))
    root.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(measure_one(args.one, root, args.chunk_size, args.batch)))
        return 0

    print(f"machine: {describe_machine()}")
    print(f"chunk size {args.chunk_size}, batches of {args.batch} rows, objects under {root}")
    results = []
    for n in args.objects:
        command = [sys.executable, "-m", "jobs.bench.scale", "--one", str(n), "--root", str(root),
                   "--chunk-size", str(args.chunk_size), "--batch", str(args.batch)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{n:>9} objects: freeze {result['freeze_s']:.2f} s, commit path {result['commit_s']:.2f} s, "
              f"{result['orchestration_ms_per_object']:.4f} ms/object, resume to first row "
              f"{result['resume_to_first_row_s']:.2f} s, driver peak RSS {result['driver_peak_rss_mb']:.0f} MB "
              f"(subprocess {time.perf_counter() - started:.0f} s with generation)", flush=True)
    if args.json:
        keys = ("objects", "chunks", "freeze_s", "commit_s", "orchestration_ms_per_object",
                "resume_to_first_row_s", "driver_peak_rss_mb")
        print(json.dumps({key: [r[key] for r in results] for key in keys}))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
