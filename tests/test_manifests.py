"""Manifests as labeling inputs (`pipelines.storage.iter_input_uris`): the rules of docs/tables.md,
"Inputs and manifests", on local files and on a real S3-protocol server (moto's, on loopback)."""
from __future__ import annotations

import logging
import uuid

import boto3
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.storage import ManifestError, iter_input_uris


def entries(manifest, **options):
    return list(iter_input_uris(str(manifest), **options))


def test_blank_lines_comments_and_whitespace_are_skipped(tmp_path):
    (tmp_path / "list.txt").write_text("\n# a comment\n  s3://b/1.jpg  \n\n\t\ns3://b/2.jpg\r\n   \n")
    assert entries(tmp_path / "list.txt") == [("s3://b/1.jpg",) * 2, ("s3://b/2.jpg",) * 2]
    (tmp_path / "m.csv").write_text("uri,image_id\r\ns3://b/1.jpg,one\r\n,\r\n  ,x\r\n\r\ns3://b/2.jpg,\r\n")
    assert entries(tmp_path / "m.csv") == [("one", "s3://b/1.jpg"), ("s3://b/2.jpg", "s3://b/2.jpg")]


def test_duplicates_keep_the_first_occurrence_with_one_warning(tmp_path, caplog):
    (tmp_path / "list.txt").write_text("s3://b/1.jpg\ns3://b/2.jpg\ns3://b/1.jpg\ns3://b/3.jpg\ns3://b/2.jpg\n"
                                       "s3://b/1.jpg\n")
    with caplog.at_level(logging.WARNING, logger="pipelines.storage"):
        found = entries(tmp_path / "list.txt")
    assert [u for _, u in found] == ["s3://b/1.jpg", "s3://b/2.jpg", "s3://b/3.jpg"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 duplicate URIs dropped" in warnings[0] and "line 3" in warnings[0]
    # the same object written two ways (relative, ./, ..) is one duplicate too
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "rel.txt").write_text(f"a.jpg\n./a.jpg\nsub/../a.jpg\n{tmp_path}/a.jpg\nfile://{tmp_path}/a.jpg\n")
    assert [u for _, u in entries(tmp_path / "rel.txt")] == [f"file://{tmp_path}/a.jpg"]


def test_duplicate_image_ids_for_different_uris_are_an_error(tmp_path):
    (tmp_path / "m.csv").write_text("image_id,uri\n7,s3://b/7.jpg\n8,s3://b/8.jpg\n7,s3://b/other.jpg\n")
    with pytest.raises(ManifestError, match=r"m\.csv line 4: image_id '7' was given before"):
        entries(tmp_path / "m.csv")
    (tmp_path / "same.csv").write_text("image_id,uri\n7,s3://b/7.jpg\n7,s3://b/7.jpg\n")  # a plain duplicate
    assert entries(tmp_path / "same.csv") == [("7", "s3://b/7.jpg")]


def test_relative_paths_are_relative_to_the_manifest_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the working directory: the manifest's folder
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "list.txt").write_text("a.jpg\nimgs/b.jpg\n../c.jpg\n/abs/d.jpg\n")
    assert [u for _, u in entries(folder / "list.txt")] == [
        f"file://{folder}/a.jpg", f"file://{folder}/imgs/b.jpg", f"file://{tmp_path}/c.jpg", "file:///abs/d.jpg"]
    (folder / "m.csv").write_text("path\nimgs/b.jpg\n")
    assert entries(folder / "m.csv") == [(f"file://{folder}/imgs/b.jpg",) * 2]


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_non_utf8_bytes_are_an_error_naming_the_manifest_and_the_line(tmp_path, suffix):
    head = b"uri\n" if suffix == ".csv" else b""
    manifest = tmp_path / f"list{suffix}"
    manifest.write_bytes(head + b"s3://b/1.jpg\ns3://b/caf\xe9.jpg\ns3://b/3.jpg\n")  # Latin-1 e-acute
    line = 3 if suffix == ".csv" else 2
    with pytest.raises(ManifestError, match=rf"manifest .*list\{suffix} line {line}: not UTF-8 text"):
        entries(manifest)
    manifest.write_bytes(b"\xef\xbb\xbf" + head + "s3://b/café.jpg\n".encode())  # a BOM and UTF-8 are fine
    assert [u for _, u in entries(manifest)] == ["s3://b/café.jpg"]


def test_non_utf8_parquet_cell_names_the_row(tmp_path):
    table = pa.table({"uri": pa.array([b"s3://b/1.jpg", b"s3://b/\xff.jpg"], pa.binary())})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"m\.parquet row 2: not UTF-8 text"):
        entries(tmp_path / "m.parquet")


