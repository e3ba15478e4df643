"""`simplepose train CONFIG.yaml [section.key=value ...]`: Ray Train data-parallel AMP training of the IMHN.

Connects to the Ray cluster in $RAY_ADDRESS (a RayJob or `ray job submit` sets it), else starts a local one.
Re-running with the same `checkpoint.run_name` resumes. With an `evaluation` section (and `promote: true`)
the job then evaluates the new model version and promotes it: the retraining chain.
"""
from __future__ import annotations

import argparse
import json
import logging
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job config YAML (any fsspec URI), e.g. jobs/configs/coco_mini_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: optimizer.lr=1e-3 scaling.num_workers=2")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray cluster started by this command")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def main(args: argparse.Namespace) -> int:
    from pipelines.train.config import load_train_config

    config = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    for key, value in (("RAY_AUTH_MODE", "disabled"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("RAY_BACKEND_LOG_LEVEL", "fatal")):
        os.environ.setdefault(key, value)  # before Ray starts, so its workers inherit them (Ray auth, MLflow telemetry)
    import ray

    from pipelines.train.job import run_training

    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
    result = run_training(config)
    summary = {"run_id": result.run_id, "model_version": result.model_version,
               "checkpoint": result.checkpoint_uri, "metrics": result.metrics}
    if result.evaluation is not None:
        summary["evaluation"] = result.evaluation.stats
    if result.promotion is not None:
        summary["promoted"] = result.promotion.promoted
        summary["promotion_reason"] = result.promotion.reason
    print(json.dumps(summary, default=str))
    return 0
