"""Reading a labeling run's tables back in fault tests, and the exactly-once comparison with a clean run."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq


def tables_of(fs, output: str):
    """(images sorted by input_index, poses sorted by image_id/person_index) of the run at `output` on `fs`."""
    fs.invalidate_cache()  # listings cached while the job was running
    images = pq.read_table(f"{output}/images", filesystem=fs).to_pandas()
    poses = pq.read_table(f"{output}/poses", filesystem=fs).to_pandas()
    return (images.sort_values("input_index").reset_index(drop=True),
            poses.sort_values(["image_id", "person_index"]).reset_index(drop=True))


def assert_same_as_clean(fs, output: str, clean, total: int) -> None:
    """The run at `output` is complete, with every one of `total` inputs exactly once and the clean run's
    statuses, persons and pose values."""
    images, poses = tables_of(fs, output)
    clean_images, clean_poses = clean
    assert list(images["input_index"]) == list(range(total))  # every input exactly once
    for column in ("uri", "image_id", "status", "num_persons"):
        assert list(images[column]) == list(clean_images[column]), column
    assert not poses.duplicated(["image_id", "person_index"]).any()
    assert list(poses["image_id"]) == list(clean_poses["image_id"])
    numeric = [c for c in poses.columns if poses[c].dtype.kind in "fi"]  # score, boxes, every keypoint x/y/score
    np.testing.assert_allclose(poses[numeric].to_numpy(float), clean_poses[numeric].to_numpy(float), atol=1e-4)
    fs.invalidate_cache()
    assert fs.exists(f"{output}/_SUCCESS")
