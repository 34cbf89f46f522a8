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


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from patchscope.atlas.atlas import AtlasError
    from patchscope.atlas.exports import DEFAULT_EXPORTS, write_exports
    from patchscope.atlas.key import Inputs
    from patchscope.atlas.store import commit_atlas, is_committed, load_atlas
    from patchscope.model.loading import load_tokenizer
    from patchscope.util.lock import output_lock

    directory = Path(args.atlas_dir)
    atlas = load_atlas(directory)
    requested = tuple(dict.fromkeys(args.format or DEFAULT_EXPORTS))
    if NEURONPEDIA in requested:
        from patchscope.report.neuronpedia import export_neuronpedia

        for path in export_neuronpedia(atlas, Path(args.out or directory / NEURONPEDIA), neurons=args.neurons):
            print(f"wrote {path}")
        requested = tuple(name for name in requested if name != NEURONPEDIA)
        if not requested:
            return 0
    meta = atlas.meta
    if meta.source is None:
        raise AtlasError(
            f"the atlas in {directory} was profiled from texts given in Python, so its exports cannot be rebuilt here"
        )
    changes = Inputs.of(meta.model, None).changes_since(meta.inputs, meta.model, meta.dataset)  # the tokenizer's model
    if changes:
        raise AtlasError(f"cannot rebuild the exports of {directory}: {'; '.join(changes)} since the atlas was made")
    texts = atlas.texts()  # checks the data against the atlas too
    tokenizer = load_tokenizer(meta.model)
    formats = requested
    with output_lock(directory):
        if is_committed(directory):
            written = write_exports(atlas, directory, texts, tokenizer, formats)
        else:  # a run killed before its exports: write them, then the commit marker
            written = []
            commit_atlas(
                directory, before_commit=lambda saved: written.extend(write_exports(saved, directory, texts, tokenizer, formats))
            )
    for path in written:
        print(f"wrote {path}")
    return 0
