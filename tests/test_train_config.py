"""Training job config (YAML + dotted overrides), LR schedule, precision choice, resumable state: no Ray."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.config import config_from_dict
from pipelines.train.config import TrainConfig, load_train_config
from pipelines.train.loop import learning_rate, load_state, make_optimizer, precision, save_state
from simplepose.model import IMHN, IMHNConfig

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_defaults_are_the_paper_recipe():
    config = TrainConfig()
    assert config.model == IMHNConfig(4, 256, 128, 50)
    assert (config.optimizer.momentum, config.optimizer.weight_decay, config.optimizer.lr) == (0.9, 5e-4, 2.5e-5)
    assert [(s.name, s.epochs, s.input_size, s.loss.focal_gamma) for s in config.stages] == [
        ("l2_384", 16, 384, 0.0), ("focal384", 35, 384, 1.0), ("focal512", 15, 512, 1.0)]
    assert config.total_epochs == 66 and config.stage_at(16) == (config.stages[1], 0)
    assert load_train_config(str(CONFIGS / "paper.yaml")).stages == config.stages


@pytest.mark.parametrize("name", ["paper.yaml", "coco_mini_cpu.yaml", "retrain.yaml", "stickfigures_cpu.yaml"])
def test_shipped_configs_load(name):
    config = load_train_config(str(CONFIGS / name))
    assert config.total_epochs >= 1
    assert config_from_dict(TrainConfig, config.to_dict()) == config


def test_overrides_are_typed_and_checked(tmp_path):
    config = load_train_config(str(CONFIGS / "coco_mini_cpu.yaml"),
                               ["optimizer.lr=1e-3", "scaling.num_workers=3", "stages.1.epochs=2",
                                "checkpoint.init_from=models:/x@champion", "targets.keypoint_sigma=7"])
    assert config.optimizer.lr == 1e-3 and isinstance(config.optimizer.lr, float)
    assert config.scaling.num_workers == 3 and config.stages[1].epochs == 2
    assert config.checkpoint.init_from == "models:/x@champion" and config.targets.keypoint_sigma == 7.0
    with pytest.raises(ValueError, match=r"unknown key\(s\) optimizer\.lrr"):
        load_train_config(None, ["optimizer.lrr=1"])
    with pytest.raises(ValueError, match=r"scaling\.num_workers must be int"):
        load_train_config(None, ["scaling.num_workers=two"])
    with pytest.raises(ValueError, match="multiple of 64"):
        load_train_config(None, ["stages.0.input_size=100"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_train_config(None, ["optimizer.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {stacks: 1}\nmodle: {}\n")
    with pytest.raises(ValueError, match="unknown key.*modle"):
        load_train_config(str(bad))


def test_learning_rate_schedule():
    config = load_train_config(None, ["schedule.warmup_epochs=3", "optimizer.lr=1e-4"])
    world, iters = 4, 10
    assert learning_rate(config, 0, 0, iters, world) == pytest.approx(4e-4 * 1 / 30)  # warm-up, first step
    assert learning_rate(config, 2, 9, iters, world) == pytest.approx(4e-4)  # end of warm-up
    assert learning_rate(config, 14, 0, iters, world) == pytest.approx(4e-4)
    assert learning_rate(config, 15, 0, iters, world) == pytest.approx(4e-4 * 0.2)  # x0.2 every 15 epochs
    assert learning_rate(config, 31, 5, iters, world) == pytest.approx(4e-4 * 0.04)


def test_optimizer_choice():
    model = IMHN(stacks=1, width=32, increase=8)
    assert TrainConfig().optimizer.name == "sgd"  # the authors' recipe stays the default
    sgd = make_optimizer(model, TrainConfig().optimizer)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    adam_config = load_train_config(None, ["optimizer.name=adam", "optimizer.lr=2e-3", "optimizer.weight_decay=0"])
    adam = make_optimizer(model, adam_config.optimizer)
    assert type(adam) is torch.optim.Adam and (adam.defaults["lr"], adam.defaults["weight_decay"]) == (2e-3, 0.0)
    assert sum(p.numel() for g in adam.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="optimizer.name must be sgd or adam, got 'rmsprop'"):
        load_train_config(None, ["optimizer.name=rmsprop"])


def test_precision_choice():
    assert precision("auto", torch.device("cpu")) == (torch.bfloat16, False)
    assert precision("auto", torch.device("cuda")) == (torch.float16, True)
    assert precision("fp32", torch.device("cpu")) == (None, False)
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA"):
        precision("fp16", torch.device("cpu"))


def test_state_round_trip_restores_optimizer_and_epoch(tmp_path):
    torch.manual_seed(0)
    config = load_train_config(None, ["model.stacks=1", "model.width=16", "model.increase=0"])
    model = IMHN.from_config(config.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sum(o.sum() for o in model(torch.rand(2, 3, 64, 64))[-1]).backward()
    optimizer.step()
    save_state(tmp_path / "s.pt", model, optimizer, scaler, epoch=4, step=17, config=config)

    fresh = IMHN.from_config(config.model)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    assert load_state(tmp_path / "s.pt", fresh, fresh_optimizer, scaler) == (5, 17)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    momentum = [fresh_optimizer.state[p]["momentum_buffer"] for p in fresh.parameters()]
    assert all(torch.equal(m, optimizer.state[p]["momentum_buffer"])
               for m, p in zip(momentum, model.parameters()))


def test_local_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    from pipelines.train.job import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = with_absolute_paths(load_train_config(None, [
        "data.annotations=ann.json", "data.images=s3://b/imgs", "checkpoint.storage_path=runs",
        "checkpoint.init_from=models:/m@champion"]))
    assert config.data.annotations == str(tmp_path / "ann.json") and config.data.images == "s3://b/imgs"
    assert config.checkpoint.storage_path == str(tmp_path / "runs")
    assert config.checkpoint.init_from == "models:/m@champion"
