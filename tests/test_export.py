"""pipelines.export / `simplepose export`: a labeling run as COCO results and as a COCO annotations file.

The run is built here from coco-mini: its "detections" are the images' COCO keypoint annotations (keypoint
scores random in [0.3, 1)), so the exported results scored by COCOeval against the same annotations give AP 1
exactly when every id and coordinate went through right.
"""
from __future__ import annotations

import contextlib
import io
import json
import weakref

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs import cli
from pipelines import export, storage
from pipelines.label import run_folder, tables
from pipelines.errors import JobError
from simplepose.skeleton import COCO_KEYPOINTS, COCO_SKELETON

RUN_ID = "0123456789abcdef"
N_IMAGES = 24


def write_run(root: str, annotations_path, chunk_size: int = 10, complete: bool = True,
              storage_options=None) -> dict:
    """A run in ROOT/run over N_IMAGES coco-mini images (persons: their non-crowd annotations with
    keypoints), plus `extra.jpg` (ok, one person, not in the annotation file) and `broken.jpg`
    (decode_error), in chunks of `chunk_size`. Only the tables are written: the exporter never reads pixels."""
    data = json.loads(annotations_path.read_text())
    people: dict[int, list] = {}
    for ann in data["annotations"]:
        if ann.get("num_keypoints", 0) > 0 and not ann.get("iscrowd"):
            people.setdefault(ann["image_id"], []).append(ann)
    chosen = sorted(data["images"], key=lambda im: im["file_name"])[:N_IMAGES]
    rng = np.random.default_rng(3)
    rows, persons = [], []
    for index, image in enumerate(chosen + [{"file_name": "extra.jpg", "width": 300, "height": 200},
                                            {"file_name": "broken.jpg", "width": 0, "height": 0}]):
        name = image["file_name"]
        uri = storage.join(root, "src", "sub" if index % 2 else "", name)
        status = "decode_error" if name == "broken.jpg" else "ok"
        if name == "extra.jpg":
            found = [{"keypoints": [50, 60, 2] * 17, "bbox": [50, 60, 0, 0]}]
        else:
            found = people.get(image.get("id"), [])
        for ann in found:
            keypoints = np.asarray(ann["keypoints"], np.float32).reshape(17, 3)
            keypoints[:, 2] = np.where(keypoints[:, 2] > 0, rng.uniform(0.3, 1.0, 17), 0.0)
            persons.append((name, uri, keypoints, float(rng.uniform(0.2, 1.0)), ann["bbox"]))
        rows.append({"input_index": index, "image_id": name, "uri": uri, "status": status,
                     "error": "" if status == "ok" else "not an image", "size_bytes": 1000,
                     "width": image["width"], "height": image["height"], "num_persons": len(found)})
    folder = run_folder.RunFolder(storage.join(root, "run"), storage_options)
    run = {"run_id": RUN_ID, "model_name": "coco-annotations", "model_version": "gt-1", "settings": {}}
    folder.write_json("_run.json", run)
    chunks = [rows[i:i + chunk_size] for i in range(0, len(rows), chunk_size)]
    for chunk, chunk_rows in enumerate(chunks):
        ids = {r["image_id"] for r in chunk_rows}
        mine = [p for p in persons if p[0] in ids]
        columns = {key: np.array([r[key] for r in chunk_rows], dtype=object if isinstance(chunk_rows[0][key], str)
                                 else None) for key in chunk_rows[0]}
        columns["run_id"] = np.full(len(chunk_rows), RUN_ID, dtype=object)
        poses = tables.poses_table(np.array([p[0] for p in mine], object), np.array([p[1] for p in mine], object),
                                   np.array([p[2] for p in mine]).reshape(-1, 17, 3), [p[3] for p in mine],
                                   np.array([p[4] for p in mine]).reshape(-1, 4), RUN_ID, run["model_name"],
                                   run["model_version"])
        if complete or chunk == 0:
            folder.write_chunk(chunk, tables.images_table(columns), poses)
    if complete:
        folder.finish({**run, "objects": len(rows), "chunks": len(chunks), "persons": len(persons)})
    by_file = {im["file_name"]: im["id"] for im in data["images"]}
    return {"persons": persons, "rows": rows, "chunks": len(chunks), "by_file": by_file}


def _coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(path))


