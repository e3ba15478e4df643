"""`simplepose export RUN OUT --format coco-results|coco`: a labeling run as COCO JSON.

`coco-results`: the COCO keypoint results list (pycocotools `COCO(ann).loadRes(OUT)`, COCOeval);
`coco`: a COCO annotations file (images, person keypoints, the person category and skeleton) that CVAT and
Label Studio import. Image ids come from `--annotations ANN.json` (matched by file name), else
`input_index + 1`. The run is streamed part by part (`pipelines.export`); a run without `_SUCCESS` is refused
unless `--allow-incomplete`.
"""
from __future__ import annotations

import argparse

from jobs.options import add_storage_option, storage_options
from pipelines.export import FORMATS, export_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_output", metavar="RUN",
                        help="output folder URI of a labeling run (local path, s3://..., any fsspec URI)")
    parser.add_argument("out", metavar="OUT", help="where to write the JSON file (local path or any fsspec URI)")
    parser.add_argument("--format", choices=FORMATS, default="coco-results",
                        help="coco-results: COCO keypoint results for COCOeval; coco: a COCO annotations file for "
                             "CVAT / Label Studio (default %(default)s)")
    parser.add_argument("--annotations", metavar="ANN.json", default=None,
                        help="COCO annotation file whose image ids to use, matched by file name (base name of "
                             "each object's URI vs images[].file_name); default: ids are input_index + 1")
    parser.add_argument("--keypoint-threshold", type=float, default=0.0,
                        help="coco: a detected keypoint is visible (v=2) when its score >= this, else (0, 0, 0) "
                             "(default %(default)s: every detected keypoint)")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="export the committed chunks of a run without _SUCCESS (running or stopped)")
    add_storage_option(parser)


def main(args: argparse.Namespace) -> int:
    options = storage_options(args)
    summary = export_run(args.run_output, args.out, format=args.format, annotations=args.annotations,
                         keypoint_threshold=args.keypoint_threshold, allow_incomplete=args.allow_incomplete,
                         storage_options=options)
    state = "complete" if summary.complete else "INCOMPLETE"
    notes = []
    if summary.skipped_images:
        notes.append(f"{summary.skipped_images} images not ok left out")
    if summary.unmatched_images:
        notes.append(f"{summary.unmatched_images} images not in {args.annotations}")
    if summary.dropped_persons:
        notes.append(f"{summary.dropped_persons} persons without a visible keypoint dropped")
    print(f"run {summary.run_id} ({state}, {summary.parts} chunks) exported as {summary.format}: {summary.images} "
          f"images, {summary.persons} persons{'; ' + '; '.join(notes) if notes else ''} -> {summary.output}")
    return 0
