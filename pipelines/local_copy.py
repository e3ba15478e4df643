"""A labeling run copied to a local folder together with its images, so that the copy works on its own.

The tables name each image by its URI; a copy of a run whose images lived on a server that is gone (the demo's
loopback S3 server) would point nowhere. `copy_run_with_images` copies the run's files, then every image an
`images` row names, and rewrites the `uri` column of both tables to the local copies (file:// URIs).
"""
from __future__ import annotations

import posixpath
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage


def copy_run_with_images(run_uri: str, folder: Path, storage_options: Mapping | None = None) -> int:
    """Copy the run at `run_uri` into `folder` (tables as they are, images under `folder/_source_images/` (a
    leading `_`: table readers skip it), by
    their path below the run's common image prefix) and point the copied tables' `uri` at the local images.
    Returns the number of images copied. Object-store credentials: `storage_options` or the standard settings."""
    fs, run_path = storage.filesystem(run_uri, storage_options)
    folder.mkdir(parents=True, exist_ok=True)
    fs.get(f"{run_path}/", f"{folder}/", recursive=True)  # trailing slashes: copy the contents
    uris = sorted(set(pq.read_table(folder / "images", columns=["uri"])["uri"].to_pylist()))
    if not uris:
        return 0
    prefix = posixpath.commonpath([uri.split("://", 1)[-1] for uri in uris]) if len(uris) > 1 else \
        posixpath.dirname(uris[0].split("://", 1)[-1])
    images = folder / "_source_images"
    local: dict[str, str] = {}
    for uri in uris:
        target = images / posixpath.relpath(uri.split("://", 1)[-1], prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with storage.open_binary(uri, storage_options) as source:
                target.write_bytes(source.read())
        except FileNotFoundError:  # a read_error row: the object was never there; its URI stays as it was
            continue
        local[uri] = target.resolve().as_uri()
    for table_name in ("images", "poses"):
        for part in sorted((folder / table_name).glob("*.parquet")):
            table = pq.read_table(part)
            mapping = pa.array([local.get(uri, uri) for uri in table["uri"].to_pylist()], pa.string())
            index = table.schema.get_field_index("uri")
            table = table.set_column(index, table.schema.field(index), mapping)
            pq.write_table(table, part, compression="zstd")
    return len(local)

