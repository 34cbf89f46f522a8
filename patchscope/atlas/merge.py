"""Merge atlases of independent jobs over disjoint slices of one source (e.g. a SLURM array).

Top-k examples merge exactly by the ranking rule and moments through their exact sums, so the
result is the atlas of the union, bit for bit, when every job ran the same batches the union would
have run: that holds when the slice boundaries are multiples of ``sort_buffer`` (the blocks of
`batching.plan`). Other boundaries change only how documents share padded batches, i.e. float
rounding of the activations.
"""

from __future__ import annotations

import dataclasses

from patchscope.atlas.atlas import Atlas, AtlasError, Provenance
from patchscope.atlas.sources import parse_split


def merge_atlases(atlases: list[Atlas], names: list[str] | None = None) -> Atlas:
    """The atlas of the union of disjoint slices; refuses other settings and overlapping slices."""
    if len(atlases) < 2:
        raise AtlasError("merging needs at least two atlases")
    names = names or [f"atlas {i}" for i in range(len(atlases))]
    first = atlases[0]
    for atlas, name in zip(atlases[1:], names[1:]):
        # the same run key but for the slice (`RunKey.reuse_changes`), and the same top-k
        key, theirs = first.meta.key(), atlas.meta.key()
        problems = key.inputs.changes_since(theirs.inputs, *key.names)
        problems += [f"{what} {old!r} there, {new!r} in {names[0]}" for what, old, new in key.differences(theirs, but=("split",))]
        if atlas.meta.top_k != first.meta.top_k:
            problems.append(f"top_k={atlas.meta.top_k} there, top_k={first.meta.top_k} in {names[0]}")
        if problems:
            raise AtlasError(f"{name} differs from {names[0]}: {'; '.join(problems)}. Only atlases of the same settings merge")
        if list(atlas.sites) != list(first.sites):
            raise AtlasError(
                f"{name} profiles sites {list(atlas.sites)}, {names[0]} {list(first.sites)}: only the same sites merge"
            )
    ranges = sorted((_rows(atlas, name), name, atlas) for atlas, name in zip(atlases, names))
    for (low, name_low, _), (high, name_high, _) in zip(ranges, ranges[1:]):
        if low[0] != high[0]:
            raise AtlasError(
                f"{name_low} covers split {low[0]!r} and {name_high} split {high[0]!r}: slices must come from one split"
            )
        if low[2] is None or low[2] > high[1]:
            raise AtlasError(
                f"{name_low} (rows {low[1]}:{'' if low[2] is None else low[2]}) and {name_high} (rows {high[1]}:"
                f"{'' if high[2] is None else high[2]}) overlap: their documents would be counted twice"
            )
    ordered = [atlas for _, _, atlas in ranges]
    merged = ordered[0]
    for atlas in ordered[1:]:
        merged = merged.merge(atlas)
    name = ordered[0].meta.split.strip().split("[")[0]  # as written: local files have no split name
    start, stop = ranges[0][0][1], ranges[-1][0][2]
    contiguous = all(a[0][2] == b[0][1] for a, b in zip(ranges, ranges[1:]))
    split = f"{name}[{start}:{'' if stop is None else stop}]" if contiguous else "+".join(a.meta.split for a in ordered)
    merged.meta = dataclasses.replace(
        merged.meta,
        source=dataclasses.replace(merged.meta.source, split=split) if merged.meta.source else None,
        provenance=Provenance(
            merged_from=[a.meta.split for a in ordered],
            tokens_this_run=sum(a.meta.provenance.tokens_this_run for a in ordered),
            seconds=round(sum(a.meta.provenance.seconds for a in ordered), 3),
            nonfinite_activations=merged.nonfinite_total(),
        ),
    )
    return merged


def _rows(atlas: Atlas, name: str) -> tuple[str, int, int | None]:
    if atlas.meta.dataset == "<texts>":
        raise AtlasError(
            f"{name} was profiled from in-memory texts; only atlases of a named source and slice can be checked for overlap"
        )
    return parse_split(atlas.meta.split)
