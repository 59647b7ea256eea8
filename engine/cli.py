"""The ``rsmoe`` command line: subcommands are registered through the ``rsmoe.commands`` entry points.

Each entry point is a ``register(subparsers)`` function that adds one or more subcommands and sets
``func`` (``args -> exit code``). Registration modules stay light (heavy imports happen in handlers), so
``rsmoe --help`` is quick. :class:`engine.errors.RSMoEError` becomes a one-line message and its exit code.
"""
from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from typing import Sequence

from engine import __version__
from engine.errors import RSMoEError

log = logging.getLogger("rsmoe")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="rsmoe",
        description="RS-MoE: caption, question and annotate remote-sensing imagery locally.",
    )
    parser.add_argument("--version", action="version", version=f"rsmoe {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in sorted(entry_points(group="rsmoe.commands"), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:  # third-party chatter only when debugging
        for noisy in ("transformers", "peft", "urllib3", "httpx", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RSMoEError as exc:
        print(f"rsmoe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rsmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
