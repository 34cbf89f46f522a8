"""``patchscope sweep``: source x target layer Patchscope sweep of one token, with metrics and heatmaps.

Arguments and printing only; the sweep itself is `patchscope.scope.sweep_token.sweep_token`.
"""

from __future__ import annotations

import argparse

from patchscope.cli.common import add_model_flags


def register(parser: argparse.ArgumentParser) -> None:
    from patchscope.cli.args import add_dataclass_arguments
    from patchscope.scope.sweep import SweepConfig
    from patchscope.scope.sweep_token import SweepInput

    add_model_flags(parser)
    add_dataclass_arguments(parser, SweepInput)
    add_dataclass_arguments(parser, SweepConfig)


def run(args: argparse.Namespace) -> int:
    from patchscope.cli.args import from_namespace
    from patchscope.scope.sweep import SweepConfig, summary_lines
    from patchscope.scope.sweep_token import SweepInput, sweep_token

    given = from_namespace(SweepInput, args)
    config = from_namespace(SweepConfig, args)
    outcome = sweep_token(args.model, given, config, dtype=args.dtype, device=args.device)
    print("\n".join(summary_lines(outcome.result)))
    print("wrote " + ", ".join(str(path) for path in outcome.written))
    return 0
