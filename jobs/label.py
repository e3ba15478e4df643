"""`simplepose label INPUT OUTPUT --model MODEL`: label image objects into Parquet pose tables (docs/tables.md).

Re-running the same command after a failure finishes the missing work without duplicate rows; the run is
complete when OUTPUT/_SUCCESS exists. Endpoint and credentials come from the standard settings
(AWS_ENDPOINT_URL, AWS_PROFILE, ...) or --storage-option; they are never printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging

from jobs.options import add_storage_option, storage_options
from pipelines.label.job import LabelJobConfig, run_label_job

LOG = logging.getLogger(__name__)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LabelJobConfig)}


def _pair(text: str) -> tuple[int, int | None]:
    """MIN[,MAX] -> (min, max); "MIN," leaves max to be sized from the cluster (None)."""
    low, comma, high = text.partition(",")
    return int(low), (int(high) if high else None if comma else int(low))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="prefix, glob or object URI of images, or a manifest "
                                      "(.parquet/.csv with a 'uri' column, .txt/.lst with one URI a line)")
    parser.add_argument("output", help="output folder URI (images/, poses/, _manifest.json, _SUCCESS)")
    parser.add_argument("--model", required=True,
                        help="checkpoint URI (ours or the authors') or MLflow registry URI models:/NAME@ALIAS")
    parser.add_argument("--boxsize", type=int, default=_DEFAULTS["boxsize"],
                        help="pixels the image height is scaled to at scale 1 (default %(default)s)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(_DEFAULTS["scales"]),
                        help="test-time scales, averaged (default %(default)s)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=_DEFAULTS["flip"],
                        help="average with the horizontally flipped image (default on)")
    parser.add_argument("--mode", choices=("default", "reference"), default=_DEFAULTS["mode"],
                        help="decoder: ours or the authors' exact one (default %(default)s)")
    parser.add_argument("--aggregation", choices=("reference", "stride4"), default=None,
                        help="heatmap aggregation (default: reference for --mode reference, else stride4)")
    parser.add_argument("--max-pixels", type=int, default=_DEFAULTS["max_pixels"],
                        help="images with more pixels get status too_large (default %(default)s)")
    parser.add_argument("--min-person-score", type=float, default=None,
                        help="output floor: persons scoring below are not written (default: PoseFloor's)")
    parser.add_argument("--min-keypoints", type=int, default=None,
                        help="output floor: persons with fewer detected keypoints are not written "
                             "(default: PoseFloor's)")
    parser.add_argument("--forward-batch-size", type=int, default=_DEFAULTS["forward_batch_size"],
                        help="images of one padded shape per network forward (default %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=_DEFAULTS["chunk_size"],
                        help="objects per committed part file (default %(default)s)")
    for stage in ("read", "decode", "network", "assemble"):
        parser.add_argument(f"--{stage}-batch-size", type=int, default=_DEFAULTS[f"{stage}_batch_size"],
                            help=f"rows per {stage} batch (default %(default)s)")
        parser.add_argument(f"--{stage}-cpus", type=float, default=_DEFAULTS[f"{stage}_cpus"],
                            help=f"logical CPUs per {stage} task/actor (default %(default)s)")
    for stage in ("decode", "network", "assemble"):
        default = _DEFAULTS[f"{stage}_actors"]
        parser.add_argument(f"--{stage}-actors", type=_pair, default=default, metavar="MIN[,MAX]",
                            help=f"{stage} actor pool size; 'MIN,' sizes the maximum from the cluster "
                                 f"(default {default[0]},{'' if default[1] is None else default[1]})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=_DEFAULTS["device"],
                        help="network device; auto = a GPU per network actor when the cluster has GPUs "
                             "(default %(default)s)")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default=_DEFAULTS["precision"],
                        help="network precision; auto = bf16 or fp16 on GPUs, fp32 on CPU (default %(default)s)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="NHWC activations in the network (default: on CUDA only)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network once per actor")
    parser.add_argument("--allow-local-paths", action="store_true",
                        help="let a manifest on an object store name local paths (read from the workers' disks)")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous run in OUTPUT and start afresh")
    parser.add_argument("--progress-interval", type=float, default=_DEFAULTS["progress_interval_s"],
                        help="seconds between progress lines (default %(default)s)")
    parser.add_argument("--stall-timeout", type=float, default=_DEFAULTS["stall_timeout_s"],
                        help="end the job after this many seconds without a new output row, naming the stages "
                             "that wait for resources; 0 = never; a re-run resumes (default %(default)s)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    add_storage_option(parser)


def config_from_args(args: argparse.Namespace) -> LabelJobConfig:
    options = storage_options(args)
    stages = ("read", "decode", "network", "assemble")
    return LabelJobConfig(
        input=args.input, output=args.output, model=args.model, boxsize=args.boxsize, scales=tuple(args.scales),
        flip=args.flip, mode=args.mode, aggregation=args.aggregation, max_pixels=args.max_pixels,
        chunk_size=args.chunk_size, min_person_score=args.min_person_score, min_keypoints=args.min_keypoints,
        forward_batch_size=args.forward_batch_size, channels_last=args.channels_last, compile=args.compile,
        device=args.device, precision=args.precision, overwrite=args.overwrite,
        allow_local_paths=args.allow_local_paths,
        address=args.address, storage_options=options, progress_interval_s=args.progress_interval,
        stall_timeout_s=args.stall_timeout or None,
        **{f"{s}_batch_size": getattr(args, f"{s}_batch_size") for s in stages},
        **{f"{s}_cpus": getattr(args, f"{s}_cpus") for s in stages},
        **{f"{s}_actors": getattr(args, f"{s}_actors") for s in stages[1:]})


def main(args: argparse.Namespace) -> int:
    summary = run_label_job(config_from_args(args))
    print(summary.format())
    return 0
