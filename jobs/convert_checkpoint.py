"""`simplepose convert-checkpoint SRC DST`: the authors' checkpoint (or ours) to our checkpoint format.

SRC and DST are local paths. SRC may be `PoseNet_52_epoch.pth` from hellojialee/Improved-Body-Parts
({'weights': {'posenet.…': tensor}, 'epoch': 52}); the architecture is inferred from its keys and checked
strictly. The authors' metadata (epoch, train loss) and the source file name go into DST's metadata.
"""
from __future__ import annotations

import argparse
import os

from simplepose.checkpoint import build_model, load_checkpoint, save_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint to convert (authors' format or ours)")
    parser.add_argument("dst", help="where to write our format (simplepose-imhn/1)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def main(args: argparse.Namespace) -> int:
    if os.path.exists(args.dst) and not args.force:
        raise SystemExit(f"convert-checkpoint: {args.dst} exists; pass --force to overwrite it")
    config, state, metadata = load_checkpoint(args.src)
    model = build_model(config, state)
    metadata = {**metadata, "converted_from": os.path.basename(args.src)}
    save_checkpoint(model, args.dst, metadata)
    state = model.state_dict()
    print(f"config: {model.config}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    print(f"state_dict entries: {len(state)}")
    print(f"metadata: {metadata}")
    print(f"wrote {args.dst}")
    return 0
