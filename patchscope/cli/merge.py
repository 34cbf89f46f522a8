"""``patchscope merge``: one atlas from the atlases of independent jobs over disjoint slices."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output directory for the merged atlas")
    parser.add_argument("atlases", nargs="+", metavar="DIR", help="atlas directories of the jobs (two or more)")


def run(args: argparse.Namespace) -> int:
    from patchscope.atlas.folder import AtlasFolder
    from patchscope.atlas.merge import merge_atlases
    from patchscope.atlas.store import load_atlas, save_atlas
    from patchscope.util.storage import check_writable

    out = check_writable(args.out)
    AtlasFolder(out).refuse_existing()
    atlases = [load_atlas(path) for path in args.atlases]
    merged = merge_atlases(atlases, names=list(args.atlases))
    save_atlas(merged, out)
    print(
        f"merged {len(atlases)} atlases ({merged.meta.split}, {merged.meta.n_documents} documents, "
        f"{merged.n_tokens} tokens) into {out}/atlas.safetensors"
    )
    return 0
