"""Object storage for the labeling job: URIs to filesystems, input listing, retried reads, atomic writes.

Every location is a URI that fsspec understands (`s3://bucket/key`, `file:///dir`, a plain path, `gs://`...).
Endpoints and credentials come from the standard settings (AWS_ENDPOINT_URL, AWS profiles, instance roles)
or from explicit `storage_options`; they are never logged: use `redact` before showing options.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
import time
from collections.abc import Iterator, Mapping

import pyarrow.fs
import pyarrow.parquet as pq
from fsspec.core import split_protocol, url_to_fs

LOG = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".parquet", ".csv", ".txt", ".lst")
"""An INPUT ending in one of these is a manifest: a list of object URIs, one per row or line."""

MANIFEST_URI_COLUMNS = ("uri", "url", "path")
"""Column names searched, in order, for the URIs in a Parquet or CSV manifest (else the first column)."""

SECRET_WORDS = ("secret", "token", "password", "key", "credential", "session")


def redact(options: Mapping[str, object]) -> dict[str, object]:
    """A copy of storage options safe to log: values of secret-looking keys become '***' (recursively)."""
    out: dict[str, object] = {}
    for name, value in options.items():
        if isinstance(value, Mapping):
            out[name] = redact(value)
        elif any(word in name.lower() for word in SECRET_WORDS):
            out[name] = "***"
        else:
            out[name] = value
    return out


def filesystem(uri: str, storage_options: Mapping[str, object] | None = None):
    """(fsspec filesystem, path without protocol) for `uri`; fsspec caches instances, so this is cheap."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"filesystem: expected a non-empty URI string, got {uri!r}")
    options = dict(storage_options or {})
    # fsspec caches instances by their arguments; an S3 instance reads AWS_ENDPOINT_URL only when created.
    # Passing the current value makes it part of the cache key, so a changed endpoint gets a new instance
    # instead of one bound to the old endpoint.
    if uri.startswith(("s3://", "s3a://")):
        if "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        options["config_kwargs"] = s3_config(options.get("config_kwargs"))
    return url_to_fs(uri, **options)


S3_CONFIG = {"retries": {"max_attempts": 5, "mode": "standard"}, "connect_timeout": 10, "read_timeout": 60}
"""botocore settings of every S3 filesystem unless `storage_options["config_kwargs"]` says otherwise: bounded
retries of throttling (503 SlowDown), 5xx, resets and timeouts with botocore's standard backoff, and timeouts
so that a stalled connection fails (and is retried) instead of hanging the job. s3fs retries on top."""


