"""IMHN checkpoints: our format, and conversion of the authors' released checkpoint to it.

Our format (`FORMAT`): one `torch.save` file holding a plain dict
`{"format": "simplepose-imhn/1", "config": asdict(IMHNConfig), "state_dict": {key: tensor},
"metadata": {...JSON-like provenance...}}`, readable with `torch.load(weights_only=True)`: never a pickled
module.

The authors' format (hellojialee/Improved-Body-Parts, `train_distributed.py`, docs/method.md §5.5):
`{"weights": {"posenet.<key>": tensor}, "epoch": int, ...}`, keys maybe prefixed by `module.` (DDP). Their key
names equal ours after stripping the prefixes, so conversion is a pure key mapping with count and shape checks
(`convert_reference_state_dict`). The weights themselves are distributed by the authors under their terms.

Paths are local paths or open binary file objects; callers open object-store URIs themselves.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import zipfile
from typing import IO, Any, Mapping, Union

import numpy as np
import torch

from simplepose.model import IMHN, IMHNConfig

LOG = logging.getLogger(__name__)

FORMAT = "simplepose-imhn/1"
"""Value of the "format" entry of our checkpoints."""

PathOrFile = Union[str, os.PathLike, IO[bytes]]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "posenet.")  # DDP, torch.compile, the authors' Network wrapper
_STACK_KEY = re.compile(r"hourglass\.(\d+)\.")
# Training scripts often store numpy scalars (e.g. a loss value) next to the weights; rebuilding a numpy
# scalar runs no code, so weights_only loading may accept these few numpy globals.
_NUMPY_SCALAR_GLOBALS = [np._core.multiarray.scalar, np.dtype,
                         *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64))]


class CheckpointError(ValueError):
    """A file that is not a usable IMHN checkpoint: unreadable, unknown format or another architecture."""


def save_checkpoint(model: IMHN, path_or_file: PathOrFile, metadata: dict | None = None) -> None:
    """Write `model` in our format. metadata: JSON-serialisable provenance (git SHA, dataset, run id...)."""
    if not isinstance(model, IMHN):
        raise TypeError(f"save_checkpoint needs an IMHN (unwrap DDP/compile first), got {type(model).__name__}")
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {error}") from error
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save({"format": FORMAT, "config": dataclasses.asdict(model.config), "state_dict": state,
                "metadata": metadata}, path_or_file)


def load_checkpoint(path_or_file: PathOrFile, map_location: Any = "cpu"
                    ) -> tuple[IMHNConfig, dict[str, torch.Tensor], dict]:
    """Read ours or the authors' checkpoint -> (config, state_dict with our key names, metadata).

    The state_dict is checked against the config's architecture (every key present, no extra key, shapes).
    For the authors' format metadata is {"source_format": "reference", "epoch": ..., "train_loss": ...}.
    Raises CheckpointError for unreadable, corrupt or truncated files, unknown formats and mismatches.
    """
    name = _describe(path_or_file)
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
            raw = torch.load(path_or_file, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, OSError,
            AttributeError, KeyError) as error:
        raise CheckpointError(f"{name} is not a readable torch checkpoint (corrupt, truncated or another file "
                              f"type): {_load_failure(error)}") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"{name} holds a {type(raw).__name__}, not a checkpoint dict")
    if raw.get("format") == FORMAT:
        return _load_ours(raw, name)
    if "weights" in raw and isinstance(raw["weights"], Mapping):
        config, state = convert_reference_state_dict(raw["weights"], name=name)
        metadata = {"source_format": "reference"}
        metadata.update({k: _plain(raw[k]) for k in ("epoch", "train_loss") if k in raw})
        return config, state, metadata
    if "format" in raw:
        raise CheckpointError(f"{name} has unsupported format {raw['format']!r}; this version reads {FORMAT!r}")
    raise CheckpointError(f"{name} is neither a simplepose checkpoint (no 'format' entry) nor the authors' "
                          f"format (no 'weights' dict); top-level keys: {sorted(map(str, raw))[:8]}")


def read_checkpoint_metadata(path_or_file: PathOrFile) -> tuple[IMHNConfig, dict]:
    """(config, metadata) of ours or the authors' checkpoint without reading its weights.

    The file is read as by `load_checkpoint` but onto the meta device: torch then reads only the pickled
    structure and the zip directory, never the tensor records (a few hundred KB of the released model's
    516 MB). The checks are the same (format, every key and shape against the config) and so are the
    errors (CheckpointError). A file object must be seekable; tensor values stored as metadata (an authors'
    `train_loss` tensor) are not read and come back as None.
    """
    config, _, metadata = load_checkpoint(path_or_file, map_location="meta")
    return config, metadata


def load_model(path_or_file: PathOrFile, map_location: Any = "cpu") -> IMHN:
    """Build the IMHN stored in ours or the authors' checkpoint, weights loaded strictly, in eval mode."""
    config, state, metadata = load_checkpoint(path_or_file, map_location)
    LOG.info("loading IMHN %s from %s (%s)", config, _describe(path_or_file),
             metadata.get("source_format", FORMAT))
    return build_model(config, state)


