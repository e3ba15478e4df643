"""Checkpoints: our format round trip, the authors' format, key mapping of the released model, bad files."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import simplepose
from jobs import cli
from simplepose.checkpoint import (
    FORMAT, CheckpointError, convert_reference_state_dict, load_checkpoint, load_model, read_checkpoint_metadata,
    save_checkpoint)
from simplepose.model import IMHN, IMHNConfig

REPO = Path(__file__).resolve().parents[1]
TINY = IMHNConfig(stacks=2, width=32, increase=8)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    model = IMHN.from_config(TINY)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.uniform_(-0.1, 0.1)
    return model.eval()


def outputs(model: IMHN, seed: int = 0) -> list[torch.Tensor]:
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return sum(model(image), [])


def authors_file(model: IMHN, prefix: str = "posenet.", **save_kwargs) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save({"weights": {prefix + k: v for k, v in model.state_dict().items()}, "epoch": 52,
                "train_loss": np.float64(123.5),  # a numpy scalar, as training scripts often store
                "optimizer_weight": {"state": {}, "param_groups": [{"lr": 1e-4}]}},
               buffer, **save_kwargs)
    buffer.seek(0)
    return buffer


def assert_same_outputs(a: IMHN, b: IMHN) -> None:
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y)


def test_round_trip_with_metadata(tiny, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(tiny, path, {"git_sha": "abc123", "epoch": 3, "ap": 0.61})
    raw = torch.load(path, weights_only=True)  # no pickled module or class inside
    assert raw["format"] == FORMAT and raw["config"] == {"stacks": 2, "width": 32, "increase": 8, "outputs": 50}
    config, state, metadata = load_checkpoint(str(path))
    assert config == TINY and metadata == {"git_sha": "abc123", "epoch": 3, "ap": 0.61}
    assert state.keys() == tiny.state_dict().keys()
    loaded = load_model(path)
    assert not loaded.training and loaded.config == TINY
    assert_same_outputs(tiny, loaded)
    assert_same_outputs(tiny, simplepose.load_model(path.open("rb")))  # file object, package re-export


class CountingReader(io.RawIOBase):
    """A seekable binary file that counts the bytes read through it."""

    def __init__(self, path: Path):
        self.file, self.bytes_read = open(path, "rb", buffering=0), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readinto(self, buffer) -> int:
        count = self.file.readinto(buffer)
        self.bytes_read += count
        return count

    def close(self) -> None:
        self.file.close()
        super().close()


def test_metadata_is_read_without_the_weights(tmp_path):
    model = IMHN.from_config(IMHNConfig(stacks=1, width=64, increase=0))  # weights ~ 40x the pickled index
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, {"name": "wide", "version": "3"})
    with CountingReader(path) as reader:
        config, metadata = read_checkpoint_metadata(reader)
    assert (config, metadata) == (model.config, {"name": "wide", "version": "3"})
    assert reader.bytes_read < path.stat().st_size / 10  # the index and the zip directory, not the weights
    with CountingReader(path) as reader:
        load_checkpoint(reader)
    assert reader.bytes_read >= path.stat().st_size * 0.9  # what a full load reads


@pytest.mark.parametrize("prefix, save_kwargs", [("module.posenet.", {}),
                                                 ("posenet.", {"_use_new_zipfile_serialization": False})],
                         ids=["zip", "legacy-serialization"])
def test_metadata_of_the_authors_format(tiny, prefix, save_kwargs):
    config, metadata = read_checkpoint_metadata(authors_file(tiny, prefix, **save_kwargs))
    assert config == TINY and metadata == {"source_format": "reference", "epoch": 52, "train_loss": 123.5}


def test_metadata_must_be_json(tiny):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tiny, io.BytesIO(), {"when": object()})
    with pytest.raises(TypeError, match="IMHN"):
        save_checkpoint(torch.nn.Linear(2, 2), io.BytesIO())


@pytest.mark.parametrize("prefix, save_kwargs", [
    ("posenet.", {}), ("module.posenet.", {}), ("posenet.", {"_use_new_zipfile_serialization": False}),
], ids=["plain", "ddp-prefix", "legacy-serialization"])
def test_authors_format(tiny, prefix, save_kwargs):
    buffer = authors_file(tiny, prefix, **save_kwargs)
    config, _, metadata = load_checkpoint(buffer)
    assert config == TINY
    assert metadata == {"source_format": "reference", "epoch": 52, "train_loss": 123.5}
    buffer.seek(0)
    assert_same_outputs(tiny, load_model(buffer))


def test_released_keys_map_to_imhn(fixtures_dir):
    """Every entry of the released checkpoint maps by name, shape and dtype to IMHN(4, 256, 128, 50), in the
    same order: IMHN reproduces the reference module layout (docs/method.md §5.5)."""
    state = {}
    for line in (fixtures_dir / "released_checkpoint_keys.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        state["module.posenet." + key] = torch.empty(dims, dtype=getattr(torch, dtype), device="meta")
    config, converted = convert_reference_state_dict(state)
    assert config == IMHNConfig(4, 256, 128, 50)
    assert len(converted) == 1848
    assert sum(k.endswith("num_batches_tracked") for k in converted) == 288
    with torch.device("meta"):
        expected = IMHN.from_config(config).state_dict()
    assert list(converted) == list(expected)
    assert all(converted[k].shape == v.shape and converted[k].dtype == v.dtype for k, v in expected.items())


@pytest.mark.parametrize("read", [load_model, read_checkpoint_metadata])
def test_other_architecture_is_refused_with_offending_keys(tiny, read):
    state = dict(tiny.state_dict())
    state.pop("pre.dilation.5.conv.weight")
    state["extra.layer.weight"] = torch.zeros(3)
    state["outs.1.4.conv.bias"] = torch.zeros(7)
    buffer = io.BytesIO()
    torch.save({"weights": {"posenet." + k: v for k, v in state.items()}}, buffer)
    buffer.seek(0)
    with pytest.raises(CheckpointError) as info:
        read(buffer)
    message = str(info.value)
    assert "pre.dilation.5.conv.weight" in message and "extra.layer.weight" in message
    assert "outs.1.4.conv.bias (7,) != (50,)" in message


def test_not_an_imhn_at_all():
    buffer = io.BytesIO()
    torch.save({"weights": {"fc.weight": torch.zeros(2, 2)}}, buffer)
    buffer.seek(0)
    with pytest.raises(CheckpointError, match="not an IMHN state_dict"):
        load_model(buffer)


@pytest.mark.parametrize("content, match", [
    (b"", "not a readable torch checkpoint"),
    (b"name,score\nx,1\n", "not a readable torch checkpoint"),
    ("truncated", "not a readable torch checkpoint"),
    ({"format": "simplepose-imhn/9"}, "unsupported format"),
    ({"model": {}}, "neither a simplepose checkpoint"),
    ([1, 2, 3], "not a checkpoint dict"),
])
@pytest.mark.parametrize("read", [load_model, read_checkpoint_metadata])
def test_bad_files_are_refused(tiny, tmp_path, content, match, read):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        save_checkpoint(tiny, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match):
        read(path)


@pytest.mark.parametrize("read", [load_model, read_checkpoint_metadata])
def test_pickled_module_is_refused(tiny, tmp_path, read):
    path = tmp_path / "module.pt"
    torch.save(tiny, path)  # a pickled nn.Module: weights_only loading must not execute it
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.pt")


def test_convert_checkpoint_command(tiny, tmp_path):
    src, dst = tmp_path / "PoseNet_52_epoch.pth", tmp_path / "converted.pt"
    src.write_bytes(authors_file(tiny, "module.posenet.").getvalue())
    command = [sys.executable, "-m", "jobs.cli", "convert-checkpoint", str(src), str(dst)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "IMHNConfig(stacks=2, width=32, increase=8, outputs=50)" in result.stdout
    assert f"parameters: {sum(p.numel() for p in tiny.parameters()):,}" in result.stdout
    assert f"state_dict entries: {len(tiny.state_dict())}" in result.stdout
    config, _, metadata = load_checkpoint(dst)
    assert config == TINY
    assert metadata == {"source_format": "reference", "epoch": 52, "train_loss": 123.5,
                        "converted_from": "PoseNet_52_epoch.pth"}
    assert_same_outputs(tiny, load_model(dst))
    with pytest.raises(SystemExit, match="--force"):  # in-process: a second interpreter start costs seconds
        cli.main(command[3:])
