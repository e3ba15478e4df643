"""`simplepose.Predictor` gives the labeling job's persons on the same settings (same functions, same floor)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import simplepose
from pipelines.label.config import label_config
from pipelines.label.job import run_label_job
from simplepose.skeleton import COCO_KEYPOINTS

WEIGHTS = Path(__file__).resolve().parents[1] / "jobs" / "weights" / "imhn-tiny-stickfigures.pt"
SMALL = {"decode.actors": (1, 1), "network.actors": (1, 1), "assemble.actors": (1, 1), "network.cpus": 0.5,
         "read.batch_size": 4, "decode.batch_size": 4, "network.batch_size": 8, "network.forward_batch_size": 4,
         "assemble.batch_size": 8, "progress_interval_s": 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_predictor_equals_the_labeling_job(coco_mini, tmp_path, engine):
    """The job's poses equal the Predictor's (torch, in this process), with either network engine in the job."""
    images = sorted((coco_mini / "train2017").glob("*.jpg"))[:6]
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join(str(p) for p in images) + "\n")
    model = str(WEIGHTS)
    config = label_config(input=str(manifest), output=str(tmp_path / "run"), model=model,
                          **{**SMALL, "infer.boxsize": 256, "floor.min_person_score": 0.02, "floor.min_keypoints": 2,
                             "network.engine": engine})
    run_label_job(config)
    poses = pq.read_table(tmp_path / "run" / "poses").to_pandas()
    predictor = simplepose.Predictor(model, device="cpu", boxsize=256, min_person_score=0.02, min_keypoints=2)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if engine == "torch" else {"rtol": 1e-4, "atol": 1e-5}  # maps 3e-6
    compared = 0
    for path, result in zip(images, predictor([str(p) for p in images])):
        rows = poses[poses["uri"] == f"file://{path}"].sort_values("person_index")
        assert len(rows) == len(result.scores), path.name
        np.testing.assert_allclose(rows["score"].to_numpy(), result.scores, **tolerance)
        scores = np.stack([rows[f"{name}_score"].to_numpy() for name in COCO_KEYPOINTS], axis=1)
        np.testing.assert_allclose(scores, result.keypoints[..., 2], **tolerance)
        compared += len(rows)
    assert compared > 0, "no persons above the floor: the comparison would be empty"
