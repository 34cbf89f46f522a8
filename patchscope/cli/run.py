"""``patchscope run``: the whole experiment, written to results.json."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.sources import SourceConfig
    from patchscope.cli.args import add_dataclass_arguments
    from patchscope.experiment import ExperimentConfig
    from patchscope.scope.config import PatchscopeConfig

    add_dataclass_arguments(parser, ExperimentConfig, skip=("source", "profile", "patchscope"))
    add_dataclass_arguments(parser, SourceConfig)
    add_dataclass_arguments(parser, ProfileConfig)
    add_dataclass_arguments(parser, PatchscopeConfig)


def run(args: argparse.Namespace) -> int:
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.sources import SourceConfig
    from patchscope.cli.args import from_namespace
    from patchscope.experiment import ExperimentConfig, format_summary, run_experiment
    from patchscope.scope.config import PatchscopeConfig
    from patchscope.util.errors import as_flags

    config = from_namespace(
        ExperimentConfig,
        args,
        source=from_namespace(SourceConfig, args),
        profile=from_namespace(ProfileConfig, args),
        patchscope=from_namespace(PatchscopeConfig, args),
    )
    result = run_experiment(config)
    # the summary's notes name parameters as the library does; on the command line they read as flags
    flags = {"--" + name.replace("_", "-") for name in vars(args)}
    print(as_flags(format_summary(result), flags))
    print(f"\nwrote {result.results_file}")
    print(f"wrote {result.report_file}: open {Path(result.report_file).resolve().as_uri()}")
    return 0
