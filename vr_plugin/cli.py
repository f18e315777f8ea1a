"""The ``vr-plugin`` command: each subcommand is a few lines over the public API."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from .spec import ACCEPTED_FORMS, describe_indices, select_layers

EPILOG_SELECT = """examples:
  vr-plugin select uniform_0.25 --num-layers 32     # 1,5,9,13,19,23,27,31
  vr-plugin select 1::4 --num-layers 40
"""


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def cmd_select(args: argparse.Namespace) -> int:
    """Print the indices a spec selects."""
    indices = select_layers(args.spec, args.num_layers)
    print(describe_indices(indices) if indices else "(none)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vr-plugin`` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="vr-plugin",
        description="Tune only the visual region of an LVLM's LLM, and prune around it (arXiv 2412.12785).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    select = sub.add_parser(
        "select",
        help="show the layer indices a region spec selects",
        description=f"Resolve a region spec to 0-based decoder-layer indices. Accepted forms: {ACCEPTED_FORMS}.",
        epilog=EPILOG_SELECT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    select.add_argument("spec", help="region spec, e.g. uniform_0.25")
    select.add_argument("--num-layers", type=int, required=True, help="decoder depth of the LLM")
    select.set_defaults(func=cmd_select)
    return parser


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``vr-plugin`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, CliError, FileNotFoundError, LookupError) as error:
        print(f"vr-plugin {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
