"""``patchscope export``: rebuild the exports of an atlas folder from its atlas.

For a folder whose run was killed after saving the atlas but before its exports, and for
exports that were deleted or are wanted in another format. The texts are read again from the
atlas's data, which must still be the data that was profiled (its content identity is checked).
"""

from __future__ import annotations

import argparse

NEURONPEDIA = "neuronpedia"
"""Neuronpedia's batch JSON (`patchscope.report.neuronpedia`), written to ``--out``."""


def register(parser: argparse.ArgumentParser) -> None:
    from patchscope.atlas.exports import DEFAULT_EXPORTS, EXPORTS

    parser.add_argument("atlas_dir", metavar="ATLAS_DIR", help="folder holding atlas.safetensors")
    parser.add_argument(
        "--format",
        action="append",
        choices=[*EXPORTS, NEURONPEDIA],
        help=f"a format to write; repeat for several (default: {' '.join(DEFAULT_EXPORTS)}). "
        f"{NEURONPEDIA}: Neuronpedia's feature batch JSON, into --out",
    )
    parser.add_argument("--out", help=f"output folder of the {NEURONPEDIA} format (default: ATLAS_DIR/{NEURONPEDIA})")
    parser.add_argument("--neurons", type=int, nargs="+", help=f"neurons for the {NEURONPEDIA} format (default: all)")
    parser.add_argument("--site", help=f"the site of the {NEURONPEDIA} format (default: the atlas's first)")
    parser.add_argument(
        "--sae", action="append", default=[], metavar="SPEC", help=f"the SAE of a feature site, for the {NEURONPEDIA} format"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from patchscope.atlas.exports import DEFAULT_EXPORTS
    from patchscope.atlas.folder import rebuild_exports
    from patchscope.atlas.store import load_atlas

    directory = Path(args.atlas_dir)
    requested = tuple(dict.fromkeys(args.format or DEFAULT_EXPORTS))
    if NEURONPEDIA in requested:
        from patchscope.model.loading import load_config
        from patchscope.report.neuronpedia import export_neuronpedia
        from patchscope.sae.features import load_feature_sites

        atlas = load_atlas(directory)
        saes = load_feature_sites(args.sae, d_model=load_config(atlas.meta.model).hidden_size) if args.sae else []
        target = Path(args.out or directory / NEURONPEDIA)
        for path in export_neuronpedia(atlas, target, site=args.site, neurons=args.neurons, features=saes):
            print(f"wrote {path}")
        requested = tuple(name for name in requested if name != NEURONPEDIA)
        if not requested:
            return 0
    written = rebuild_exports(directory, requested)
    for path in written:
        print(f"wrote {path}")
    return 0
