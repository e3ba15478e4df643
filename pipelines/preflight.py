"""Checks of a labeling run's arguments before anything is written to its output folder.

`check_label_job(config)` runs first in `run_label_job`: INPUT exists (a manifest file, a glob's folder, an
object or a prefix holding objects), OUTPUT is a folder (not a file, nor below one) that can be written, and
the store answers with the given credentials and endpoint. Each failure is a `pipelines.errors.JobError`
naming INPUT or OUTPUT and what to check. The model is checked by `pipelines.registry.describe_model` (it
reads its metadata anyway), also before the folder is claimed. The checks are cheap: existence tests, no
listing of a whole prefix.
"""
from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Mapping

from pipelines import storage
from pipelines.errors import JobError, NoInputError, UsageError, about

LOG = logging.getLogger(__name__)

_GLOB = "*?["


def check_label_job(config) -> None:
    """Raise a JobError / UsageError naming INPUT or OUTPUT unless both look usable (`LabelJobConfig`)."""
    check_input(config.input, config.storage_options)
    check_output(config.output, config.storage_options)


def _filesystem(role: str, uri: str, options: Mapping | None):
    try:
        return storage.filesystem(uri, options)
    except (ValueError, ImportError) as error:  # unknown protocol, or its fsspec driver is not installed
        raise UsageError(f"{role} {uri!r}: unsupported storage URI ({str(error).splitlines()[0][:160]})",
                         "use a local path, file://, s3://, gs://... (any installed fsspec protocol)") from error


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in storage.LOCAL_PROTOCOLS for p in protocols)


def _bucket_hint(fs, uri: str, path: str) -> str:
    """For an object store: whether the bucket itself exists (only called once the store has answered)."""
    if _is_local(fs) or "://" not in uri:
        return "check the path"
    bucket = path.split("/", 1)[0]
    try:
        if not fs.exists(bucket):
            return f"bucket {bucket!r} does not exist at this endpoint (check the URI and AWS_ENDPOINT_URL)"
    except Exception:  # noqa: BLE001 - the hint is best effort
        pass
    return f"check the prefix and what bucket {bucket!r} holds"


def check_input(uri: str, options: Mapping | None = None) -> None:
    """INPUT exists: a manifest is a file, a glob's fixed folder exists, else the object or prefix exists."""
    fs, path = _filesystem("INPUT", uri, options)
    with about("INPUT", uri, options):
        if storage.is_manifest(uri):
            if not fs.isfile(path):
                what = "is a folder, not a manifest file" if fs.exists(path) else "does not exist"
                raise NoInputError(f"INPUT manifest {uri!r} {what}", _bucket_hint(fs, uri, path))
            return
        if any(ch in path for ch in _GLOB):
            root = path[:min(path.index(ch) for ch in _GLOB if ch in path)].rsplit("/", 1)[0]
            if root and not fs.exists(root):
                raise NoInputError(f"INPUT {uri!r} matches no objects: {fs.unstrip_protocol(root)!r} does not "
                                   f"exist", _bucket_hint(fs, uri, path))
            return
        if not fs.exists(path):
            raise NoInputError(f"INPUT {uri!r} does not exist: no object or prefix of that name",
                               _bucket_hint(fs, uri, path))


def check_output(uri: str, options: Mapping | None = None) -> None:
    """OUTPUT is a folder (or can become one) and can be written; an object store's missing bucket is left to
    the run's first write, which creates it (as before)."""
    fs, path = _filesystem("OUTPUT", uri, options)
    path = path.rstrip("/") or path
    with about("OUTPUT", uri, options):
        if _is_local(fs):
            _check_local_output(uri, path)
            return
        if fs.isfile(path):
            raise JobError(f"OUTPUT {uri!r} is an object (a file), not a folder",
                           "choose a folder URI for the run's tables")
        fs.exists(path)  # raises for missing credentials or an unreachable endpoint
        bucket = path.split("/", 1)[0]
        if "://" in uri and bucket and not fs.exists(bucket):
            LOG.info("OUTPUT bucket %r does not exist: the run's first write creates it", bucket)
            return
        probe = posixpath.join(path, f"_write_check.{os.getpid()}.{time.monotonic_ns()}")
        fs.pipe_file(probe, b"")  # the store's permissions are known only by writing
        try:
            fs.rm_file(probe)
        except Exception as error:  # noqa: BLE001 - a write-only store keeps an empty probe object
            LOG.warning("could not delete the write check %s (%s)", probe, type(error).__name__)


def _check_local_output(uri: str, path: str) -> None:
    if os.path.isfile(path):
        raise JobError(f"OUTPUT {uri!r} is a file, not a folder", "choose a folder path for the run's tables")
    existing = path
    while existing and not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    existing = existing or "."
    if not os.path.isdir(existing):
        raise JobError(f"OUTPUT {uri!r} cannot be a folder: {existing!r} is a file",
                       "choose a folder path for the run's tables")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise JobError(f"OUTPUT {uri!r} is not writable: no write permission on {existing!r}",
                       "check the folder's owner and permissions, or choose another OUTPUT")


__all__ = ["check_label_job", "check_input", "check_output"]