def s3_config(given: Mapping[str, object] | None) -> dict[str, object]:
    """`S3_CONFIG` updated with the caller's config_kwargs (its `retries` merged key by key)."""
    config = {**S3_CONFIG, **dict(given or {})}
    config["retries"] = {**S3_CONFIG["retries"], **dict((given or {}).get("retries") or {})}
    return config


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (`s3://b/out` + `poses` -> `s3://b/out/poses`)."""
    return posixpath.join(uri.rstrip("/"), *parts)


def unstrip(fs, path: str) -> str:
    """A full URI for a path that `fs` returned without its protocol (s3fs lists `bucket/key`)."""
    return fs.unstrip_protocol(path)


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


class ManifestError(ValueError):
    """A manifest that cannot be used as it is; the message names the manifest and the line (or row)."""


LOCAL_PROTOCOLS = ("file", "local")
"""Protocols that read the disk of the machine running the job."""


def iter_input_uris(input_uri: str, storage_options: Mapping[str, object] | None = None, *,
                    allow_local: bool = False) -> Iterator[tuple[str, str]]:
    """Yield (image_id, uri) for every input object, in a deterministic order.

    input_uri: a manifest (see `MANIFEST_SUFFIXES`; streamed, never loaded whole), a glob (`*`, `?`, `[`), a
    single object, or a prefix (every object below it, sorted, names starting with `_` or `.` skipped).
    image_id: the manifest's `image_id` column when it has one, else the object path relative to the
    prefix or glob root (the full URI for manifests), so ids are unique within a run.

    Manifest rules (docs/tables.md, "Inputs and manifests"): blank lines and cells are skipped (and `#`
    comment lines of text manifests); a relative path is relative to the manifest's folder; a duplicate
    URI (after that resolution) keeps its first occurrence, later ones are dropped with one warning that
    counts them; an `image_id` given twice for different URIs, bytes that are not UTF-8, and a local path
    or `file://` URI in a manifest on another storage (unless `allow_local`) raise `ManifestError`
    naming the manifest and the line (or Parquet row); so does a manifest without any object.
    allow_local: let a manifest on an object store name local paths (the workers' own disks); the CLI
    flag `--allow-local-paths`. Manifests on the local file system may always name local paths.
    """
    fs, path = filesystem(input_uri, storage_options)
    if is_manifest(input_uri):
        yield from _iter_manifest(fs, path, input_uri, allow_local)
        return
    if any(ch in path for ch in "*?["):
        root = path[:min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        paths = sorted(p for p in fs.glob(path) if not fs.isdir(p))
    elif fs.isfile(path):
        root, paths = posixpath.dirname(path), [path]
    elif _is_local(fs):
        root = path.rstrip("/")
        paths = _walk_sorted(root)  # streamed: a prefix of millions of files never sits in memory whole
    elif type(fs).__name__ == "S3FileSystem" and not getattr(fs, "version_aware", False):
        root = path.rstrip("/")
        paths = _list_s3_sorted(fs, root)  # streamed page by page, not kept in s3fs's listings cache
    else:
        root = path.rstrip("/")
        paths = sorted(fs.find(root))
    # per object only string slicing (posixpath.relpath and fs.unstrip_protocol cost microseconds each)
    base = unstrip(fs, root) if root else ""
    protocol = base[:-len(root)] if root and base.endswith(root) else None
    start = len(root) + 1
    for p in paths:
        rel = p[start:] if root and p.startswith(root + "/") else (posixpath.relpath(p, root) if root else p)
        if rel.startswith(("_", ".")) or "/_" in rel or "/." in rel:
            continue
        yield rel, (protocol + p) if protocol is not None else unstrip(fs, p)


def _list_s3_sorted(fs, root: str) -> Iterator[str]:
    """Every object below `root` ("bucket/prefix") as `sorted(fs.find(root))` gives it, one page of
    list_objects_v2 at a time (each page retried like any s3fs request). S3 lists keys in UTF-8 byte order,
    which is Python's string order; a store that does not is refused rather than given a wrong order."""
    bucket, _, key = root.partition("/")
    request = {"Bucket": bucket, "Prefix": key + "/" if key else "", **getattr(fs, "req_kw", {})}
    previous = ""
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        for entry in page.get("Contents", []):
            name = entry["Key"]  # folder placeholders ("x/") included, as s3fs.find includes them
            if name <= previous:
                raise RuntimeError(f"s3://{bucket}: the store listed {name!r} after {previous!r}, not in key "
                                   "order; list the input in a manifest instead")
            previous = name
            yield f"{bucket}/{name}"
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _walk_sorted(root: str) -> Iterator[str]:
    """Every file below the local folder `root` in the order of `sorted(fs.find(root))` (a folder's entries
    sorted as `name/` for folders, `name` for files), without a stat per file; folders whose names start
    with `_` or `.` are not entered (their files are skipped anyway)."""
    try:
        with os.scandir(root) as scan:
            entries = sorted(((e.name + "/" if e.is_dir() else e.name), e.path) for e in scan)
    except (FileNotFoundError, NotADirectoryError):
        return
    for key, entry_path in entries:
        if key.endswith("/"):
            if not key.startswith(("_", ".")):
                yield from _walk_sorted(entry_path)
        else:
            yield entry_path


def _iter_manifest(fs, path: str, manifest_uri: str, allow_local: bool) -> Iterator[tuple[str, str]]:
    """The manifest's entries resolved, checked and deduplicated (see `iter_input_uris`)."""
    resolve = _EntryResolver(fs, path, manifest_uri, allow_local)
    seen_uris: set[bytes] = set()
    seen_ids: set[bytes] = set()
    objects = duplicates = 0
    first_duplicate = ""
    for where, image_id, entry in _manifest_entries(fs, path, manifest_uri):
        uri = resolve(entry, where)
        key = _digest(uri)
        if key in seen_uris:
            duplicates += 1
            first_duplicate = first_duplicate or f"{where} ({uri})"
            continue
        seen_uris.add(key)
        if image_id is None:
            image_id = uri
        else:
            id_key = _digest(image_id)
            if id_key in seen_ids:
                raise ManifestError(f"manifest {manifest_uri} {where}: image_id {image_id!r} was given before "
                                    f"for another URI; image ids must be unique")
            seen_ids.add(id_key)
        objects += 1
        yield image_id, uri
    if duplicates:
        LOG.warning("manifest %s: %d duplicate URIs dropped (the first occurrence of each is kept; first "
                    "duplicate at %s)", manifest_uri, duplicates, first_duplicate)
    if not objects:
        raise ManifestError(f"manifest {manifest_uri}: no objects (only a header, blank lines or comments)")


def _digest(text: str) -> bytes:
    """16 bytes standing for `text` in the duplicate checks (a set of millions of them stays small)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _EntryResolver:
    """One manifest entry to a full URI: relative paths against the manifest's folder, local ones checked."""

    def __init__(self, fs, path: str, manifest_uri: str, allow_local: bool):
        self.fs, self.manifest_uri, self.allow_local = fs, manifest_uri, allow_local
        self.folder = posixpath.dirname(path)
        self.local_manifest = _is_local(fs)
        self.bucket = "" if self.local_manifest else path.split("/", 1)[0]

    def __call__(self, entry: str, where: str) -> str:
        if "://" in entry or "::" in entry:  # a URI (or a chained one, e.g. simplecache::s3://...)
            protocols = [_protocol(part) for part in entry.split("::")]
            if any(p is None or p in LOCAL_PROTOCOLS for p in protocols):
                self._check_local(entry, where)
            return entry
        if entry.startswith("/"):  # an absolute local path
            self._check_local(entry, where)
            return entry if not self.local_manifest else self.fs.unstrip_protocol(posixpath.normpath(entry))
        resolved = posixpath.normpath(posixpath.join(self.folder, entry))
        if resolved.startswith("..") or (self.bucket and not resolved.startswith(self.bucket + "/")):
            raise ManifestError(f"manifest {self.manifest_uri} {where}: relative path {entry!r} leaves the "
                                f"manifest's {'bucket' if self.bucket else 'file system root'}")
        return self.fs.unstrip_protocol(resolved)

    def _check_local(self, entry: str, where: str) -> None:
        if not self.local_manifest and not self.allow_local:
            raise ManifestError(
                f"manifest {self.manifest_uri} {where}: {entry!r} is a path on the workers' local disk, but "
                "the manifest is on another storage; use a full URI (s3://...), or allow local paths "
                "explicitly (allow_local=True, --allow-local-paths)")


def _protocol(part: str) -> str | None:
    """The protocol of one part of a (chained) URL: `s3` for `s3://b/k`, `simplecache` for `simplecache`,
    None for a plain path."""
    protocol = split_protocol(part)[0]
    if protocol is None and part and "/" not in part and all(c.isalnum() or c in "+-._" for c in part):
        return part
    return protocol


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in LOCAL_PROTOCOLS for p in protocols)


