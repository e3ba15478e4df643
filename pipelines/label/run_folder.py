"""The output folder of a labeling run: run identity, frozen input chunks, committed parts, success marker.

    OUTPUT/_run.json                    run id and settings (written first; a re-run must match it)
    OUTPUT/_inputs/part-NNNNNN.parquet  the run's input list, frozen in chunks (input_index, image_id, uri)
    OUTPUT/_inputs/_complete.json       written once every input chunk is frozen
    OUTPUT/poses/part-NNNNNN.parquet    persons of chunk N
    OUTPUT/images/part-NNNNNN.parquet   one row per object of chunk N: written last, it commits the chunk
    OUTPUT/_manifest.json, _SUCCESS     written after every chunk is committed; `_SUCCESS` is the very last

Exactly once: chunk N's rows are written only when all of them are known, poses first, then images, each
atomically and under a fixed name, so a crash at any point leaves either a committed chunk or one that a
re-run recomputes and overwrites. Freezing the input list means a re-run sees the same chunks even if the
prefix changed meanwhile. Folders starting with `_` are ignored by pyarrow, Spark and DuckDB globs.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.label import tables
from pipelines.errors import NoInputError

LOG = logging.getLogger(__name__)

INPUT_SCHEMA = pa.schema([("input_index", pa.int64()), ("image_id", pa.string()), ("uri", pa.string())])


def part_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


def chunk_of(name: str) -> int | None:
    """Chunk number of a part file name, None for anything else (temporary files, markers)."""
    if name.startswith("part-") and name.endswith(".parquet"):
        digits = name[5:-8]
        return int(digits) if digits.isdigit() else None
    return None


def run_id_for(settings: Mapping[str, object]) -> str:
    """A deterministic run id: the same inputs, model and options give the same id (16 hex digits)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunFolder:
    """Reads and writes one run's output folder (`output`: any fsspec URI)."""

    def __init__(self, output: str, storage_options: Mapping | None = None):
        self.output, self.options = output.rstrip("/"), dict(storage_options or {})

    def uri(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    def read_json(self, name: str) -> dict | None:
        text = storage.read_text(self.uri(name), self.options)
        return json.loads(text) if text is not None else None

    def write_json(self, name: str, value: dict) -> None:
        storage.write_atomic(self.uri(name), json.dumps(value, indent=2, sort_keys=True).encode(), self.options)

    def start(self, run: dict, overwrite: bool) -> bool:
        """Claim the folder for `run` (a dict with "run_id"); returns True when resuming the same run.

        A folder holding another run is an error unless `overwrite`, which deletes this job's own files
        (never anything else under OUTPUT).
        """
        previous = self.read_json("_run.json")
        if previous is not None and overwrite:
            LOG.warning("--overwrite: deleting run %s in %s", previous.get("run_id"), self.output)
            for name in ("_SUCCESS", "_manifest.json", "images", "poses", "_inputs", "_run.json"):
                storage.remove_tree(self.uri(name), self.options)
            previous = None
        if previous is not None and previous.get("run_id") != run["run_id"]:
            raise ValueError(f"{self.output} holds run {previous.get('run_id')} made with other inputs, model or "
                             f"options ({_differences(previous, run)}); pass --overwrite to replace it or "
                             f"choose another OUTPUT")
        if previous is None:
            self.write_json("_run.json", run)
        return previous is not None

    def complete(self) -> dict | None:
        """The manifest of a finished run (None unless `_SUCCESS` exists)."""
        if not storage.exists(self.uri("_SUCCESS"), self.options):
            return None
        return self.read_json("_manifest.json")

    def freeze_inputs(self, uris: Iterable[tuple[str, str]], chunk_size: int) -> tuple[int, int]:
        """Write the input list in chunks of `chunk_size` (once per run); returns (chunks, objects).

        `uris` is consumed as a stream, so a manifest of millions of URIs never sits in memory whole.
        """
        done = self.read_json("_inputs/_complete.json")
        if done is not None:
            return done["chunks"], done["objects"]
        chunks = objects = 0
        ids: list[str] = []
        paths: list[str] = []
        for image_id, uri in uris:
            ids.append(image_id)
            paths.append(uri)
            if len(paths) == chunk_size:
                self._write_input_chunk(chunks, objects, ids, paths)
                chunks, objects, ids, paths = chunks + 1, objects + len(paths), [], []
        if paths:
            self._write_input_chunk(chunks, objects, ids, paths)
            chunks, objects = chunks + 1, objects + len(paths)
        if objects == 0:
            raise NoInputError(f"INPUT {self._forget_empty_run()!r} matched no objects (names starting with _ "
                               f"or . are skipped); nothing was left in {self.output}",
                               "check the prefix, glob or manifest; the corrected run needs no --overwrite")
        self.write_json("_inputs/_complete.json", {"chunks": chunks, "objects": objects})
        LOG.info("input list frozen: %d objects in %d chunks of up to %d", objects, chunks, chunk_size)
        return chunks, objects

    def _forget_empty_run(self) -> str:
        """Remove the claim of a run whose input is empty (it has nothing to keep), so that a corrected
        re-run needs no --overwrite; returns the run's INPUT as recorded in `_run.json`."""
        run = self.read_json("_run.json") or {}
        if not self.committed_chunks():
            for name in ("_inputs", "_run.json"):
                storage.remove_tree(self.uri(name), self.options)
        return str((run.get("settings") or {}).get("input", "of the run"))

    def _write_input_chunk(self, chunk: int, start: int, ids: list[str], uris: list[str]) -> None:
        table = pa.table({"input_index": np.arange(start, start + len(uris), dtype=np.int64), "image_id": ids,
                          "uri": uris}, schema=INPUT_SCHEMA)
        storage.write_atomic(self.uri("_inputs", part_name(chunk)), tables.to_parquet_bytes(table), self.options)

    def input_chunk_uri(self, chunk: int) -> str:
        return self.uri("_inputs", part_name(chunk))

    def committed_chunks(self) -> set[int]:
        names = storage.list_names(self.uri("images"), self.options)
        return {c for c in map(chunk_of, names) if c is not None}

    def write_chunk(self, chunk: int, images: pa.Table, poses: pa.Table) -> None:
        """Commit one chunk: poses first, then images (the commit)."""
        storage.write_atomic(self.uri("poses", part_name(chunk)), tables.to_parquet_bytes(poses), self.options)
        storage.write_atomic(self.uri("images", part_name(chunk)), tables.to_parquet_bytes(images), self.options)

    def totals(self) -> dict:
        """Counts over every committed images part: {"status": {status: n}, "images": n, "persons": n}."""
        fs, path = storage.filesystem(self.uri("images"), self.options)
        files = sorted(p for p in fs.find(path) if chunk_of(p.rsplit("/", 1)[-1]) is not None)
        status: dict[str, int] = {}
        images = persons = 0
        for file in files:
            with fs.open(file, "rb") as f:
                table = pq.read_table(f, columns=["status", "num_persons"])
            values, counts = np.unique(np.asarray(table["status"].to_pylist(), dtype=object), return_counts=True)
            for value, count in zip(values, counts):
                status[str(value)] = status.get(str(value), 0) + int(count)
            images += table.num_rows
            persons += int(pc.sum(table["num_persons"]).as_py() or 0)
        return {"status": status, "images": images, "persons": persons, "parts": len(files)}

    def finish(self, manifest: dict) -> None:
        """Write the manifest, then `_SUCCESS` last: readers trust a run only when `_SUCCESS` exists."""
        self.write_json("_manifest.json", manifest)
        storage.write_atomic(self.uri("_SUCCESS"), b"", self.options)


def _differences(previous: Mapping, run: Mapping) -> str:
    old, new = previous.get("settings", {}), run.get("settings", {})
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "changed: " + ", ".join(changed) if changed else "different run id"
