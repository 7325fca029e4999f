"""``saeuron`` command line: collect, train, info, convert, make-tiny-pipeline, learn-concept,
remove-concept, concepts, erase, inspect, eval.

The CLI only translates arguments; the work happens in the library. Each command is a module here with
``NAME``, ``add_parser(subparsers)`` (its options) and ``run(args) -> exit status``; options that are fields
of a config dataclass are made from it (:mod:`.fields`). A user error exits with status 2 and one line
``error: ...``.

``collect`` and ``train`` also run under ``torchrun`` (``torchrun --nproc_per_node N -m
saeuron_cli train ...`` or ``torchrun --no-python ... saeuron train ...``): they join the
process group torchrun describes and split the work; only rank 0 prints.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from saeuron_core.errors import SaeuronError

from . import (collect, concepts, convert, erase, evaluate, info, inspection, learn_concept, remove_concept, tiny_pipeline,
               train)
from .common import Parser, add_gate_args, detect_with_arg, fail, gate_args, parse_seeds
from .evaluate import replace_also_at_arg

__all__ = ["COMMANDS", "add_gate_args", "build_parser", "detect_with_arg", "gate_args", "main", "parse_seeds",
           "replace_also_at_arg"]

#: the command modules, in the order ``saeuron --help`` lists them
COMMANDS = {m.NAME: m for m in (collect, train, info, convert, tiny_pipeline, learn_concept, remove_concept, concepts,
                                erase, inspection, evaluate)}


def build_parser() -> argparse.ArgumentParser:
    """The ``saeuron`` parser: one subcommand per module in :data:`COMMANDS`."""
    p = Parser(prog="saeuron", description="SAE concept erasure for diffusion models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``saeuron`` script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command].run(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except SaeuronError as exc:
        return fail(str(exc))
    except FileNotFoundError as exc:
        return fail(f"{exc.filename}: no such file or folder")
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
