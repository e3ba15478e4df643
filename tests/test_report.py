"""pipelines.report / `simplepose report`: the HTML page of a labeling run, built here from coco-mini images
whose "detections" are their COCO keypoint annotations, in two chunks, plus failed objects."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from pipelines import storage
from pipelines.label import run_folder, tables
from pipelines.report import CHARTS_HINT, build_report, write_report
from simplepose.skeleton import COCO_KEYPOINTS

N_IMAGES = 10


def write_run(root: str, coco_mini, complete: bool = True, with_persons: bool = True) -> dict:
    """A run in ROOT/run over N_IMAGES coco-mini JPEGs uploaded under ROOT/src plus an empty and a truncated
    object, in two chunks; persons are the images' COCO annotations (none when not `with_persons`). Returns
    the expected counts."""
    annotations = json.loads((coco_mini / "annotations" / "person_keypoints_train2017.json").read_text())
    by_file = {im["file_name"]: im for im in annotations["images"]}
    people: dict[int, list] = {}
    for ann in annotations["annotations"]:
        if ann.get("num_keypoints", 0) > 0 and not ann.get("iscrowd"):
            people.setdefault(ann["image_id"], []).append(ann)
    files = sorted((coco_mini / "train2017").glob("*.jpg"))
    with_people = [p for p in files if by_file[p.name]["id"] in people]
    files = sorted(with_people[:N_IMAGES - 2] + [p for p in files if p not in with_people][:2])  # 2 without persons
    objects = [(p.name, p.read_bytes()) for p in files]
    objects += [("empty.jpg", b""), ("truncated.jpg", files[0].read_bytes()[:2000])]
    rng = np.random.default_rng(1)
    rows, persons = [], []
    for index, (name, data) in enumerate(objects):
        uri = storage.join(root, "src", name)
        storage.write_atomic(uri, data)
        status = "ok" if name in by_file else "empty" if not data else "decode_error"
        found = people.get(by_file[name]["id"], []) if status == "ok" and with_persons else []
        for ann in found:
            keypoints = np.asarray(ann["keypoints"], np.float32).reshape(17, 3)
            keypoints[:, 2] = np.where(keypoints[:, 2] > 0, rng.uniform(0.3, 1.0, 17), 0.0)
            persons.append((name, uri, keypoints, float(keypoints[:, 2].sum() / 17), ann["bbox"]))
        width, height = (by_file[name]["width"], by_file[name]["height"]) if status == "ok" else (0, 0)
        rows.append({"input_index": index, "image_id": name, "uri": uri, "status": status,
                     "error": "" if status == "ok" else status, "size_bytes": len(data), "width": width,
                     "height": height, "num_persons": len(found)})
    folder = run_folder.RunFolder(storage.join(root, "run"))
    run = {"run_id": "feedc0ffee123456", "model_name": "coco-annotations", "model_version": "gt-1",
           "settings": {"input": storage.join(root, "src"), "mode": "improved", "max_pixels": 50_000_000,
                        "chunk_size": 6, "infer": {"boxsize": 512, "flip": True, "scales": [1.0]}}}
    folder.write_json("_run.json", run)
    chunks = [rows[:6], rows[6:]]
    for chunk, chunk_rows in enumerate(chunks):
        ids = {r["image_id"] for r in chunk_rows}
        mine = [p for p in persons if p[0] in ids]
        columns = {key: np.array([r[key] for r in chunk_rows], dtype=object if isinstance(chunk_rows[0][key], str)
                                 else None) for key in chunk_rows[0]}
        columns["run_id"] = np.full(len(chunk_rows), run["run_id"], dtype=object)
        poses = tables.poses_table(np.array([p[0] for p in mine], object), np.array([p[1] for p in mine], object),
                                   np.array([p[2] for p in mine]).reshape(-1, 17, 3), [p[3] for p in mine],
                                   np.array([p[4] for p in mine]).reshape(-1, 4), run["run_id"], run["model_name"],
                                   run["model_version"])
        if complete or chunk == 0:
            folder.write_chunk(chunk, tables.images_table(columns), poses)
    counts = {"ok": N_IMAGES, "empty": 1, "decode_error": 1}
    if complete:
        folder.write_json("_inputs/_complete.json", {"chunks": 2, "objects": len(rows)})
        folder.finish({**run, "objects": len(rows), "chunks": 2, "counts": counts, "persons": len(persons)})
    return {"counts": counts, "persons": len(persons)}


def _no_remote_references(page: str) -> None:
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I), "a remote reference"
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()


def test_report_of_a_complete_run(tmp_path, coco_mini):
    expected = write_run(str(tmp_path), coco_mini)
    summary = write_report(str(tmp_path / "run"), str(tmp_path / "report.html"), thumbnails=3)
    page = (tmp_path / "report.html").read_text()
    assert summary.complete and summary.charts and summary.run_id == "feedc0ffee123456"
    assert (summary.images, summary.persons) == (N_IMAGES + 2, expected["persons"]) and expected["persons"] > 10
    _no_remote_references(page)
    assert "coco-annotations" in page and "gt-1" in page and "Complete run" in page and "Incomplete" not in page
    for status, count in expected["counts"].items():
        assert re.search(rf"<td[^>]*>{status}</td><td[^>]*>{count}</td>", page), status
    assert re.search(r"<td[^>]*>all</td><td[^>]*>12</td>", page)
    for name in COCO_KEYPOINTS:
        assert f">{name}<" in page
    assert "infer.boxsize" in page and "truncated.jpg" in page  # settings and the failed objects
    charts = re.findall(r'<img class="chart"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(charts) == 4
    for chart in charts:
        image = cv2.imdecode(np.frombuffer(base64.b64decode(chart), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[1] >= 400
    thumbs = re.findall(r'<figure><img alt="[^"]*" src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert 3 <= len(thumbs) <= 9 and summary.thumbnails == len(thumbs)
    assert max(max(cv2.imdecode(np.frombuffer(base64.b64decode(t), np.uint8), cv2.IMREAD_COLOR).shape[:2])
               for t in thumbs) == 320
    assert page.index("Best images") < page.index("Worst images") < page.index("Random images")


def test_report_without_matplotlib(tmp_path, coco_mini, monkeypatch):
    write_run(str(tmp_path), coco_mini)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib raises ImportError
    page, summary = build_report(str(tmp_path / "run"), thumbnails=2)
    assert not summary.charts and summary.thumbnails >= 2
    assert CHARTS_HINT in page and "data:image/png" not in page and "data:image/jpeg;base64," in page
    assert all(f">{name}<" in page for name in COCO_KEYPOINTS)  # the detection rates as a table
    _no_remote_references(page)


def test_report_of_an_incomplete_run_without_persons(tmp_path, coco_mini):
    write_run(str(tmp_path), coco_mini, complete=False, with_persons=False)
    page, summary = build_report(str(tmp_path / "run"), thumbnails=4)
    assert not summary.complete and summary.images == 6 and summary.persons == 0
    assert page.index("Incomplete run") < page.index("Objects per status")
    assert "1 chunk committed" in page and "No persons detected" in page
    assert summary.thumbnails == 4  # random images only: there is no best or worst
    assert "Best images" not in page and "Random images" in page
    _no_remote_references(page)


def test_report_of_a_run_on_object_storage(s3_endpoint, coco_mini):
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir("report-test")
    write_run("s3://report-test", coco_mini)
    summary = write_report("s3://report-test/run", "s3://report-test/report.html", thumbnails=2)
    page = storage.read_text("s3://report-test/report.html")
    assert summary.complete and summary.thumbnails >= 2 and "feedc0ffee123456" in page


def test_report_rejects_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(ValueError, match="not the output folder of a labeling run"):
        build_report(str(tmp_path))
    with pytest.raises(ValueError, match="thumbnails"):
        build_report(str(tmp_path), thumbnails=-1)


def test_report_command(tmp_path, coco_mini):
    write_run(str(tmp_path), coco_mini)
    out = tmp_path / "r.html"
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "report", str(tmp_path / "run"), str(out),
                             "--thumbnails", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "report of run feedc0ffee123456 (complete: 12 objects" in result.stdout
    assert out.read_text().startswith("<!DOCTYPE html>")
