"""Command-line options that several commands share, defined once."""
from __future__ import annotations

import argparse

from pipelines.errors import UsageError


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    """`--storage-option KEY=VALUE` (repeatable): fsspec options such as endpoint_url."""
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option, e.g. endpoint_url=http://minio:9000 (repeatable)")


def storage_options(args: argparse.Namespace) -> dict[str, str]:
    """The `--storage-option` items of `args` as a dict; an item without '=' is a usage error."""
    options = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--storage-option {key!r}: expected KEY=VALUE")
        options[key] = value
    return options
