"""`simplepose bench network`: IMHN forward images/s at a given size, batch, device and precision.

Forward only, under `torch.inference_mode()`, on random input; weights are random with a scale-preserving
init (the training init, std 0.001, drives activations into float32 denormals, which are slow on CPUs and
unlike trained weights) unless --checkpoint gives real ones. The paper's figure is 38.5 images/s on one
RTX 2080 Ti at 512x512 (docs/method.md §14); the reference forward takes about 6 s per 512x512 image on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

from jobs.bench.machine import describe_machine
from simplepose.checkpoint import load_model
from simplepose.model import IMHN, IMHNConfig

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = IMHNConfig()
    parser.add_argument("--stacks", type=int, default=defaults.stacks, help="IMHN stacks (default %(default)s)")
    parser.add_argument("--width", type=int, default=defaults.width, help="IMHN width (default %(default)s)")
    parser.add_argument("--increase", type=int, default=defaults.increase,
                        help="IMHN channel increase per hourglass level (default %(default)s)")
    parser.add_argument("--checkpoint", help="load this checkpoint instead of building random weights")
    parser.add_argument("--size", type=int, default=512, help="input height and width, multiple of 64")
    parser.add_argument("--batch", type=int, default=8, help="images per forward (default %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="bf16/fp16 run under torch.autocast")
    parser.add_argument("--channels-last", action="store_true", help="NHWC activations")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 avoids "
                        "spin-waiting when other processes share the cores")
    parser.add_argument("--iters", type=int, default=10, help="timed batches")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")


def count_macs(config: IMHNConfig, size: int) -> int:
    """Multiply-accumulates of conv and linear layers for one size x size image, from a meta-device forward
    in eval mode (each module once; the reference re-runs the two j = 0 merges, +1.4% at 512)."""
    with torch.device("meta"):
        model = IMHN.from_config(config).eval()
    macs = 0

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal macs
        weight = module.weight
        macs += output.numel() * (weight[0].numel() if isinstance(module, nn.Conv2d) else weight.shape[1])

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(hook)
    model(torch.empty(1, 3, size, size, device="meta"))
    return macs


def build(args: argparse.Namespace) -> IMHN:
    if args.checkpoint:
        return load_model(args.checkpoint)
    model = IMHN(args.stacks, args.width, args.increase)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, a=0.01, nonlinearity="leaky_relu")
    return model.eval()


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args)
    print(f"machine: {describe_machine()}")
    print(f"config: {model.config}, parameters: {sum(p.numel() for p in model.parameters()):,}")
    print(f"compute: {count_macs(model.config, args.size) / 1e9:.4g} GMAC per {args.size}x{args.size} image")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if args.compile:
        model = torch.compile(model)
    image = torch.rand(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=memory_format)
    dtype = PRECISIONS[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for step in range(args.warmup + args.iters):
            start = time.perf_counter()
            model(image)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"device: {device}, precision: {args.precision}, channels_last: {args.channels_last}, "
          f"compile: {args.compile}, input: {args.batch}x3x{args.size}x{args.size}")
    print(f"forward: median {median * 1e3:.1f} ms/batch (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f},"
          f" {len(times)} batches after {args.warmup} warm-up): {args.batch / median:.2f} images/s")
    return 0
