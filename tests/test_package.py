"""Contracts of the package as a whole: the library's import boundary and the command line."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from jobs.bench import BENCHMARKS
from jobs.cli import COMMANDS, main as cli_main
from simplepose import skeleton as sk


def test_library_imports_no_ray_mlflow_or_storage_clients():
    # DESIGN.md: nothing in simplepose imports Ray, MLflow, s3fs or boto; I/O goes through file objects.
    code = (
        "import sys, pkgutil, importlib, simplepose\n"
        "for m in pkgutil.walk_packages(simplepose.__path__, 'simplepose.'):\n"
        "    importlib.import_module(m.name)\n"
        "forbidden = {'ray', 'mlflow', 's3fs', 'boto3', 'botocore', 'pipelines', 'jobs'}\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in forbidden)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"simplepose imported {out.stdout.strip()}"


def _mirror_name(name: str) -> str:
    side, _, part = name.partition("_")
    return {"left": "right_", "right": "left_"}[side] + part if side in ("left", "right") else name


def test_skeleton_body_parts_join_distinct_keypoints_into_one_figure():
    limbs = [tuple(limb) for limb in sk.LIMBS]
    assert all(0 <= a < sk.NUM_KEYPOINTS and 0 <= b < sk.NUM_KEYPOINTS and a != b for a, b in limbs)
    assert len({frozenset(limb) for limb in limbs}) == len(limbs)  # no body part twice, in either direction
    reached, frontier = {sk.NECK}, [sk.NECK]  # every keypoint joins the figure through body parts
    while frontier:
        k = frontier.pop()
        for a, b in limbs:
            for other in ({a, b} - {k} if k in (a, b) else ()):
                if other not in reached:
                    reached.add(other)
                    frontier.append(other)
    assert reached == set(range(sk.NUM_KEYPOINTS))
    for a, b in sk.COCO_SKELETON:  # the drawing skeleton joins COCO keypoints
        assert 0 <= a < len(sk.COCO_KEYPOINTS) and 0 <= b < len(sk.COCO_KEYPOINTS) and a != b


def test_flip_maps_are_involutions_that_swap_left_and_right():
    for flip in (sk.KEYPOINT_FLIP, sk.FLIP_LIMB_ORDER, sk.FLIP_HEAT_ORDER, sk.FLIP_CHANNEL_ORDER):
        assert [flip[flip[i]] for i in range(len(flip))] == list(range(len(flip)))
    for k, name in enumerate(sk.KEYPOINTS):
        assert sk.KEYPOINTS[sk.KEYPOINT_FLIP[k]] == _mirror_name(name)
    # Test-time flip: keypoint channels follow the keypoint flip; max and person-mask channels stay.
    assert list(sk.FLIP_HEAT_ORDER) == [*sk.KEYPOINT_FLIP, 18, 19]
    assert len(sk.FLIP_CHANNEL_ORDER) == sk.NUM_CHANNELS
    for limb, (a, b) in enumerate(sk.LIMBS):  # a mirrored limb joins the mirrored keypoints
        mirrored = sk.LIMBS[sk.FLIP_LIMB_ORDER[limb]]
        assert set(mirrored) == {sk.KEYPOINT_FLIP[a], sk.KEYPOINT_FLIP[b]}
    for coco_index, name in enumerate(sk.COCO_KEYPOINTS):
        assert sk.KEYPOINTS[sk.COCO_TO_REFERENCE[coco_index]] == name
        assert sk.REFERENCE_TO_COCO[sk.COCO_TO_REFERENCE[coco_index]] == coco_index


def test_coco_to_reference_recodes_visibility_and_builds_the_neck():
    coco = np.zeros((17, 3))
    coco[5] = (10, 20, 2)  # left shoulder, visible
    coco[6] = (30, 40, 1)  # right shoulder, occluded
    ref = sk.coco_to_reference(coco)
    assert ref.shape == (18, 3)
    assert tuple(ref[sk.NECK]) == (20, 30, 0)  # midpoint, min of recoded visibilities (1 and 0)
    assert ref[5, 2] == 1 and ref[2, 2] == 0 and ref[0, 2] == 2
    coco[6, 2] = 0
    assert sk.coco_to_reference(coco)[sk.NECK, 2] == 2
    with pytest.raises(ValueError, match="17, 3"):
        sk.coco_to_reference(np.zeros((18, 3)))


# Options each help must show, beyond `simplepose COMMAND` (the ones a new user looks for first).
HELP_OPTIONS = {("demo",): ("--workdir", "--model"), ("oracle",): ("--mode", "--workers", "--json"),
                ("render",): ("--min-score", "run_output"), ("label",): ("--overwrite", "--model"),
                ("bench", "label"): ("--images",)}


def _help(capsys, *args: str) -> str:
    """The help text of `simplepose ARGS --help`, in process (a subprocess per command cost ~4 s each)."""
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--help"])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    return out.out


@pytest.mark.parametrize("command", [(name,) for name in sorted(COMMANDS)]
                         + [("bench", name) for name in sorted(BENCHMARKS)])
def test_every_command_has_help(command, capsys):
    text = _help(capsys, *command)
    assert f"simplepose {command[0]}" in text
    for option in HELP_OPTIONS.get(command, ()):
        assert option in text, f"`simplepose {' '.join(command)} --help` does not mention {option}"


def test_unknown_command_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "no-such-command"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
