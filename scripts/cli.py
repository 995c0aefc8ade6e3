"""The ``circuits`` command. A thin layer: parse, call the library, print a short table, write JSON.

Each subcommand lives in its own module under ``scripts/`` with a ``register(subparsers)`` function; heavy
imports happen inside the handler, so ``circuits --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that define subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "scripts.cmd_suite",
    "scripts.cmd_toy",
    "scripts.cmd_mnist",
    "scripts.cmd_dashboard",
    "scripts.cmd_probe",
    "scripts.cmd_trace",
    "scripts.cmd_intervene",
    "scripts.cmd_batch",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuits",
        description="Exact feature-basis circuits, dictionaries and dashboards for transformers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, IndexError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"circuits {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
