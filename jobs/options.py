"""Command-line options that several commands share, defined once."""
from __future__ import annotations

import argparse

from pipelines.config import defaults_dict, format_config, load_config
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


CONFIG_PREFIX = "config:"
"""argparse dests of flag shortcuts are CONFIG_PREFIX + the dotted config path they set."""


def add_config_arguments(parser: argparse.ArgumentParser, what: str = "the job's config") -> None:
    """`--config FILE.yaml`, `--print-config` and trailing `section.key=value` overrides (`pipelines.config`)."""
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                        help=f"dotted overrides of {what}, e.g. decoder.attach_fragments=false; they win over "
                             "flags and --config (--print-config lists every key)")
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML config file (any URI); flags and dotted overrides win over it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON (a valid --config file) and exit")


def add_shortcut(parser: argparse.ArgumentParser, flag: str, path: str, config_class: type, help: str,
                 **kwargs) -> None:
    """A flag that sets the config field at dotted `path` (shown with its default); unset flags set nothing,
    so a --config file's value stands unless the flag is given."""
    default = _lookup(defaults_dict(config_class), path)
    shown = "" if default is None or "default" in help else f" (default {_shown(default)})"
    if kwargs.get("action") in (None, "store") and "choices" not in kwargs:
        kwargs.setdefault("metavar", path.rsplit(".", 1)[-1].upper())
    parser.add_argument(flag, dest=CONFIG_PREFIX + path, default=argparse.SUPPRESS,
                        help=f"{help}{shown} [{path}]", **kwargs)


def shortcut_values(args: argparse.Namespace) -> dict[str, object]:
    """{dotted path: value} of the shortcut flags given on the command line."""
    return {name[len(CONFIG_PREFIX):]: value for name, value in vars(args).items()
            if name.startswith(CONFIG_PREFIX)}


def load_job_config(config_class: type, args: argparse.Namespace, values: dict | None = None, *,
                    storage_options: dict | None = None, secrets: dict | None = None):
    """`config_class` from --config (read with `storage_options`), `values` (e.g. positionals), the shortcut
    flags, the dotted overrides and `secrets` (fields set only in code, e.g. storage_options)."""
    return load_config(config_class, args.config, args.overrides, values={**(values or {}), **shortcut_values(args)},
                       secrets=secrets, storage_options=storage_options)


def printed_config(args: argparse.Namespace, config) -> bool:
    """With --print-config: print `config` (secrets left out) and return True: the command is done."""
    if args.print_config:
        print(format_config(config))
    return args.print_config


def _lookup(data: dict, path: str):
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _shown(value) -> str:
    return ",".join("" if v is None else str(v) for v in value) if isinstance(value, list) else str(value)
