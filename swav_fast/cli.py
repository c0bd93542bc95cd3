"""The ``swav-fast`` command line: a thin layer over the library.

Each subcommand lives in ``swav_fast/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed namespace, returns an exit code).
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