def _evaluate(gt: COCO, results) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(str(results))
        evaluation = COCOeval(gt, dt, "keypoints")
        evaluation.params.imgIds = sorted({r["image_id"] for r in json.loads(open(results).read())})
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def test_results_match_the_annotation_ids_and_evaluate(tmp_path, coco_mini_annotations):
    run = write_run(str(tmp_path), coco_mini_annotations)
    out = tmp_path / "out" / "results.json"
    summary = export.export_run(str(tmp_path / "run"), str(out), format="coco-results",
                                annotations=str(coco_mini_annotations))
    results = json.loads(out.read_text())
    gt_persons = [p for p in run["persons"] if p[0] in run["by_file"]]
    assert len(results) == summary.persons == len(gt_persons) > 20
    assert summary.unmatched_images == 1 and summary.complete and summary.parts == 3  # extra.jpg
    assert {r["image_id"] for r in results} == {run["by_file"][p[0]] for p in gt_persons}
    for result, (name, _, keypoints, score, _) in zip(results, gt_persons):  # run order is kept
        assert result["image_id"] == run["by_file"][name] and result["category_id"] == 1
        assert len(result["keypoints"]) == 51 and result["score"] == pytest.approx(score, abs=1e-4)
        points = np.asarray(result["keypoints"]).reshape(17, 3)
        detected = keypoints[:, 2] > 0
        np.testing.assert_allclose(points[detected], keypoints[detected], atol=0.006)
        assert not points[~detected].any()  # (0, 0, 0) for keypoints not detected
    stats = _evaluate(_coco(coco_mini_annotations), out)
    assert stats[0] == pytest.approx(1.0) and stats[5] == pytest.approx(1.0)  # AP and AR: every person found


def test_results_ids_without_annotations_follow_the_input_order(tmp_path, coco_mini_annotations):
    run = write_run(str(tmp_path), coco_mini_annotations, chunk_size=7)
    out = tmp_path / "results.json"
    assert cli.main(["export", str(tmp_path / "run"), str(out)]) == 0
    results = json.loads(out.read_text())
    index_of = {r["image_id"]: r["input_index"] for r in run["rows"]}
    assert [r["image_id"] for r in results] == [index_of[p[0]] + 1 for p in run["persons"]]
    assert not list(tmp_path.glob(".*.tmp"))


def test_coco_file_loads_and_round_trips_through_cocoeval(tmp_path, coco_mini_annotations):
    run = write_run(str(tmp_path), coco_mini_annotations, chunk_size=4)
    coco_out, results_out = tmp_path / "labels.json", tmp_path / "results.json"
    summary = export.export_run(str(tmp_path / "run"), str(coco_out), format="coco",
                                annotations=str(coco_mini_annotations))
    export.export_run(str(tmp_path / "run"), str(results_out), annotations=str(coco_mini_annotations))
    coco = _coco(coco_out)
    ok_rows = [r for r in run["rows"] if r["status"] == "ok"]
    assert summary.images == len(coco.imgs) == len(ok_rows) == N_IMAGES + 1 and summary.skipped_images == 1
    assert summary.persons == len(coco.anns) == len(run["persons"]) and summary.dropped_persons == 0
    assert summary.unmatched_images == 1
    largest = max(run["by_file"].values())
    for row in ok_rows:  # ids by file name; extra.jpg numbered after the annotation file's largest id
        image = next(im for im in coco.imgs.values() if im["file_name"] == row["image_id"])
        assert image["id"] == run["by_file"].get(row["image_id"], largest + 1 + row["input_index"])
        assert (image["width"], image["height"]) == (row["width"], row["height"])
    category = coco.loadCats([1])[0]
    assert category["name"] == "person" and category["keypoints"] == list(COCO_KEYPOINTS)
    assert category["skeleton"] == [[a + 1, b + 1] for a, b in COCO_SKELETON]
    assert [16, 14] in category["skeleton"]  # COCO's own (1-based) skeleton
    data = json.loads(coco_out.read_text())
    assert data["info"]["simplepose"]["run_id"] == RUN_ID and data["licenses"] == []
    for ann, (_, _, keypoints, score, _) in zip(data["annotations"], run["persons"]):
        points = np.asarray(ann["keypoints"]).reshape(17, 3)
        visible = keypoints[:, 2] > 0
        assert set(points[:, 2]) <= {0, 2} and list(points[:, 2] == 2) == list(visible)
        assert ann["num_keypoints"] == visible.sum() and ann["iscrowd"] == 0 and ann["category_id"] == 1
        x, y = keypoints[visible, 0], keypoints[visible, 1]
        np.testing.assert_allclose(ann["bbox"], [x.min(), y.min(), x.max() - x.min(), y.max() - y.min()], atol=0.02)
        assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3], abs=0.02)
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    # The exported labels as ground truth, the exported results as detections: the same run, so AP 1.
    stats = _evaluate(coco, results_out)
    assert stats[0] == pytest.approx(1.0)


