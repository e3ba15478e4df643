"""`simplepose train [CONFIG.yaml | --config CONFIG.yaml] [section.key=value ...]`: Ray Train data-parallel AMP
training of the IMHN.

Connects to the Ray cluster in $RAY_ADDRESS (a RayJob or `ray job submit` sets it), else starts a local one.
Re-running with the same `checkpoint.run_name` resumes. With an `evaluation` section (and `promote: true`)
the job then evaluates the new model version and promotes it: the retraining chain. Endpoint and credentials of
the data, init weights and checkpoints come from the standard settings (AWS_ENDPOINT_URL, AWS_PROFILE, ...) or
--storage-option; they are never printed or logged.
"""
from __future__ import annotations

import argparse
import json

from jobs.options import add_config_arguments, add_storage_option, load_job_config, printed_config, storage_options
from pipelines.ray_cluster import connect_ray
from pipelines.train.config import TrainConfig
from pipelines.train.job import run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "the training config, e.g. optimizer.lr=1e-3 scaling.num_workers=2")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray cluster started by this command")
    add_storage_option(parser)


def main(args: argparse.Namespace) -> int:
    # CONFIG.yaml may come first (`simplepose train CONFIG.yaml key=value ...`) or as --config.
    if args.config is None and args.overrides and "=" not in args.overrides[0]:
        args.config, args.overrides = args.overrides[0], args.overrides[1:]
    options = storage_options(args)
    config = load_job_config(TrainConfig, args, storage_options=options)
    if printed_config(args, config):
        return 0
    with connect_ray(num_cpus=args.num_cpus):
        result = run_training(config, storage_options=options)
    summary = {"run_id": result.run_id, "model_version": result.model_version,
               "checkpoint": result.checkpoint_uri, "metrics": result.metrics}
    if result.evaluation is not None:
        summary["evaluation"] = result.evaluation.stats
    if result.promotion is not None:
        summary["promoted"] = result.promotion.promoted
        summary["promotion_reason"] = result.promotion.reason
    print(json.dumps(summary, default=str))
    return 0
