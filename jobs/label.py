"""`simplepose label INPUT OUTPUT --model MODEL [section.key=value ...]`: label image objects into Parquet pose
tables (docs/tables.md).

Every field of the job's config (`pipelines.label.config.LabelJobConfig`: infer.*, decoder.*, floor.*,
read/decode/network/assemble.*) is a dotted override or a --config YAML key; the flags below are shortcuts to
the most used ones (`--print-config` shows them all). Re-running the same command after a failure finishes the
missing work without duplicate rows; the run is complete when OUTPUT/_SUCCESS exists. Endpoint and credentials
come from the standard settings (AWS_ENDPOINT_URL, AWS_PROFILE, ...) or --storage-option; they are never printed.
"""
from __future__ import annotations

import argparse

from jobs.options import (add_config_arguments, add_shortcut, add_storage_option, load_job_config, printed_config,
                          shortcut_values, storage_options)
from pipelines.label.config import DEVICES, PRECISIONS, LabelJobConfig
from pipelines.label.job import run_label_job
from pipelines.label.stages import NETWORK_ENGINES


def _pair(text: str) -> tuple[int, int | None]:
    """MIN[,MAX] -> (min, max); "MIN," leaves max to be sized from the cluster (None)."""
    low, comma, high = text.partition(",")
    return int(low), (int(high) if high else None if comma else int(low))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="prefix, glob or object URI of images, or a manifest "
                                      "(.parquet/.csv with a 'uri' column, .txt/.lst with one URI a line)")
    parser.add_argument("output", help="output folder URI (images/, poses/, _manifest.json, _SUCCESS)")
    add_config_arguments(parser, "the labeling job's config")

    def shortcut(flag: str, path: str, help: str, **kwargs) -> None:
        add_shortcut(parser, flag, path, LabelJobConfig, help, **kwargs)

    shortcut("--model", "model", "checkpoint URI (ours or the authors') or MLflow registry URI models:/NAME@ALIAS "
             "(required, here or in --config)")
    shortcut("--boxsize", "infer.boxsize", "pixels the image height is scaled to at scale 1", type=int)
    shortcut("--scales", "infer.scales", "test-time scales, averaged", type=float, nargs="+")
    shortcut("--flip", "infer.flip", "average with the horizontally flipped image",
             action=argparse.BooleanOptionalAction)
    shortcut("--mode", "decoder.mode", "decoder: ours or the authors' exact one; reference also sets "
             "infer.aggregation=reference unless --aggregation is given", choices=("default", "reference"))
    shortcut("--aggregation", "infer.aggregation", "heatmap aggregation", choices=("reference", "stride4"))
    shortcut("--max-pixels", "max_pixels", "images with more pixels get status too_large", type=int)
    shortcut("--min-person-score", "floor.min_person_score", "output floor: persons scoring below are not "
             "written", type=float)
    shortcut("--min-keypoints", "floor.min_keypoints", "output floor: persons with fewer detected keypoints are "
             "not written", type=int)
    shortcut("--chunk-size", "chunk_size", "objects per committed part file", type=int)
    shortcut("--forward-batch-size", "network.forward_batch_size", "images of one padded shape per network "
             "forward", type=int)
    for stage in ("read", "decode", "network", "assemble"):
        shortcut(f"--{stage}-batch-size", f"{stage}.batch_size", f"rows per {stage} batch", type=int)
        shortcut(f"--{stage}-cpus", f"{stage}.cpus", f"logical CPUs per {stage} task/actor", type=float)
    for stage in ("decode", "network", "assemble"):
        shortcut(f"--{stage}-actors", f"{stage}.actors", f"{stage} actor pool size MIN[,MAX]; 'MIN,' sizes the "
                 "maximum from the cluster", type=_pair, metavar="MIN[,MAX]")
    shortcut("--device", "network.device", "network device; auto = a GPU per network actor when the cluster has "
             "GPUs", choices=DEVICES)
    shortcut("--precision", "network.precision", "network precision; auto = bf16 or fp16 on GPUs, fp32 on CPU",
             choices=PRECISIONS)
    shortcut("--engine", "network.engine", "network engine (null: an instant stand-in for benchmarks)",
             choices=NETWORK_ENGINES)
    shortcut("--channels-last", "network.channels_last", "NHWC activations in the network (default: on CUDA "
             "only)", action=argparse.BooleanOptionalAction)
    shortcut("--compile", "network.compile", "torch.compile the network once per actor", action="store_true")
    shortcut("--allow-local-paths", "allow_local_paths", "let a manifest on an object store name local paths "
             "(read from the workers' disks)", action="store_true")
    shortcut("--overwrite", "overwrite", "delete a previous run in OUTPUT and start afresh", action="store_true")
    shortcut("--progress-interval", "progress_interval_s", "seconds between progress lines", type=float)
    shortcut("--stall-timeout", "stall_timeout_s", "end the job after this many seconds without a new output "
             "row, naming the stages that wait for resources; 0 = never; a re-run resumes", type=float)
    shortcut("--address", "address", "Ray cluster address (default: $RAY_ADDRESS, else local)")
    add_storage_option(parser)


def config_from_args(args: argparse.Namespace) -> LabelJobConfig:
    flags, options = shortcut_values(args), storage_options(args)
    values = {"input": args.input, "output": args.output}
    if flags.get("decoder.mode") == "reference" and "infer.aggregation" not in flags:
        values["infer.aggregation"] = "reference"  # the reference decoder reads original-resolution maps
    return load_job_config(LabelJobConfig, args, values, storage_options=options, secrets={"storage_options": options})


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if printed_config(args, config):
        return 0
    summary = run_label_job(config)
    print(summary.format())
    return 0