def test_coco_keypoint_threshold_hides_low_keypoints(tmp_path, coco_mini_annotations):
    run = write_run(str(tmp_path), coco_mini_annotations)
    out = tmp_path / "labels.json"
    assert cli.main(["export", str(tmp_path / "run"), str(out), "--format", "coco", "--keypoint-threshold",
                     "0.65"]) == 0
    data = json.loads(out.read_text())
    expected = [(k, (k[:, 2] >= 0.65) & (k[:, 2] > 0)) for _, _, k, _, _ in run["persons"]]
    expected = [(k, v) for k, v in expected if v.any()]
    assert len(data["annotations"]) == len(expected) == len(run["persons"])  # each keeps a keypoint >= 0.65
    for ann, (keypoints, visible) in zip(data["annotations"], expected):
        points = np.asarray(ann["keypoints"]).reshape(17, 3)
        assert list(points[:, 2] == 2) == list(visible) and ann["num_keypoints"] == visible.sum()
        assert not points[~visible].any()
        np.testing.assert_allclose(points[visible, :2], keypoints[visible, :2], atol=0.006)
    ids = {im["file_name"]: im["id"] for im in data["images"]}
    index_of = {r["image_id"]: r["input_index"] for r in run["rows"]}
    assert all(ids[name] == index_of[name] + 1 for name in ids)
    _coco(out)
    summary = export.export_run(str(tmp_path / "run"), str(out), format="coco", keypoint_threshold=1.5)
    assert summary.dropped_persons == len(run["persons"]) and summary.persons == 0  # no keypoint left: dropped
    assert json.loads(out.read_text())["annotations"] == [] and len(_coco(out).imgs) == N_IMAGES + 1


def test_incomplete_run_is_refused_unless_allowed(tmp_path, coco_mini_annotations, capsys):
    write_run(str(tmp_path), coco_mini_annotations, complete=False)
    out = tmp_path / "results.json"
    with pytest.raises(JobError, match="incomplete.*--allow-incomplete"):
        export.export_run(str(tmp_path / "run"), str(out))
    assert cli.main(["export", str(tmp_path / "run"), str(out)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no _SUCCESS" in error[0] and "--allow-incomplete" in error[0]
    assert not out.exists()
    summary = export.export_run(str(tmp_path / "run"), str(out), allow_incomplete=True)
    assert not summary.complete and summary.parts == 1 and summary.persons == len(json.loads(out.read_text())) > 0
    with pytest.raises(JobError, match="not the output folder of a labeling run"):
        export.export_run(str(tmp_path / "nothing"), str(out))


def test_many_parts_are_read_one_at_a_time(tmp_path, coco_mini_annotations, monkeypatch):
    """Bounded memory: every part is read once per pass, in chunk order, and the tables of a part are
    gone before the next part is read; the output equals that of the same run in one part."""
    one = tmp_path / "one"
    write_run(str(one), coco_mini_annotations, chunk_size=1000)
    many = tmp_path / "many"
    run = write_run(str(many), coco_mini_annotations, chunk_size=2)
    assert run["chunks"] == 13
    reads, alive = [], []
    real_read = export.read_part

    def tracked(uri, columns, options):  # no gc.collect(): reference counting alone must free a part
        assert not any(ref() is not None for ref in alive), "a previous part is still held"
        table = real_read(uri, columns, options)
        reads.append("/".join(uri.split("/")[-2:]))
        alive.append(weakref.ref(table))
        return table

    monkeypatch.setattr(export, "read_part", tracked)
    for fmt in export.FORMATS:
        reads.clear()
        export.export_run(str(many / "run"), str(many / f"{fmt}.json"), format=fmt,
                          annotations=str(coco_mini_annotations))
        names = [run_folder.part_name(c) for c in range(run["chunks"])]
        both = [f"{table}/{name}" for name in names for table in ("images", "poses")]
        assert reads == both if fmt == "coco-results" else reads == [f"images/{n}" for n in names] + both
        export.export_run(str(one / "run"), str(one / f"{fmt}.json"), format=fmt,
                          annotations=str(coco_mini_annotations))
        assert json.loads((many / f"{fmt}.json").read_text()) == json.loads((one / f"{fmt}.json").read_text())


def test_export_from_and_to_object_storage(s3_endpoint, coco_mini_annotations, tmp_path):
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir("export-test")
    run = write_run("s3://export-test/a", coco_mini_annotations, chunk_size=9)
    storage.write_atomic("s3://export-test/ann/train.json", coco_mini_annotations.read_bytes())
    assert cli.main(["export", "s3://export-test/a/run", "s3://export-test/out/r.json", "--annotations",
                     "s3://export-test/ann/train.json"]) == 0
    results = json.loads(storage.read_text("s3://export-test/out/r.json"))
    assert len(results) == len([p for p in run["persons"] if p[0] in run["by_file"]])
    assert {r["image_id"] for r in results} <= set(run["by_file"].values())
    with pytest.raises(JobError, match="RUN 's3://export-test/missing/run'"):
        export.export_run("s3://export-test/missing/run", str(tmp_path / "x.json"))
