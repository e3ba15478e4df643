"""Errors a person can act on: every `simplepose` failure is one or two lines naming the object and the reason,
exit status 2 for usage and configuration errors, 1 at run time, the traceback only with --debug or
SIMPLEPOSE_DEBUG=1 (pipelines/errors.py, pipelines/preflight.py, jobs/cli.py). The commands run as subprocesses."""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli
from pipelines import errors

REPO = Path(__file__).resolve().parents[1]


def simplepose(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "SIMPLEPOSE_DEBUG"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=environment, text=True,
                          capture_output=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without log lines (the job logs at INFO)."""
    return [line for line in result.stderr.splitlines()
            if line.strip() and " INFO " not in line and " WARNING " not in line]


def assert_short(result: subprocess.CompletedProcess, status: int, *names: str) -> str:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result)
    assert 1 <= len(lines) <= 2, result.stderr
    for name in names:
        assert name in lines[0], result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    import torch

    from simplepose.checkpoint import save_checkpoint
    from simplepose.model import IMHN

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(IMHN(stacks=1, width=32, increase=8), path, {"name": "tiny-random"})
    return str(path)


def test_unknown_flag_is_a_usage_error_in_two_lines():
    result = simplepose("label", "in/", "out/", "--model", "m.pt", "--bogus")
    assert_short(result, 2, "--bogus")
    assert simplepose("no-such-command").returncode == 2


def test_train_config_typo_is_one_line_and_debug_shows_the_traceback():
    config = str(REPO / "jobs" / "configs" / "coco_mini_cpu.yaml")
    message = assert_short(simplepose("train", config, "optimizer.lrr=1"), 2, "optimizer.lrr")
    assert "optimizer accepts lr" in message
    debug = simplepose("--debug", "train", config, "optimizer.lrr=1")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "optimizer.lrr" in debug.stderr


def test_output_that_is_a_file(tmp_path, tiny_model):
    (tmp_path / "in").mkdir()
    (tmp_path / "afile").write_text("x")
    message = assert_short(simplepose("label", str(tmp_path / "in"), str(tmp_path / "afile"), "--model", tiny_model),
                           1, "OUTPUT", str(tmp_path / "afile"), "is a file")
    assert "NotADirectoryError" not in message
    below = simplepose("label", str(tmp_path / "in"), str(tmp_path / "afile" / "run"), "--model", tiny_model)
    assert_short(below, 1, "OUTPUT", "is a file")


def test_garbage_model_names_the_model_and_never_suggests_weights_only_false(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"x")
    model = tmp_path / "bad.pt"
    model.write_text("garbage\n")
    result = simplepose("label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model))
    assert_short(result, 1, "MODEL", str(model), "not a readable torch checkpoint")
    assert "weights_only" not in result.stderr and "BytesIO" not in result.stderr
    assert not (tmp_path / "out").exists()
    debug = simplepose("label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model),
                       env={"SIMPLEPOSE_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_s3_input_without_credentials_names_the_bucket(s3_endpoint, tmp_path, tiny_model):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("errors-in")
    fs.pipe({"errors-in/imgs/a.jpg": b"x"})
    env = {key: value for key, value in os.environ.items() if key not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                                        "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env.update(AWS_ENDPOINT_URL=s3_endpoint, AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    args = ("label", "s3://errors-in/imgs/", str(tmp_path / "out"), "--model", tiny_model)
    result = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=120)
    message = assert_short(result, 1, "INPUT", "s3://errors-in/imgs/", "'errors-in'", "credentials")
    assert "AWS_ACCESS_KEY_ID" in result.stderr and "--storage-option" in result.stderr, message
    assert not (tmp_path / "out").exists()
    debug = subprocess.run([sys.executable, "-m", "jobs.cli", "--debug", *args], cwd=REPO, env=env, text=True,
                           capture_output=True, timeout=120)
    assert debug.returncode == 1 and "NoCredentialsError" in debug.stderr and "Traceback" in debug.stderr
    missing = simplepose("label", "s3://errors-in/nope/", str(tmp_path / "out"), "--model", tiny_model,
                         env={"AWS_ENDPOINT_URL": s3_endpoint})
    assert_short(missing, 1, "INPUT", "s3://errors-in/nope/", "does not exist")
    no_bucket = simplepose("label", "s3://errors-none/imgs/", str(tmp_path / "out"), "--model", tiny_model,
                           env={"AWS_ENDPOINT_URL": s3_endpoint})
    assert_short(no_bucket, 1, "INPUT", "s3://errors-none/imgs/", "does not exist")
    assert "bucket 'errors-none' does not exist" in no_bucket.stderr


@pytest.mark.slow
def test_bad_input_writes_nothing_and_the_corrected_run_needs_no_overwrite(tmp_path, tiny_model, coco_mini,
                                                                           ray_cluster):
    images, output = tmp_path / "images", tmp_path / "out"
    small = ["--boxsize", "128", "--no-flip", "--network-cpus", "0.5", "--decode-actors", "1",
             "--network-actors", "1", "--assemble-actors", "1",
             "--address", ray_cluster.get_runtime_context().gcs_address]
    missing = simplepose("label", str(images), str(output), "--model", tiny_model, *small)
    message = assert_short(missing, 1, "INPUT", str(images), "does not exist")
    assert str(output) not in message  # the input is named, not the output
    assert not output.exists()
    images.mkdir()
    (images / "_hidden.jpg").write_bytes(b"x")  # exists, but matches no objects
    empty = simplepose("label", str(images), str(output), "--model", tiny_model, *small)
    assert_short(empty, 1, "INPUT", str(images), "matched no objects")
    assert not output.exists() or not any(output.rglob("*"))
    for source in sorted((coco_mini / "train2017").glob("*.jpg"))[:2]:
        shutil.copy(source, images / source.name)
    done = simplepose("label", str(images), str(output), "--model", tiny_model, *small, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (output / "_SUCCESS").exists()


def test_exit_statuses_of_raw_exceptions():
    assert errors.explain(ValueError("LabelJobConfig.boxsize: must be positive")).exit_status == 2
    for raw in (FileNotFoundError(2, "No such file", "/data/x"), PermissionError(13, "denied", "/data/x"),
                NotADirectoryError(20, "Not a directory", "/data/x/y")):
        explained = errors.explain(raw)
        assert explained.exit_status == 1 and "/data/x" in explained.message
    assert errors.explain(errors.UsageError("u")).exit_status == 2
    assert isinstance(errors.NoInputError("x"), ValueError) and errors.NoInputError("x").exit_status == 1
    unknown = errors.explain(KeyError("boom"))
    assert unknown.exit_status == 1 and "KeyError" in unknown.message and "--debug" in unknown.hint


def _interrupting_main(args):
    raise KeyboardInterrupt


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "interrupt", (__name__, "raises KeyboardInterrupt"))
    monkeypatch.setattr(sys.modules[__name__], "add_arguments", lambda parser: None, raising=False)
    monkeypatch.setattr(sys.modules[__name__], "main", _interrupting_main, raising=False)
    assert cli.main(["interrupt"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_every_flag_has_help():
    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(cli.build_parser(), "simplepose")
    for command, (module_name, _) in cli.COMMANDS.items():
        parser = cli.Parser(prog=f"simplepose {command}")
        importlib.import_module(module_name).add_arguments(parser)
        walk(parser, f"simplepose {command}")
    assert not missing, f"flags without help text: {missing}"
