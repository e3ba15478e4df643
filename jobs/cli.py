"""The `simplepose` command: one subcommand per module in `jobs/`.

Each command module defines `add_arguments(parser)` and `main(args) -> int`. Modules are imported only when
their command runs, so `simplepose --help` stays fast and a command never pays for another's imports.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from pipelines.errors import explain

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo", "run the labeling job end to end on an embedded local stack"),
    "label": ("jobs.label", "label images from object storage into Parquet pose tables"),
    "render": ("jobs.render", "draw detected poses from a labeling run onto its images"),
    "report": ("jobs.report", "one self-contained HTML page about a labeling run"),
    "export": ("jobs.export", "a labeling run as COCO keypoint results or a COCO annotations file"),
    "oracle": ("jobs.oracle", "decode perfect heatmaps of a COCO file: the ceiling of the grouping"),
    "train": ("jobs.train", "train the IMHN with Ray Train (data-parallel, mixed precision)"),
    "evaluate": ("jobs.evaluate", "COCO keypoint evaluation of a model, logged to MLflow"),
    "promote": ("jobs.promote", "move the MLflow 'champion' alias to a better candidate"),
    "convert-checkpoint": ("jobs.convert_checkpoint", "convert the authors' checkpoint to ours"),
    "export-model": ("jobs.export_model", "a checkpoint as ONNX (dynamic batch, height, width) for onnxruntime"),
    "bench": ("jobs.bench", "benchmarks: targets, network, label, decoder"),
}


class Parser(argparse.ArgumentParser):
    """argparse with a two-line error: the message, then where the help is (not the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n  see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="simplepose", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (also SIMPLEPOSE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the global options and the command name first; the command module owns the rest.
    top, rest = parser.parse_known_args(argv)
    debug = top.debug or "--debug" in rest or os.environ.get("SIMPLEPOSE_DEBUG", "") not in ("", "0", "false")
    rest = [arg for arg in rest if arg != "--debug"]
    prog = f"simplepose {top.command}"
    module_name, help_text = COMMANDS[top.command]
    try:
        # Only the chosen command's module: `simplepose --help` and each command skip the others' torch/Ray.
        module = importlib.import_module(module_name)
        command_parser = Parser(prog=prog, description=help_text)
        module.add_arguments(command_parser)
        try:  # options and positionals in any order: `label IN OUT --model M decoder.x=1 --print-config`
            args = command_parser.parse_intermixed_args(rest)
        except TypeError:  # a command with sub-commands (bench) cannot be parsed intermixed
            args = command_parser.parse_args(rest)
        logging.basicConfig(level=logging.DEBUG if top.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure becomes one or two lines (pipelines.errors)
        if debug:
            traceback.print_exc()
        explained = explain(error)
        print(f"{prog}: error: {explained.message}", file=sys.stderr)
        if explained.hint:
            print(f"  {explained.hint}", file=sys.stderr)
        return explained.exit_status


def run() -> None:
    """The `simplepose` executable: `main`, then exit with its status.

    When the command used Ray, the process ends with os._exit after flushing logs and output: Ray's core
    worker can abort in the interpreter's teardown after a clean `ray.shutdown()` (seen once in CI: a finished,
    committed labeling run exited with SIGABRT), and Ray ends its own worker processes the same way. Every
    command ends its own resources (Ray, MLflow runs, process pools) before it returns.
    """
    status = main()
    if "ray" not in sys.modules:
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
