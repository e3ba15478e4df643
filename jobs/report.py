"""`simplepose report RUN_OUTPUT OUT.html`: one self-contained HTML page about a labeling run.

Counts per status, persons per image, person- and keypoint-score histograms, the detection rate of each
COCO keypoint, the model and settings, and overlay thumbnails of the best, worst and some random images
(`pipelines.report`). The page loads nothing from anywhere; charts need the extra `simplepose[report]`.
"""
from __future__ import annotations

import argparse

from pipelines.report import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_output", help="output folder URI of a labeling run (local path, s3://..., any fsspec URI)")
    parser.add_argument("out_html", help="where to write the HTML page (local path or any fsspec URI)")
    parser.add_argument("--thumbnails", type=int, default=8,
                        help="overlays per group: best, worst and random images; 0 = none (default %(default)s)")
    parser.add_argument("--keypoint-threshold", type=float, default=0.0,
                        help="a keypoint counts as detected when its score is above this (default %(default)s)")
    parser.add_argument("--thumbnail-size", type=int, default=320,
                        help="longest side of a thumbnail in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample of images (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    summary = write_report(args.run_output, args.out_html, thumbnails=args.thumbnails,
                           keypoint_threshold=args.keypoint_threshold, thumbnail_size=args.thumbnail_size,
                           seed=args.seed)
    state = "complete" if summary.complete else "INCOMPLETE"
    print(f"report of run {summary.run_id} ({state}: {summary.images} objects, {summary.persons} persons, "
          f"{summary.thumbnails} thumbnails{'' if summary.charts else ', no charts: pip install simplepose[report]'})"
          f" written to {summary.output}")
    return 0
