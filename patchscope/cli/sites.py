"""``patchscope sites``: list a model's hook sites, the HF module behind each, and the rule that placed them."""

from __future__ import annotations

import argparse

from patchscope.cli.common import add_model_flags


def register(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument(
        "--modules",
        action="store_true",
        help="also list every module path, for raw sites such as 'model.layers.3.mlp.down_proj:input'",
    )


def run(args: argparse.Namespace) -> int:
    from patchscope.model.loading import load_model
    from patchscope.model.sites import SiteError, layout, list_sites, refused_sites, resolve

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    paths = {id(m): n for n, m in model.named_modules()}
    try:
        print(f"sites placed by {layout(model).rule}")
        for name in list_sites(model):
            ref = resolve(model, name)
            part = "" if ref.part is None else f" [..., {ref.part.start}:{ref.part.stop}]"
            print(f"{name:32s} {ref.point:6s} of {paths[id(ref.module)]}{part}")
        reasons: dict[str, list[str]] = {}
        for name, why in refused_sites(model).items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            print(f"not available: {shown}: {why}")
    except SiteError as error:
        print(f"no named sites: {error}")
    print(
        "raw module sites: '<module path>:input' or ':output' on any module" + ("" if args.modules else " (--modules lists them)")
    )
    if args.modules:
        for name, module in model.named_modules():
            if name:
                print(f"  {name:48s} {type(module).__name__}")
    return 0
