"""`simplepose evaluate MODEL ANNOTATIONS IMAGES`: COCO keypoint AP of a model, logged to MLflow.

MODEL is a checkpoint path/URI (ours or the authors') or a registry URI (models:/simplepose-imhn@candidate).
"""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint path/URI or models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("annotations", help="COCO keypoint annotation JSON (any fsspec URI)")
    parser.add_argument("images", help="image prefix: image i is IMAGES/<file_name> (any fsspec URI)")
    parser.add_argument("--preset", default="paper", help="inference preset: paper, head or fast")
    parser.add_argument("--scales", type=float, nargs="+", help="override the preset's scales")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="override the preset's flip averaging")
    parser.add_argument("--boxsize", type=int, help="override the preset's boxsize (pixels)")
    parser.add_argument("--decoder", default="default", choices=["default", "reference"], help="decoder mode")
    parser.add_argument("--max-images", type=int, help="evaluate the first N images of the file")
    parser.add_argument("--batch-size", type=int, default=4, help="images per network batch")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--results", help="also write the COCO results JSON to this URI")
    parser.add_argument("--set-name", help="name of the evaluation set in MLflow (default: annotation file stem)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    parser.add_argument("--experiment", default="simplepose-eval", help="MLflow experiment")
    parser.add_argument("--artifact-location", default="mlruns/artifacts",
                        help="artifact location of a new experiment (folder or s3://...)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--json", action="store_true", help="print the stats as one JSON line")


def main(args: argparse.Namespace) -> int:
    from pipelines.evaluate import EvalTracking, infer_config_for, run_evaluation
    from simplepose.decode import DecoderConfig

    infer_config = infer_config_for(args.preset, args.scales, args.flip, args.boxsize)
    track = None
    if not args.no_mlflow:
        track = EvalTracking(tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or EvalTracking.tracking_uri, experiment=args.experiment,
                             artifact_location=args.artifact_location, set_name=args.set_name)
    result = run_evaluation(args.model, args.annotations, args.images, infer_config,
                            DecoderConfig(mode=args.decoder), results_uri=args.results,
                            max_images=args.max_images, batch_size=args.batch_size, device=args.device, track=track)
    if args.json:
        print(json.dumps({**result.stats, "images": result.num_images, "detections": result.num_detections,
                          "seconds": round(result.seconds, 2), "run_id": result.run_id}))
    else:
        for key, value in result.stats.items():
            print(f"{key:5s} {value:.4f}")
        print(f"{result.num_images} images, {result.num_detections} detections, {result.seconds:.1f} s"
              + (f", MLflow run {result.run_id}" if result.run_id else ""))
    return 0
