"""``ark``: the researcher's command line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``ark --help``
stays fast and a missing optional dependency breaks only its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..config import ConfigError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ark_core.commands.train", "centralized Ark+ training from a YAML config"),
    "report": ("ark_core.commands.report", "report.png and report.md of a run directory"),
    "embed": ("ark_core.commands.embed", "teacher projector embeddings to .npy + index CSV"),
    "linear-probe": ("ark_core.commands.linear_probe", "logistic regression on frozen embeddings"),
    "few-shot": ("ark_core.commands.few_shot", "linear probe on k images per class, over seeds"),
    "evaluate": ("ark_core.commands.evaluate", "a head as shipped on a task's films, across datasets"),
    "zero-shot": ("ark_core.commands.zero_shot", "score a target label with existing head outputs"),
    "finetune": ("ark_core.commands.finetune", "new head on pooled features, full fine-tuning"),
    "tsne": ("ark_core.commands.tsne", "t-SNE picture of embeddings coloured by label"),
    "subgroups": ("ark_core.commands.subgroups", "AUC and false-negative rate per subgroup"),
    "simulate": ("simulations.simulate", "a federated simulation on this node via `flwr run .`"),
    "demo": ("simulations.demo", "the embedded federated demo beside a centralized run"),
    "experiment": ("simulations.experiment", "methods over seeds on held-out data, paired CIs"),
    "keys": ("ark_core.commands.keys", "the federation's CA, server certificate and site keys"),
    "import": ("ark_core.commands.import_ark", "convert a released Ark checkpoint to a model file"),
    "export": ("ark_core.commands.export", "write a model's backbone as a timm state dict"),
    "data": ("ark_core.commands.data", "check a config's data before training: files, "
             "overlaps, counts"),
    "cache": ("ark_core.commands.cache", "pre-resized copies of the tasks' images, checked by hash"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="ark", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ark {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
