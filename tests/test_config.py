"""pipelines.config: one mechanism for every job (defaults < --config file < flags < dotted overrides)."""
from __future__ import annotations

import json

import pytest

from jobs.cli import main as cli_main
from pipelines.config import format_config, load_config, to_dict
from pipelines.errors import UsageError
from pipelines.label.config import LabelJobConfig, label_config
from pipelines.oracle import OracleConfig
from pipelines.train.config import TrainConfig
from simplepose.decode import DecoderConfig
from simplepose.infer import LABELING

REQUIRED = {"input": "s3://in/", "output": "s3://out/run", "model": "m.pt"}


def printed_config(capsys, *args) -> dict:
    assert cli_main([*args, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_defaults_are_the_library_configs():
    config = load_config(LabelJobConfig, values=REQUIRED)
    assert config.infer == LABELING and config.decoder == DecoderConfig()
    # one nested field changes, its siblings keep the job's defaults (not InferConfig's paper defaults)
    changed = load_config(LabelJobConfig, overrides=["infer.boxsize=512"], values=REQUIRED)
    assert changed.infer.boxsize == 512 and changed.infer.scales == LABELING.scales


def test_precedence_file_then_flags_then_overrides(tmp_path, capsys):
    file = tmp_path / "label.yaml"
    file.write_text("model: from-file.pt\ninfer: {boxsize: 320, flip: false}\ndecoder: {max_persons: 5}\n")
    data = printed_config(capsys, "label", "IN", "OUT", "--config", str(file), "--boxsize", "384",
                          "decoder.max_persons=7", "network.engine=null")
    assert data["model"] == "from-file.pt" and data["infer"]["flip"] is False  # the file
    assert data["infer"]["boxsize"] == 384  # a flag wins over the file
    assert data["decoder"]["max_persons"] == 7  # an override wins over the file
    assert data["network"]["engine"] == "null"  # a str field takes the text, not YAML's null
    assert (data["input"], data["output"]) == ("IN", "OUT")


def test_printed_config_is_a_valid_config_file(tmp_path, capsys):
    data = printed_config(capsys, "label", "IN", "OUT", "--model", "m.pt", "--mode", "reference",
                          "--storage-option", "secret=SHOULD-NOT-APPEAR", "decoder.attach_fragments=false")
    assert "SHOULD-NOT-APPEAR" not in json.dumps(data) and "storage_options" not in data
    assert data["infer"]["aggregation"] == "reference"  # --mode reference sets both
    file = tmp_path / "printed.json"
    file.write_text(json.dumps(data))
    assert printed_config(capsys, "label", "IN", "OUT", "--config", str(file)) == data


def test_secrets_are_not_read_from_files(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("storage_options: {key: x}\n")
    with pytest.raises(UsageError, match="unknown key.*storage_options"):
        load_config(LabelJobConfig, str(file), values=REQUIRED)
    config = label_config(**REQUIRED, storage_options={"key": "SECRET-42"})
    assert config.storage_options == {"key": "SECRET-42"} and "storage_options" not in to_dict(config)
    assert "SECRET-42" not in repr(config) and "SECRET-42" not in format_config(config)


def test_errors_name_the_dotted_key(capsys):
    with pytest.raises(UsageError, match=r"unknown key\(s\) decoder.attach_fragmnts; decoder accepts .*attach_fr"):
        load_config(LabelJobConfig, overrides=["decoder.attach_fragmnts=false"], values=REQUIRED)
    with pytest.raises(UsageError, match=r"infer.boxsize must be int"):
        load_config(LabelJobConfig, overrides=["infer.boxsize=big"], values=REQUIRED)
    with pytest.raises(UsageError, match="model must be given"):
        load_config(LabelJobConfig, values={"input": "a", "output": "b"})
    with pytest.raises(UsageError, match="section.key=value"):
        load_config(LabelJobConfig, overrides=["decoder"], values=REQUIRED)
    assert cli_main(["label", "IN", "OUT", "--model", "m", "network.device=tpu"]) == 2
    err = capsys.readouterr().err
    assert "network: NetworkStageConfig.device: 'tpu' not in" in err and "Traceback" not in err


def test_one_loader_for_label_oracle_and_train(capsys):
    oracle = load_config(OracleConfig, overrides=["decoder.tie_free_nms=false", "floor.min_keypoints=3"],
                         values={"annotations": "a.json"})
    assert oracle.decoder.tie_free_nms is False and oracle.floor.min_keypoints == 3  # a null section starts empty
    train = load_config(TrainConfig, overrides=["stages.1.epochs=2", "optimizer.lr=1e-3"])
    assert train.stages[1].epochs == 2 and train.stages[0] == TrainConfig().stages[0]
    assert isinstance(train.optimizer.lr, float) and train.optimizer.lr == 1e-3
    data = printed_config(capsys, "oracle", "a.json", "decoder.max_persons=3")
    assert data["decoder"]["max_persons"] == 3 and data["annotations"] == "a.json"
