"""`simplepose.Predictor` gives the labeling job's persons on the same settings (same functions, same floor)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.label.job import LabelJobConfig, run_label_job

WEIGHTS = Path(__file__).resolve().parents[1] / "jobs" / "weights" / "imhn-tiny-stickfigures.pt"
SMALL = dict(decode_actors=(1, 1), network_actors=(1, 1), assemble_actors=(1, 1), network_cpus=0.5,
             read_batch_size=4, decode_batch_size=4, network_batch_size=8, forward_batch_size=4,
             assemble_batch_size=8, progress_interval_s=1.0)


@pytest.mark.slow
def test_predictor_equals_the_labeling_job(coco_mini, tmp_path):
    import simplepose

    images = sorted((coco_mini / "train2017").glob("*.jpg"))[:6]
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join(str(p) for p in images) + "\n")
    model = str(WEIGHTS)
    config = LabelJobConfig(input=str(manifest), output=str(tmp_path / "run"), model=model, boxsize=256,
                            min_person_score=0.02, min_keypoints=2, **SMALL)
    run_label_job(config)
    poses = pq.read_table(tmp_path / "run" / "poses").to_pandas()
    predictor = simplepose.Predictor(model, device="cpu", boxsize=256, min_person_score=0.02, min_keypoints=2)
    from simplepose.skeleton import COCO_KEYPOINTS

    compared = 0
    for path, result in zip(images, predictor([str(p) for p in images])):
        rows = poses[poses["uri"] == f"file://{path}"].sort_values("person_index")
        assert len(rows) == len(result.scores), path.name
        np.testing.assert_allclose(rows["score"].to_numpy(), result.scores, rtol=1e-5, atol=1e-6)
        scores = np.stack([rows[f"{name}_score"].to_numpy() for name in COCO_KEYPOINTS], axis=1)
        np.testing.assert_allclose(scores, result.keypoints[..., 2], rtol=1e-5, atol=1e-6)
        compared += len(rows)
    assert compared > 0, "no persons above the floor: the comparison would be empty"