def _manifest_entries(fs, path: str, manifest_uri: str) -> Iterator[tuple[str, str | None, str]]:
    """(where, image_id or None, entry) per non-blank entry; where is "line N" or "row N" (1-based)."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if not names:
                raise ManifestError(f"manifest {manifest_uri}: a Parquet file without columns")
            column = next((c for c in MANIFEST_URI_COLUMNS if c in names), names[0])
            columns = [column] + (["image_id"] if "image_id" in names and column != "image_id" else [])
            row = 0
            for batch in parquet.iter_batches(columns=columns, batch_size=65536):
                uris = batch.column(column).to_pylist()
                ids = batch.column("image_id").to_pylist() if len(columns) == 2 else [None] * len(uris)
                for image_id, uri in zip(ids, uris):
                    row += 1
                    where = f"row {row}"
                    uri = _cell_text(uri, manifest_uri, where)
                    if uri:
                        yield where, _cell_text(image_id, manifest_uri, where) or None, uri
    elif lower.endswith(".csv"):
        with fs.open(path, "rb") as f:
            lines = _utf8_lines(f, manifest_uri)
            reader = csv.reader(lines)
            names = next(reader, None)
            if not names or not any(n.strip() for n in names):
                raise ManifestError(f"manifest {manifest_uri}: empty CSV (expected a header with a 'uri' column)")
            names = [n.strip() for n in names]
            column = names.index(next((c for c in MANIFEST_URI_COLUMNS if c in names), names[0]))
            id_column = names.index("image_id") if "image_id" in names and names[column] != "image_id" else None
            for cells in reader:
                uri = cells[column].strip() if column < len(cells) else ""
                if uri:
                    image_id = cells[id_column].strip() if id_column is not None and id_column < len(cells) else ""
                    yield f"line {reader.line_num}", image_id or None, uri
    else:
        with fs.open(path, "rb") as f:
            for number, line in enumerate(_utf8_lines(f, manifest_uri), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    yield f"line {number}", None, line


def _cell_text(value: object, manifest_uri: str, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"manifest {manifest_uri} {where}: not UTF-8 text ({exc.reason} at byte "
                                f"{exc.start}: {value[:80]!r})") from None
    return str(value).strip()


def _utf8_lines(f, manifest_uri: str) -> Iterator[str]:
    """The lines of a binary file as text (a UTF-8 byte order mark dropped); a clear error on other bytes."""
    for number, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"manifest {manifest_uri} line {number}: not UTF-8 text ({exc.reason} at byte "
                                f"{exc.start} of the line: {raw[:80]!r})") from None
        yield line[1:] if number == 1 and line.startswith("\ufeff") else line


# Errors that retrying cannot fix; everything else from a store (timeouts, 5xx, throttling, connection
# resets) is treated as transient.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


def read_objects(uris: list[str], storage_options: Mapping[str, object] | None = None,
                 retries: int = 3, backoff_s: float = 0.2) -> list[bytes | BaseException]:
    """Read whole objects; one entry per URI: its bytes, or the exception that made it unreadable.

    Objects on one filesystem are fetched concurrently (`fs.cat` of a list). Transient errors are retried
    `retries` times with exponential backoff starting at `backoff_s` seconds; permanent ones (missing,
    forbidden) are returned at once.
    """
    results: list[bytes | BaseException] = [b""] * len(uris)
    pending = list(range(len(uris)))
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        failed = []
        for index, outcome in _cat_grouped([uris[i] for i in pending], storage_options):
            i = pending[index]
            results[i] = outcome
            if isinstance(outcome, BaseException) and not isinstance(outcome, PERMANENT_ERRORS):
                failed.append(i)
        if not failed:
            break
        LOG.debug("retrying %d of %d reads (attempt %d)", len(failed), len(uris), attempt + 1)
        pending = failed
    return results


def _cat_grouped(uris: list[str], storage_options) -> Iterator[tuple[int, bytes | BaseException]]:
    """fs.cat per filesystem (URIs of one batch nearly always share one); yields (position, outcome)."""
    groups: dict[int, tuple[object, list[tuple[int, str]]]] = {}
    for i, uri in enumerate(uris):
        try:
            fs, path = filesystem(uri, storage_options)
        except Exception as error:  # an unknown protocol is this object's problem, not the batch's
            yield i, error
            continue
        groups.setdefault(id(fs), (fs, []))[1].append((i, path))
    for fs, members in groups.values():
        paths = [p for _, p in members]
        # s3fs with max_concurrency > 1 (its default, 10) sends a HEAD before each GET to decide on ranged
        # parts; objects of a batch are read whole, so one GET each: half the requests and round trips.
        whole = {"max_concurrency": 1} if getattr(fs, "max_concurrency", 1) > 1 else {}
        try:
            fetched = fs.cat(paths, on_error="return", **whole)
        except Exception as error:  # the whole request failed: every object gets the error (and a retry)
            fetched = {p: error for p in paths}
        for i, p in members:
            outcome = fetched.get(p, fetched.get(fs._strip_protocol(p), FileNotFoundError(p)))
            yield i, outcome


class StorageWriteError(OSError):
    """A write that still failed after its retries; the message names the object's URI."""


