"""`simplepose demo`: the labeling job end to end on an embedded local stack (`pipelines.demo`)."""
from __future__ import annotations

import argparse

from pipelines.demo import run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="out/demo",
                        help="local folder for the copied run and the overlays, in RUN_ID/ (default %(default)s)")
    parser.add_argument("--images", type=int, default=8, help="synthetic images to label (default %(default)s)")
    parser.add_argument("--model", default=None,
                        help="checkpoint URI or models:/NAME@ALIAS to label with (default: the shipped tiny "
                             "stick-figure weights)")
    parser.add_argument("--boxsize", type=int, default=256,
                        help="pixels the image height is scaled to (default %(default)s; the job's own is 640)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument("--min-score", type=float, default=0.2,
                        help="overlays draw persons scoring at least this (the tables keep every person; "
                             "default %(default)s)")


def main(args: argparse.Namespace) -> int:
    return run_demo(args.workdir, args.images, args.model, args.boxsize, args.seed, args.min_score)
