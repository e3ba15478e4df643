"""`scripts/gpu_check.py --smoke`: the one-shot GPU check's code on tiny configurations, on the CPU, as a
subprocess (the script must run as `python scripts/gpu_check.py`, without Ray, printing one JSON object last).
The subprocess cannot import what the GPU machine lacks (Ray, MLflow, s3fs, moto, boto3): a `sitecustomize`
on its path refuses those imports, as a missing package would."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the whole GPU check (compile, training) in a subprocess

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "network", "precision", "label_stage", "training", "learning")
ABSENT_ON_GPU_MACHINE = ("ray", "mlflow", "s3fs", "moto", "boto3", "botocore", "aiobotocore")
BLOCKER = f"""import sys


class AbsentOnGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)", name=name)


sys.meta_path.insert(0, AbsentOnGpuMachine())
"""


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_gpu_check_smoke(coco_mini, tmp_path):
    out_file = tmp_path / "gpu_check.json"
    blocker = tmp_path / "absent"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--data",
                           str(coco_mini), "--out", str(out_file)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out_file.read_text())
    assert result["complete"] is True and result["ray_imported"] is False
    for name in SECTIONS:
        assert result["sections"][name]["ok"], (name, result[name])
        assert "error" not in result[name], (name, result[name])

    network = result["network"]
    runs = {(r["mode"], r["batch"]): r for r in network["runs"]}
    assert set(runs) == {(mode, batch) for mode in ("eager", "channels_last", "compile") for batch in (1, 2)}
    for run in runs.values():
        assert "error" not in run and "skipped" not in run, run
        assert _finite(run["images_per_s"]) and run["images_per_s"] > 0
    assert network["parameters"] == 338_924  # stacks 1, width 32, increase 8

    precision = result["precision"]
    assert _finite(precision["max_abs_diff"]) and _finite(precision["max_abs_fp32"])
    assert precision["max_rel_diff"] < 0.1  # bf16 keeps ~3 significant digits

    stage = result["label_stage"]
    assert stage["ok"] == stage["images_timed"] > 0 and _finite(stage["images_per_s"])
    assert stage["fill_source"] and 0 < stage["forward_batch_fill"] <= 1

    training = result["training"]
    for name in ("fp16_gradscaler", "bf16"):
        run = training["runs"][name]
        assert run["losses_finite"] and _finite(run["images_per_s"]) and _finite(run["loss_last"]), run
    assert training["targets"].startswith("coco-mini samples")

    learning = result["learning"]
    assert learning["losses_finite"] and learning["steps"] >= 1
    assert _finite(learning["AP"]) and 0 <= learning["AP"] <= 1