def build_model(config: IMHNConfig, state: Mapping[str, torch.Tensor]) -> IMHN:
    """IMHN(config) holding the tensors of `state` (our key names, loaded strictly), in eval mode."""
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = IMHN.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def infer_config(state: Mapping[str, torch.Tensor], name: str = "state_dict") -> IMHNConfig:
    """The IMHNConfig of a state_dict with our key names, read from key names and a few shapes."""
    try:
        stacks = 1 + max(int(m.group(1)) for key in state if (m := _STACK_KEY.match(key)))
        width = state["features.0.before_regress.0.0.conv.weight"].shape[0]
        increase = state["hourglass.0.hg.0.1.convBlock.6.weight"].shape[0] - width
        outputs = state["outs.0.0.conv.weight"].shape[0]
        return IMHNConfig(stacks=stacks, width=int(width), increase=int(increase), outputs=int(outputs))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{name} is not an IMHN state_dict (cannot infer stacks/width/increase/outputs: "
                              f"{type(error).__name__} {error}); first keys: {list(state)[:5]}") from error


def convert_reference_state_dict(state: Mapping[str, torch.Tensor], name: str = "state_dict"
                                 ) -> tuple[IMHNConfig, dict[str, torch.Tensor]]:
    """Map the authors' weights (`posenet.`/`module.` prefixed reference keys) to ours -> (config, state).

    Pure key mapping: prefixes are stripped, names are kept, then the key set, count and every shape are
    checked against IMHN(config) (built on the meta device, so the check costs no memory). The released
    checkpoint gives IMHNConfig(4, 256, 128, 50) and 1 848 entries including 288 `num_batches_tracked`.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: entry {key!r} is a {type(value).__name__}, not a named tensor")
        new_key = _strip_prefixes(key)
        if new_key in converted:
            raise CheckpointError(f"{name}: two entries map to the same key {new_key!r}")
        converted[new_key] = value
    config = infer_config(converted, name)
    check_state_dict(converted, config, name)
    return config, converted


def check_state_dict(state: Mapping[str, torch.Tensor], config: IMHNConfig, name: str = "state_dict") -> None:
    """Raise CheckpointError unless `state` has exactly the keys and shapes of IMHN(config)."""
    with torch.device("meta"):
        expected = IMHN.from_config(config).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(getattr(state[k], 'shape', ()))} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)]
    if missing or unexpected or wrong:
        details = "; ".join(f"{label} ({len(items)}): {', '.join(items[:4])}"
                            for label, items in (("missing", missing), ("unexpected", unexpected),
                                                 ("wrong shape", wrong)) if items)
        raise CheckpointError(f"{name} does not match IMHN{dataclasses.astuple(config)} "
                              f"({len(expected)} entries expected, {len(state)} found): {details}")


def _load_ours(raw: dict, name: str) -> tuple[IMHNConfig, dict[str, torch.Tensor], dict]:
    for key, kind in (("config", dict), ("state_dict", dict), ("metadata", dict)):
        if not isinstance(raw.get(key), kind):
            raise CheckpointError(f"{name}: entry {key!r} is missing or not a {kind.__name__}")
    try:
        config = IMHNConfig(**raw["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{name}: invalid config {raw['config']!r}: {error}") from error
    check_state_dict(raw["state_dict"], config, name)
    return config, raw["state_dict"], raw["metadata"]


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a scalar the authors stored (int, float, numpy scalar or 1-element tensor)."""
    if isinstance(value, torch.Tensor):
        if value.is_meta:  # read on the meta device (`read_checkpoint_metadata`): no value was read
            return None
        value = value.numpy(force=True)
    return value.item() if isinstance(value, (np.ndarray, np.generic)) and value.size == 1 else value


def _describe(path_or_file: PathOrFile) -> str:
    if isinstance(path_or_file, (str, os.PathLike)):
        return f"checkpoint {os.fspath(path_or_file)!r}"
    if isinstance(getattr(path_or_file, "name", None), str):  # an open file, or a buffer named by its caller
        return f"checkpoint {path_or_file.name!r}"
    return f"checkpoint file object {type(path_or_file).__name__!r}"


def _load_failure(error: BaseException) -> str:
    """Why torch.load refused a file, in a few words. torch's own text for weights-only refusals advises
    weights_only=False (running the file's code): never repeated here; only its "WeightsUnpickler error"."""
    text = str(error)
    if isinstance(error, EOFError):
        return "the file ends early (empty or truncated)"
    if "WeightsUnpickler error:" not in text:
        return f"{type(error).__name__} {text[:200]!r}"
    detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n", 1)[0].strip()
    if detail.startswith("Unsupported global"):
        found = detail.split(" was not", 1)[0].removeprefix("Unsupported global:").strip()
        return (f"it pickles Python objects ({found}), not only tensors; write checkpoints with "
                f"simplepose.checkpoint.save_checkpoint")
    return f"not a torch file of tensors ({detail[:80]})"


__all__ = ["FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "read_checkpoint_metadata",
           "load_model", "build_model", "infer_config", "convert_reference_state_dict", "check_state_dict"]
