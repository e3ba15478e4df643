"""`simplepose evaluate MODEL ANNOTATIONS IMAGES [section.key=value ...]`: COCO keypoint AP of a model, logged
to MLflow.

MODEL is a checkpoint path/URI (ours or the authors') or a registry URI (models:/simplepose-imhn@candidate).
The config is `pipelines.evaluate.EvaluateJobConfig` (infer.*, decoder.*, tracking.*, ...); the flags below
are shortcuts (`--print-config` shows every key).
"""
from __future__ import annotations

import argparse
import json
import os

from jobs.options import (add_config_arguments, add_shortcut, add_storage_option, load_job_config,
                          printed_config, shortcut_values, storage_options)
from pipelines.config import to_dict
from pipelines.evaluate import EvalTracking, EvaluateJobConfig, run_evaluation
from simplepose.infer import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint path/URI or models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("annotations", help="COCO keypoint annotation JSON (any fsspec URI)")
    parser.add_argument("images", help="image prefix: image i is IMAGES/<file_name> (any fsspec URI)")
    add_config_arguments(parser, "the evaluation config")

    def shortcut(flag: str, path: str, help: str, **kwargs) -> None:
        add_shortcut(parser, flag, path, EvaluateJobConfig, help, **kwargs)

    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start infer.* from this preset (default: paper, the paper's five scales)")
    shortcut("--scales", "infer.scales", "test-time scales", type=float, nargs="+")
    shortcut("--flip", "infer.flip", "flip averaging", action=argparse.BooleanOptionalAction)
    shortcut("--boxsize", "infer.boxsize", "pixels the image height is scaled to at scale 1", type=int)
    shortcut("--mode", "decoder.mode", "decoder mode", choices=("default", "reference"))
    shortcut("--decoder", "decoder.mode", "the same as --mode (kept for scripts)", choices=("default", "reference"))
    shortcut("--max-images", "max_images", "evaluate the first N images of the file", type=int)
    shortcut("--batch-size", "batch_size", "images per network batch", type=int)
    shortcut("--device", "device", "cuda, cuda:1 or cpu (default: cuda when available)")
    shortcut("--results", "results", "also write the COCO results JSON to this URI")
    shortcut("--set-name", "tracking.set_name", "name of the evaluation set in MLflow (default: annotation file "
             "stem)")
    shortcut("--tracking-uri", "tracking.tracking_uri", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
             f"else {EvalTracking.tracking_uri})")
    shortcut("--experiment", "tracking.experiment", "MLflow experiment")
    shortcut("--artifact-location", "tracking.artifact_location", "artifact location of a new experiment "
             "(folder or s3://...)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (= tracking=null)")
    parser.add_argument("--json", action="store_true", help="print the stats as one JSON line")
    add_storage_option(parser)


def main(args: argparse.Namespace) -> int:
    values = {"model": args.model, "annotations": args.annotations, "images": args.images}
    if args.preset:
        values["infer"] = to_dict(PRESETS[args.preset])
    if args.no_mlflow:
        values["tracking"] = None
    elif os.environ.get("MLFLOW_TRACKING_URI") and "tracking.tracking_uri" not in shortcut_values(args):
        values["tracking.tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
    options = storage_options(args)
    config = load_job_config(EvaluateJobConfig, args, values, storage_options=options)
    if printed_config(args, config):
        return 0
    result = run_evaluation(config.model, config.annotations, config.images, config.infer, config.decoder,
                            results_uri=config.results, max_images=config.max_images, batch_size=config.batch_size,
                            device=config.device, track=config.tracking, storage_options=options)
    if args.json:
        print(json.dumps({**result.stats, "images": result.num_images, "detections": result.num_detections,
                          "seconds": round(result.seconds, 2), "run_id": result.run_id}))
    else:
        for key, value in result.stats.items():
            print(f"{key:5s} {value:.4f}")
        print(f"{result.num_images} images, {result.num_detections} detections, {result.seconds:.1f} s"
              + (f", MLflow run {result.run_id}" if result.run_id else ""))
    return 0
