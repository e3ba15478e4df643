"""`simplepose bench label` with its inputs on an S3-protocol server, optionally behind added latency.

    .venv/bin/python scripts/bench_label_s3.py --objects 1024 --latency-ms 50 -- --null-network --json

Starts moto's standalone server on loopback, uploads `--objects` copies of the coco-mini train2017 photos to
s3://bench/images/, puts the tests' fault proxy (tests/faultproxy.py) in front of it with a "delay" rule on
every request (`--latency-ms`: a distant store's round trip), then runs `simplepose bench label --input
s3://bench/images/ --images N` with the arguments after `--`, the proxy as AWS_ENDPOINT_URL. Prints the
bench's output, then one JSON line: the bench's figures plus "s3" (objects, latency_ms, requests by kind
as the proxy counted them). moto and the proxy run on the same machine as the job: on 2 cores they take
CPU from it, so rates are lower than against a remote store; the job's own CPU is measured as always.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from faultproxy import FaultProxy, Rule  # noqa: E402 - the tests' proxy, found through sys.path
from pipelines import storage  # noqa: E402
from pipelines.demo import loopback_s3  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1024, help="objects uploaded and labeled")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request by the proxy")
    parser.add_argument("--shared", default=os.environ.get("SIMPLEPOSE_SHARED", str(REPO.parent / "shared")),
                        help="the shared data folder (coco-mini)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then `simplepose bench label` arguments")
    args = parser.parse_args()
    photos = sorted((Path(args.shared) / "data" / "coco-mini" / "train2017").glob("*.jpg"))
    if not photos:
        parser.error(f"no coco-mini photos under {args.shared}/data/coco-mini/train2017")

    with loopback_s3() as endpoint:  # moto, dummy credentials, AWS_ENDPOINT_URL for this process
        fs, _ = storage.filesystem("s3://bench")
        fs.mkdir("bench")
        fs.pipe({f"bench/images/{n:07d}.jpg": photos[n % len(photos)].read_bytes() for n in range(args.objects)})
        proxy = FaultProxy(endpoint).start()
        if args.latency_ms > 0:
            proxy.rules = [Rule("delay", delay_s=args.latency_ms / 1e3)]
        bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
        command = [str(Path(sys.executable).parent / "simplepose"), "bench", "label", "--input",
                   "s3://bench/images/", "--images", str(args.objects), *bench_args]
        try:  # the job reads through the proxy
            result = subprocess.run(command, env={**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint},
                                    capture_output=True, text=True)
        finally:
            proxy.stop()
    print(result.stdout, end="")
    if result.returncode:
        print(result.stderr[-4000:], file=sys.stderr)
        return result.returncode
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    s3 = {"objects": args.objects, "latency_ms": args.latency_ms, "requests": dict(proxy.requests)}
    print(json.dumps({**figures, "s3": s3}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
