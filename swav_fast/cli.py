"""The ``swav-fast`` command line: a thin layer over the library.

Each subcommand lives in ``swav_fast/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed namespace, returns an exit code).
A subcommand with an ``overrides`` argument takes ``section.key=value`` words anywhere on its command
line. Nothing heavy (torch) is imported before a subcommand runs: ``--help``, ``--list-keys`` and
argument errors answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from swav_fast.errors import SwavFastError

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS = ("synth", "train", "launch", "eval", "prepare", "inspect", "bench", "export", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swav-fast",
        description="Fast self-supervised pretraining (SwAV and family) with GPU multi-crop loaders.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"swav_fast.commands.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built yet
            if exc.name == f"swav_fast.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``section.key=value`` words after options (which argparse
    leaves over once the ``overrides`` positional is filled) are added to ``args.overrides`` in order."""
    from swav_fast.config import is_override

    args, extras = parser.parse_known_args(argv)
    if extras and isinstance(getattr(args, "overrides", None), list):
        args.overrides += [e for e in extras if is_override(e)]
        extras = [e for e in extras if not is_override(e)]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return int(args.func(args) or 0)
    except SwavFastError as exc:
        print(f"swav-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"swav-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
