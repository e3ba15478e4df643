"""`simplepose bench NAME`: benchmarks that print their figures and the machine they ran on."""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "targets": ("jobs.bench.targets", "augmentation + ground-truth generation samples/s per core"),
    "network": ("jobs.bench.network", "IMHN images/s at a given size, device and precision"),
    "label": ("jobs.bench.label", "labeling job end to end vs each stage alone"),
    "decoder": ("jobs.bench.decoder", "decoder caps: candidates, persons, assembly ms on photos and noise maps"),
    "onnx": ("jobs.bench.onnx", "onnxruntime vs torch images/s on this CPU for the labeling network's forward"),
    "scale": ("jobs.bench.scale", "labeling orchestration at 10^4..10^6 objects: freeze, commits, resume, RSS"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(bench_parser)


def main(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).main(args)
