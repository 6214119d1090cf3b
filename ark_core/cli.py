"""``ark``: the researcher's command line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``ark --help``
stays fast and a missing optional dependency breaks only its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ark_core.commands.train", "centralized Ark+ training from a YAML config"),
    "import": ("ark_core.commands.import_ark", "convert a released Ark checkpoint to a model file"),
    "export": ("ark_core.commands.export", "write a model's backbone as a timm state dict"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ark", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ark {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
