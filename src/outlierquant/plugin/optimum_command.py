"""``optimum-cli outlierquant export|calibrate|quantize|validate|analyze|demo``.

The subcommands are those of the ``outlierquant`` CLI, built from the same table
(:data:`outlierquant.plugin.cli.SUBCOMMANDS`): the same arguments, the same handlers, the
same one-line errors and exit codes. Only the plumbing differs: optimum builds a parser
per :class:`~optimum.commands.base.BaseOptimumCLICommand` and calls its ``run()``.

Importing this module imports argparse and optimum's command base classes, nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
from typing import ClassVar

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from outlierquant.plugin import cli

__all__ = ["OutlierQuantCommand"]


class _OutlierQuantSubcommand(BaseOptimumCLICommand):
    """One ``outlierquant`` subcommand under optimum-cli."""

    NAME: ClassVar[str] = ""

    def run(self) -> None:
        args = self.args
        cli.configure_logging(getattr(args, "verbose", False))
        code = cli.run_handler(cli.handler_for(self.NAME), args)
        if code:
            sys.exit(code)


def _subcommand_class(name: str) -> type[_OutlierQuantSubcommand]:
    _, add_arguments, _ = cli.SUBCOMMANDS[name]

    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.description = cli.SUBCOMMANDS[name][0]
        add_arguments(parser)
        cli.add_common_arguments(parser)

    class_name = f"OutlierQuant{name.title()}Command"
    return type(class_name, (_OutlierQuantSubcommand,), {"NAME": name, "parse_args": staticmethod(parse_args)})


_SUBCOMMAND_CLASSES = {name: _subcommand_class(name) for name in cli.SUBCOMMANDS}


class OutlierQuantCommand(BaseOptimumCLICommand):
    """``optimum-cli outlierquant``: prints its help; the work is in the subcommands."""

    COMMAND = CommandInfo(
        name="outlierquant",
        help="Outlier-aware post-training quantization of ONNX models (outlierquant).",
    )
    SUBCOMMANDS = tuple(
        CommandInfo(name=name, help=help_text, subcommand_class=_SUBCOMMAND_CLASSES[name])
        for name, (help_text, _, _) in cli.SUBCOMMANDS.items()
    )
