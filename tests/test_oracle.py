"""`simplepose oracle`: perfect maps of coco-mini decoded and evaluated end to end."""
from __future__ import annotations

import json

from jobs.cli import main as cli_main

STAT_KEYS = {"AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"}


def run_oracle(capsys, *args) -> dict:
    assert cli_main(["oracle", *args, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert STAT_KEYS <= set(figures["stats"]) and figures["images_per_s_per_core"] > 0
    return figures


def test_default_mode_clears_the_perfect_map_bar(capsys, coco_mini_annotations):
    figures = run_oracle(capsys, str(coco_mini_annotations))
    assert figures["n_images"] == 80 and figures["mode"] == "default"
    assert figures["stats"]["AP"] >= 0.90  # the authors' decoder: 0.663 on the same maps
    assert figures["tensor_ms_median"] > 0 and figures["assembly_ms_median"] > 0


def test_reference_mode_and_options_on_a_few_images(capsys, coco_mini_annotations, tmp_path):
    results = tmp_path / "results.json"
    figures = run_oracle(capsys, str(coco_mini_annotations), "--mode", "reference", "--limit", "4",
                         "--results", str(results))
    assert figures["mode"] == "reference" and figures["n_images"] == 4
    written = json.loads(results.read_text())
    assert len(written) == figures["n_persons"]
    assert all(v in (0.0, 1.0) for r in written for v in r["keypoints"][2::3])  # the authors' v flag
    ablation = run_oracle(capsys, str(coco_mini_annotations), "--limit", "4", "decoder.tie_free_nms=false",
                          "--floor", "floor.min_keypoints=3")
    assert ablation["config"]["tie_free_nms"] is False
    assert ablation["floor"] == {"min_person_score": 0.1, "min_keypoints": 3}


def test_unknown_decoder_key_is_refused_naming_the_accepted_ones(capsys, coco_mini_annotations):
    assert cli_main(["oracle", str(coco_mini_annotations), "decoder.speed=11"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) decoder.speed" in err and "tie_free_nms" in err and "Traceback" not in err