def test_manifests_without_objects_are_an_error(tmp_path):
    (tmp_path / "header.csv").write_text("image_id,uri\n")
    (tmp_path / "blank.csv").write_text("uri\n\n,\n")
    (tmp_path / "comments.txt").write_text("# nothing here\n\n")
    pq.write_table(pa.table({"uri": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    for name in ("header.csv", "blank.csv", "comments.txt", "empty.parquet"):
        with pytest.raises(ManifestError, match=rf"manifest .*{name}: no objects"):
            entries(tmp_path / name)
    (tmp_path / "nothing.csv").write_text("")
    with pytest.raises(ManifestError, match="empty CSV"):
        entries(tmp_path / "nothing.csv")


# -------------------------------------------------------------------------------------------------------
# Manifests on S3: local paths refused unless allowed, relative paths within the bucket.

@pytest.fixture
def bucket(s3_endpoint):
    name = f"manifests-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def put(s3_endpoint, uri: str, data: bytes) -> str:
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint)
    fs.pipe_file(uri, data)
    fs.invalidate_cache()
    return uri


@pytest.mark.parametrize("entry", ["/etc/passwd", "file:///etc/passwd", "local:///etc/hostname",
                                   "simplecache::file:///etc/passwd", "zip://a.jpg::/tmp/archive.zip"])
def test_local_paths_in_an_s3_manifest_are_refused_unless_allowed(s3_endpoint, bucket, entry):
    manifest = put(s3_endpoint, f"s3://{bucket}/lists/list.txt", f"s3://{bucket}/a.jpg\n\n{entry}\n".encode())
    with pytest.raises(ManifestError, match=rf"list\.txt line 3: '{entry}' is a path on the workers' local disk"):
        entries(manifest)
    with pytest.raises(ManifestError, match="allow_local=True, --allow-local-paths"):
        entries(manifest)
    assert [u for _, u in entries(manifest, allow_local=True)][0] == f"s3://{bucket}/a.jpg"
    assert len(entries(manifest, allow_local=True)) == 2


def test_s3_manifest_relative_paths_duplicates_and_other_stores(s3_endpoint, bucket):
    text = (f"a.jpg\n./a.jpg\nimgs/b.jpg\n../c.jpg\ns3://{bucket}/lists/imgs/b.jpg\ns3://other-bucket/d.jpg\n"
            "gs://elsewhere/e.jpg\n")
    manifest = put(s3_endpoint, f"s3://{bucket}/lists/list.txt", text.encode())
    assert [u for _, u in entries(manifest)] == [
        f"s3://{bucket}/lists/a.jpg", f"s3://{bucket}/lists/imgs/b.jpg", f"s3://{bucket}/c.jpg",
        "s3://other-bucket/d.jpg", "gs://elsewhere/e.jpg"]
    escaping = put(s3_endpoint, f"s3://{bucket}/lists/up.txt", b"a.jpg\n../../other-bucket/x.jpg\n")
    with pytest.raises(ManifestError, match=r"up\.txt line 2: relative path '../../other-bucket/x.jpg' leaves "
                                            r"the manifest's bucket"):
        entries(escaping)


def test_s3_csv_and_parquet_manifests(s3_endpoint, bucket):
    csv_uri = put(s3_endpoint, f"s3://{bucket}/m.csv", b"image_id,uri\nx,imgs/1.jpg\ny,/data/2.jpg\n")
    with pytest.raises(ManifestError, match=r"m\.csv line 3: '/data/2.jpg' is a path on the workers' local"):
        entries(csv_uri)
    assert entries(csv_uri, allow_local=True) == [("x", f"s3://{bucket}/imgs/1.jpg"), ("y", "/data/2.jpg")]
    header_only = put(s3_endpoint, f"s3://{bucket}/header.csv", b"uri\n")
    with pytest.raises(ManifestError, match=r"header\.csv: no objects"):
        entries(header_only)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"url": ["1.jpg", None, "", "1.jpg", "file:///x.jpg"]}), sink)
    parquet_uri = put(s3_endpoint, f"s3://{bucket}/m.parquet", sink.getvalue().to_pybytes())
    with pytest.raises(ManifestError, match=r"m\.parquet row 5: 'file:///x.jpg'"):
        entries(parquet_uri)
    assert entries(parquet_uri, allow_local=True) == [(f"s3://{bucket}/1.jpg",) * 2, ("file:///x.jpg",) * 2]
