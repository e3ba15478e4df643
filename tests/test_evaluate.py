"""`simplepose evaluate`: stats equal a direct pycocotools run on the same results; MLflow run and model
version tags hold them; model, annotations, images and results live on a real loopback S3 server, reached
with the caller's storage options, which are never logged."""
from __future__ import annotations

import contextlib
import io
import json

import boto3
import fsspec
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jobs.cli import main as cli_main
from pipelines import registry, tracking
from pipelines.evaluate import EvalResult, EvalTracking, infer_config_for, log_evaluation, run_evaluation
from simplepose.checkpoint import save_checkpoint
from simplepose.coco import STAT_NAMES, evaluate_keypoints
from simplepose.decode import DecoderConfig
from simplepose.infer import PAPER
from simplepose.model import IMHN, IMHNConfig


def direct_cocoeval(annotations, results: list[dict], image_ids) -> list[float]:
    """The 10 stats of pycocotools run by hand, as the authors' evaluate.py does."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluator = COCOeval(gt, gt.loadRes(results), "keypoints")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def test_logged_stats_equal_pycocotools_on_the_oracle_results(tmp_path, coco_mini_annotations, fixtures_dir):
    results = json.loads((fixtures_dir / "oracle_train_results.json").read_text())
    gt = json.loads(coco_mini_annotations.read_text())
    ids = [image["id"] for image in gt["images"]]
    expected = direct_cocoeval(coco_mini_annotations, results, ids)
    assert expected[0] > 0.5  # a non-trivial AP (the reference decoder on perfect maps)

    stats = evaluate_keypoints(gt, results, image_ids=ids)
    assert [stats[k] for k in STAT_NAMES] == expected
    track = EvalTracking(tracking_uri=f"sqlite:///{tmp_path}/m.db", artifact_location=str(tmp_path / "a"),
                         set_name="mini")
    logged = log_evaluation(EvalResult(stats, "", len(ids), len(results), 1.0), json.dumps(results), "oracle",
                            str(coco_mini_annotations), "imgs", PAPER, DecoderConfig(), track)
    run = tracking.client(track.tracking_uri).get_run(logged.run_id)
    assert [run.data.metrics[f"coco_{k}"] for k in STAT_NAMES] == pytest.approx(expected, abs=1e-12)
    assert run.data.tags["simplepose.set_name"] == "mini"


@pytest.fixture()
def coco_mini_on_s3(s3_endpoint, coco_mini, coco_mini_annotations):
    """Three coco-mini images and their annotations in a fresh bucket; returns (annotations, images) URIs."""
    bucket = f"eval-{np.random.default_rng().integers(1 << 30)}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint)
    gt = json.loads(coco_mini_annotations.read_text())
    keep = [image for image in gt["images"]
            if any(a["image_id"] == image["id"] and a["num_keypoints"] > 5 for a in gt["annotations"])][:3]
    ids = {image["id"] for image in keep}
    gt = {**gt, "images": keep, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
    fs.pipe({f"{bucket}/train2017/{image['file_name']}": (coco_mini / "train2017" / image["file_name"]).read_bytes()
             for image in keep})
    fs.pipe(f"{bucket}/annotations/mini3.json", json.dumps(gt).encode())
    return f"s3://{bucket}/annotations/mini3.json", f"s3://{bucket}/train2017", gt


def register_tiny_model(client, tmp_path, name: str) -> str:
    """An untrained 1-stack IMHN logged by a run and registered as `name` (alias candidate); its version."""
    run = client.create_run(tracking.ensure_experiment(client, "train", str(tmp_path / "artifacts")))
    torch.manual_seed(0)
    path = tmp_path / run.info.run_id / registry.MODEL_FILE
    path.parent.mkdir()
    save_checkpoint(IMHN.from_config(IMHNConfig(stacks=1, width=16, increase=0)), path)
    client.log_artifact(run.info.run_id, str(path), registry.MODEL_ARTIFACT_PATH)
    return registry.register_checkpoint(client, name, run.info.run_id)


def test_evaluate_command_on_s3_with_a_registered_model(tmp_path, coco_mini_on_s3, capsys):
    annotations, images, gt = coco_mini_on_s3
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client(tracking_uri)
    version = register_tiny_model(client, tmp_path, "tiny")

    results_uri = annotations.replace("annotations/mini3.json", "results/mini3_results.json")
    code = cli_main(["evaluate", "models:/tiny@candidate", annotations, images, "--preset", "head",
                     "--scales", "1", "--boxsize", "128", "--no-flip", "--results", results_uri, "--set-name", "mini3",
                     "--tracking-uri", tracking_uri, "--artifact-location", str(tmp_path / "artifacts"), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with fsspec.open(results_uri, "r") as handle:
        results = json.load(handle)
    assert printed["images"] == 3 and printed["detections"] == len(results)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    ids = [image["id"] for image in gt["images"]]
    if results:
        expected = direct_cocoeval(tmp_path / "gt.json", results, ids)
        assert [printed[k] for k in STAT_NAMES] == expected
    else:  # pycocotools cannot load an empty result list; no detection scores 0 (or -1 without ground truth)
        assert all(printed[k] in (0.0, -1.0) for k in STAT_NAMES)
    tags = client.get_model_version("tiny", version).tags
    assert float(tags["coco.mini3.AP"]) == pytest.approx(printed["AP"], abs=1e-6)
    assert tags["coco.mini3.run_id"] == printed["run_id"]
    eval_run = client.get_run(printed["run_id"])
    assert eval_run.data.params["model_uri"] == "models:/tiny@candidate"
    assert [a.path for a in client.list_artifacts(printed["run_id"], "results")] == ["results/mini3_results.json"]


def test_storage_options_reach_every_uri_and_are_never_logged(tmp_path, coco_mini_on_s3, s3_endpoint,
                                                              monkeypatch):
    annotations, images, gt = coco_mini_on_s3
    bucket = annotations.split("/")[2]
    torch.manual_seed(0)
    checkpoint = io.BytesIO()
    save_checkpoint(IMHN.from_config(IMHNConfig(stacks=1, width=16, increase=0)), checkpoint)
    fsspec.filesystem("s3", endpoint_url=s3_endpoint).pipe(f"{bucket}/models/tiny.pt", checkpoint.getvalue())
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the store is reachable only through the options below
    options = {"endpoint_url": s3_endpoint, "key": "eval-key-id", "secret": "eval-secret-value"}
    track = EvalTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "a"),
                         set_name="mini3")
    result = run_evaluation(f"s3://{bucket}/models/tiny.pt", annotations, images,
                            infer_config_for("head", scales=(1.0,), flip=False, boxsize=128),
                            results_uri=f"s3://{bucket}/results/mini3.json", track=track, storage_options=options)
    assert result.num_images == len(gt["images"])
    written = json.loads(fsspec.filesystem("s3", **options).cat_file(f"{bucket}/results/mini3.json"))
    assert len(written) == result.num_detections
    run = tracking.client(track.tracking_uri).get_run(result.run_id)
    assert run.data.tags["data.annotations_version"] != "unknown"  # the annotation file's ETag, read with them
    logged = json.dumps([run.data.params, run.data.tags])
    assert all(str(value) not in logged for value in options.values())


def test_retraining_chain_evaluates_and_promotes(tmp_path, coco_mini_on_s3):
    from pipelines.train.loop import TrainResult
    from pipelines.train.config import load_train_config
    from pipelines.train.job import evaluate_and_promote

    annotations, images, _ = coco_mini_on_s3
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = load_train_config(None, [
        f"tracking.tracking_uri={tracking_uri}", f"tracking.artifact_location={tmp_path}/artifacts",
        "tracking.registered_model=chain", f"evaluation={{annotations: '{annotations}', images: '{images}', "
        "set_name: mini3, preset: head, scales: [1.0], flip: false}", "promote=true"])
    client = tracking.client(tracking_uri)
    version = register_tiny_model(client, tmp_path, "chain")
    run_id = client.get_model_version("chain", version).run_id

    outcome = evaluate_and_promote(config, TrainResult(run_id, version, "", {}), client, tracking_uri)
    assert outcome.evaluation.num_images == 3
    assert outcome.promotion.promoted and outcome.promotion.reason == "no champion yet"
    assert str(client.get_model_version_by_alias("chain", "champion").version) == version
    assert "coco.mini3.AP" in client.get_model_version("chain", version).tags