WRITE_RETRIES = 4
WRITE_BACKOFF_S = 0.5


def write_atomic(uri: str, data: bytes, storage_options: Mapping[str, object] | None = None,
                 retries: int | None = None, backoff_s: float | None = None) -> None:
    """Write `data` to `uri` so that readers see either nothing or the whole object.

    Object stores make a single PUT atomic; on other filesystems the bytes go to a hidden temporary name
    in the same folder first and are renamed into place. Transient errors (anything but the permanent
    ones, `PERMANENT_ERRORS`) are retried `retries` times (default `WRITE_RETRIES`) with exponential
    backoff from `backoff_s` seconds, on top of botocore's and s3fs's own retries; a write that still
    fails raises `StorageWriteError` naming `uri`. Rewriting the same name is harmless (same bytes).
    """
    retries = WRITE_RETRIES if retries is None else retries
    backoff_s = WRITE_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            return _write_atomic_once(uri, data, storage_options)
        except PERMANENT_ERRORS:
            raise
        except Exception as error:  # noqa: BLE001 - transient store errors: retried, then reported
            last = error
            LOG.warning("writing %s failed (attempt %d of %d): %s: %s", uri, attempt + 1, retries + 1,
                        type(error).__name__, error)
    raise StorageWriteError(f"could not write {uri} after {retries + 1} attempts (each with the store "
                            f"client's own retries): {type(last).__name__}: {last}") from last


