"""Take a residual vector from a source text: re-run it as the profiler saw it, re-check the neuron."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import CONTEXT_TOKENS, AtlasEntry
from patchscope.atlas.batching import Overflow, Segment, segment_at
from patchscope.model.hooks import run_with_cache
from patchscope.model.loading import model_device


class ReproductionError(RuntimeError):
    """Re-running an atlas entry did not give the recorded value: the wrong text, model or settings."""


@dataclass
class Extraction:
    """A residual vector and where it came from."""

    vector: Tensor  # [d_model], on the model's device, in its dtype
    site: str
    doc: int | None
    """Absolute document index, when taken from an atlas entry."""
    position: int
    """Token position in the document (BOS = 0)."""
    token_id: int
    token: str
    context: str
    """The token with ±5 tokens around it."""
    neuron_site: str | None = None
    neuron: int | None = None
    activation: float | None = None
    """The neuron recomputed at this token."""
    recorded: float | None = None
    """The value the atlas recorded, when extracted from one."""
    segment_ids: list[int] = field(default_factory=list)
    """The token ids that were run (the document's segment holding the position)."""
    local_position: int = 0
    """Index of the token within ``segment_ids``."""


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) between a batched atlas value and a single re-run: padding changes kernel shapes."""
    return {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}.get(dtype, (1e-4, 1e-4))


def extract(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    site: str,
    position: int,
    neuron: int | None = None,
    neuron_site: str | None = None,
    entry: AtlasEntry | None = None,
    max_length: int = 128,
    overflow: Overflow = "truncate",
) -> Extraction:
    """Re-run ``text`` as the profiler saw it and copy the vector at ``(site, position)``.

    With an atlas ``entry``, the token and the neuron's activation must match what the atlas
    recorded (within the dtype's tolerance), or `ReproductionError` is raised: that catches texts
    indexed relative to a slice, a different model, or different truncation settings.

    Args:
        model, tokenizer: the model that was profiled, and its tokenizer.
        text: the document's full text.
        site: where to read the vector, e.g. ``"blocks.12.hook_resid_pre"``.
        position: token position in the document (BOS = 0).
        neuron, neuron_site: also recompute this neuron at the position.
        entry: the atlas entry being reproduced (sets ``neuron`` and ``neuron_site``).
        max_length, overflow: the profile's segmenting, so positions mean the same tokens.

    Returns:
        An `Extraction`: the vector (``[d_model]``), the token, its context and the recomputed activation.

    Example:
        >>> entry = atlas.entry("blocks.12.mlp.hook_post", neuron)
        >>> ex = extract(model, tokenizer, texts[entry.doc], site="blocks.12.hook_resid_pre", position=entry.position, entry=entry)
    """
    if entry is not None:  # the entry names the neuron unless the caller does
        neuron = entry.neuron if neuron is None else neuron
        neuron_site = entry.site if neuron_site is None else neuron_site
    segment, local = _segment_at(tokenizer, text, position, max_length, overflow, entry)
    cache = _run_segment(model, segment.ids, site, neuron_site)
    token_id = segment.ids[local]
    lo = max(segment.first_counted, local - CONTEXT_TOKENS)  # the context starts at the segment's first counted slot
    result = Extraction(
        vector=cache[site][0, local],
        site=site,
        doc=entry.doc if entry else None,
        position=position,
        token_id=token_id,
        token=cast(str, tokenizer.decode([token_id])),
        context=cast(str, tokenizer.decode(list(segment.ids[lo : local + CONTEXT_TOKENS + 1]))),
        neuron_site=neuron_site,
        neuron=neuron,
        activation=_neuron_value(cache, local, neuron, neuron_site),
        recorded=entry.activation if entry else None,
        segment_ids=list(segment.ids),
        local_position=local,
    )
    if entry is not None:
        _check_reproduced(result, entry, result.vector.dtype)
    return result


def _segment_at(
    tokenizer: PreTrainedTokenizerBase, text: str, position: int, max_length: int, overflow: Overflow, entry: AtlasEntry | None
) -> tuple[Segment, int]:
    """The segment holding ``position`` and the index in it; a missing position of an entry is a `ReproductionError`."""
    try:
        return segment_at(tokenizer, text, position, max_length, overflow)
    except IndexError as error:
        if entry is None:
            raise
        raise ReproductionError(
            f"document {entry.doc} has no position {entry.position}: not the text that was profiled"
        ) from error


def _run_segment(model: nn.Module, ids: Sequence[int], site: str, neuron_site: str | None) -> dict[str, Tensor]:
    """``{site: [1, pos, d]}`` for the vector's site and the neuron's, stopping after the deeper one."""
    names = [site] + ([neuron_site] if neuron_site and neuron_site != site else [])
    with torch.no_grad():
        _, cache = run_with_cache(
            model, {"input_ids": torch.tensor([ids], device=model_device(model)), "use_cache": False}, names
        )
    return cache


def _neuron_value(cache: dict[str, Tensor], local: int, neuron: int | None, neuron_site: str | None) -> float | None:
    """The neuron at index ``local`` of the run, with a clear error when out of range; None without one."""
    if neuron is None or neuron_site is None:
        return None
    values = cache[neuron_site][0, local]  # [d_mlp]
    if not 0 <= neuron < values.shape[-1]:
        raise IndexError(f"neuron {neuron} is out of range: {neuron_site} has neurons 0..{values.shape[-1] - 1}")
    return float(values[neuron])


def _check_reproduced(result: Extraction, entry: AtlasEntry, dtype: torch.dtype) -> None:
    if result.token_id != entry.token:
        raise ReproductionError(
            f"document {entry.doc} position {entry.position} holds token {result.token!r}, but the atlas recorded "
            f"token id {entry.token}: this is not the text that was profiled (absolute row index? same dataset and split?)"
        )
    rtol, atol = tolerance(dtype)
    if result.activation is None or abs(result.activation - entry.activation) > atol + rtol * abs(entry.activation):
        raise ReproductionError(
            f"re-running document {entry.doc} gives {result.activation} for neuron {entry.neuron}, but the atlas "
            f"recorded {entry.activation} ({dtype} tolerance rtol={rtol}, atol={atol}): wrong text, model or dtype"
        )
