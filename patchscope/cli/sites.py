"""``patchscope sites``: list a model's hook sites and the HF module behind each."""

from __future__ import annotations

import argparse

from patchscope.cli.common import add_model_flags


def register(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)


def run(args: argparse.Namespace) -> int:
    from patchscope.model.loading import load_model
    from patchscope.model.sites import list_sites, resolve

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    for name in list_sites(model):
        ref = resolve(model, name)
        module_name = next(n for n, m in model.named_modules() if m is ref.module)
        print(f"{name:32s} {ref.point:6s} of {module_name}")
    return 0