def _write_atomic_once(uri: str, data: bytes, storage_options: Mapping[str, object] | None) -> None:
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if _is_object_store(fs):
        fs.pipe_file(path, data)
        return
    directory, name = posixpath.split(path)
    temporary = posixpath.join(directory, f".{name}.{time.monotonic_ns()}.tmp")
    fs.pipe_file(temporary, data)
    fs.mv(temporary, path)


def _is_object_store(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return not any(p in ("file", "local", "memory") for p in protocols)


def read_text(uri: str, storage_options: Mapping[str, object] | None = None) -> str | None:
    """The object's text, or None when it does not exist."""
    fs, path = filesystem(uri, storage_options)
    try:
        return fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        return None


def exists(uri: str, storage_options: Mapping[str, object] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def list_names(uri: str, storage_options: Mapping[str, object] | None = None) -> set[str]:
    """Base names of the objects directly under `uri` (empty when it does not exist)."""
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache(path)
    try:
        return {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return set()


def remove_tree(uri: str, storage_options: Mapping[str, object] | None = None) -> None:
    """Delete everything under `uri` (used only for --overwrite of the job's own output folders)."""
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def open_binary(uri: str, storage_options: Mapping[str, object] | None = None) -> io.BufferedIOBase:
    """An open binary file object for reading `uri` (caller closes it)."""
    fs, path = filesystem(uri, storage_options)
    return fs.open(path, "rb")


def arrow_filesystem(uri: str, storage_options: Mapping[str, object] | None = None):
    """(pyarrow filesystem, path without protocol) for `uri`: `filesystem`'s fsspec filesystem (the same endpoint,
    credentials and S3 retries) wrapped for pyarrow users, e.g. Ray Train's `RunConfig(storage_filesystem=...)`."""
    fs, path = filesystem(uri, storage_options)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
