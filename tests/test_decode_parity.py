"""Reference mode against the authors' recorded decoder outputs (fixtures/README.md; docs/method.md §9, §13 G8)."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from simplepose.coco import STAT_NAMES, evaluate_keypoints
from simplepose.decode import DecoderConfig, assemble, coco_results, find_candidates
from simplepose.decode.reference import find_people, select_connections
from simplepose.infer import Heatmaps, upsample_reference

REFERENCE = DecoderConfig(mode="reference")


def test_g8_peaks_connections_and_persons_exactly(fixtures_dir):
    g8 = np.load(fixtures_dir / "decode_g8.npz")
    # The authors decoded float64 maps here (peaks on the float32 cast), which Heatmaps (float32) refuses.
    maps = types.SimpleNamespace(keypoints=torch.from_numpy(g8["heat"]).permute(2, 0, 1).contiguous(),
                                 limbs=torch.from_numpy(g8["body_parts"]).permute(2, 0, 1).contiguous(),
                                 map_to_image=(1.0, 1.0, 0.0, 0.0), image_size=(200, 300))
    candidates = find_candidates(maps, REFERENCE)
    peaks = np.column_stack([candidates.xy, candidates.scores, np.arange(len(candidates.types)),
                             candidates.types])
    np.testing.assert_array_equal(peaks, g8["peaks"])
    connections, special_k = select_connections(candidates)
    assert special_k == g8["special_k"].tolist()
    for k in range(30):
        # ids and scores exact; the length (a square root) may differ by one ulp between CPUs' libm
        np.testing.assert_allclose(connections[k], g8[f"connections_limb{k}"].reshape(-1, 6), rtol=1e-14, atol=0,
                                   err_msg=f"limb {k}")
    people = find_people(connections, special_k, candidates.scores, REFERENCE)
    np.testing.assert_array_equal(people, g8["subset"])
    poses = assemble(candidates, REFERENCE)
    np.testing.assert_allclose(poses.scores, [0.91623, 0.88598], atol=1e-5)  # docs/method.md §13 G8 COCO scores


def test_assembly_random_every_case(fixtures_dir):
    data = np.load(fixtures_dir / "assembly_random.npz")
    peaks, special, conns, persons = data["peaks"], data["special_k"], data["connections"], data["persons"]
    for case in range(int(data["n_cases"])):
        mine = peaks[peaks[:, 0] == case]
        scores = np.zeros(int(mine[:, 4].max()) + 1 if len(mine) else 0)
        scores[mine[:, 4].astype(int)] = mine[:, 3]
        rows = conns[conns[:, 0] == case]
        connections = [rows[rows[:, 1] == k][:, 2:] for k in range(30)]
        people = find_people(connections, special[special[:, 0] == case, 1], scores, REFERENCE)
        expected = persons[persons[:, 0] == case]
        expected = expected[np.argsort(expected[:, 1])][:, 2:].reshape(-1, 20, 2)
        assert people.shape == expected.shape, f"case {case}: {len(people)} persons, expected {len(expected)}"
        np.testing.assert_allclose(people, expected, rtol=0, atol=1e-9, err_msg=f"case {case}")


@pytest.fixture(scope="module")
def oracle_reference_results(fixtures_dir, coco_mini_annotations):
    """Reference-mode COCO results on the recorded oracle maps, processed as fixtures/README.md says."""
    maps = np.load(fixtures_dir / "oracle_train_maps.npz")
    images = json.loads(coco_mini_annotations.read_text())["images"]
    results = []
    for image in images:
        size = (image["height"], image["width"])
        full = torch.from_numpy(upsample_reference(maps[f"img{image['id']}"].astype(np.float32), size, size))
        heatmaps = Heatmaps(full[30:48].contiguous(), full[:30].contiguous(), (1.0, 1.0, 0.0, 0.0), size)
        poses = assemble(find_candidates(heatmaps, REFERENCE), REFERENCE)
        results += coco_results(poses, image["id"], visibility="reference")
    return results


def test_oracle_reference_persons_and_keypoints(fixtures_dir, oracle_reference_results):
    expected = json.loads((fixtures_dir / "oracle_train_results.json").read_text())
    assert len(oracle_reference_results) == len(expected)
    # The authors write persons in their subset order, as we do; compare image by image in that order.
    for mine, theirs in zip(sorted(oracle_reference_results, key=lambda r: r["image_id"]),
                            sorted(expected, key=lambda r: r["image_id"])):
        assert mine["image_id"] == theirs["image_id"]
        np.testing.assert_allclose(mine["keypoints"], theirs["keypoints"], atol=0.01)
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-4)


def test_oracle_reference_cocoeval(fixtures_dir, coco_mini_annotations, oracle_reference_results):
    summary = json.loads((fixtures_dir / "oracle_train_summary.json").read_text())
    stats = evaluate_keypoints(str(coco_mini_annotations), oracle_reference_results)
    np.testing.assert_allclose([stats[name] for name in STAT_NAMES], summary["stats"], atol=0.002)
