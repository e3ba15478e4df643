"""`simplepose render RUN_OUTPUT OUT_DIR`: draw a labeling run's poses onto its images (`pipelines.render`)."""
from __future__ import annotations

import argparse

from pipelines.render import FORMATS, render_run
from simplepose.decode import POSE_FLOOR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_output", help="output folder URI of a labeling run (holds images/ and poses/)")
    parser.add_argument("out_dir", help="folder URI for the overlays (local path, s3://..., any fsspec URI)")
    parser.add_argument("--limit", type=int, default=50,
                        help="render the first N images with status ok, in input order; 0 = all (default %(default)s)")
    parser.add_argument("--min-score", type=float, default=None,
                        help="draw persons with a score >= this (default: the poses floor, "
                             f"simplepose.decode.POSE_FLOOR, {POSE_FLOOR.min_person_score})")
    parser.add_argument("--min-keypoints", type=int, default=None,
                        help="draw persons with at least this many keypoints (default: the poses floor, "
                             f"{POSE_FLOOR.min_keypoints}); --min-score 0 --min-keypoints 0 draws every person")
    parser.add_argument("--format", choices=FORMATS, default="jpg", dest="image_format",
                        help="overlay file format (default %(default)s)")


def main(args: argparse.Namespace) -> int:
    summary = render_run(args.run_output, args.out_dir, limit=args.limit or None, min_score=args.min_score,
                         image_format=args.image_format, min_keypoints=args.min_keypoints)
    print(f"rendered {summary.images} images with {summary.persons} persons to {args.out_dir}"
          + (f" ({summary.failed} could not be read or decoded)" if summary.failed else ""))
    return 0 if summary.failed == 0 else 1
