"""Per-token activations for the contexts a report shows, by replaying only those documents.

The atlas stores one (document, position) per example, not the activations around it. For the few
documents a page shows we re-tokenize them exactly as the profiler did (same segments), run each
needed segment once with `capture` and an early stop after the site, and keep only the shown
window of the shown neurons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.batching import Segment, adds_bos, collate, locate, segments
from patchscope.atlas.feature_site import reads_of
from patchscope.atlas.sources import Document
from patchscope.model.hooks import run_with_cache
from patchscope.model.loading import model_device

BATCH_ROWS = 8


@dataclass(frozen=True)
class Example:
    """Neuron ``neuron`` at document ``doc``, position ``position``."""

    neuron: int
    doc: int
    position: int


@dataclass
class Context:
    """The tokens around an example and the neuron's activation at each of them."""

    tokens: list[str]
    values: list[float]
    focus: int
    """Index of the example's own token in ``tokens``."""


def replay_contexts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    atlas: Atlas,
    site: str,
    examples: Iterable[Example],
    texts: Mapping[int, str],
    *,
    before: int = 24,
    after: int = 8,
    encode: Callable[[Tensor], Tensor] | None = None,
) -> dict[Example, Context]:
    """The context window (``before`` tokens, the token, ``after`` tokens, within its segment) of every example.

    For an SAE feature site, ``encode`` maps the activations at the site it reads to the features.
    """
    reads = reads_of(site)
    examples = list(dict.fromkeys(examples))
    parts: dict[int, list[Segment]] = {}
    where: dict[Example, tuple[Segment, int]] = {}
    has_bos = adds_bos(tokenizer)
    for example in examples:
        if example.doc not in parts:  # the profiler's own segments: an excluded BOS is not shown
            meta = atlas.meta
            parts[example.doc] = segments(
                tokenizer, Document(example.doc, texts[example.doc]), meta.max_length, meta.overflow, meta.exclude_bos, has_bos
            )
        where[example] = locate(parts[example.doc], example.position)
    needed = list(dict.fromkeys(segment for segment, _ in where.values()))
    by_segment: dict[Segment, list[Example]] = {}
    for example, (segment, _) in where.items():
        by_segment.setdefault(segment, []).append(example)

    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows: dict[Example, tuple[list[int], list[float], int]] = {}
    for start in range(0, len(needed), BATCH_ROWS):
        rows = needed[start : start + BATCH_ROWS]
        batch = collate(rows, pad_id).to(device)
        with torch.inference_mode():
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
            _, seen = run_with_cache(model, inputs, reads)
        acts = seen[reads] if encode is None else encode(seen[reads])  # [rows, pos, n]
        for row, segment in enumerate(rows):
            for example in by_segment[segment]:
                local = where[example][1]
                lo, hi = max(segment.first_counted, local - before), min(len(segment.ids), local + after + 1)
                values = acts[row, lo:hi, example.neuron].float().tolist()
                windows[example] = (list(segment.ids[lo:hi]), values, local - lo)
    pieces = tokenizer.batch_decode([[i] for ids, _, _ in windows.values() for i in ids])
    contexts, cursor = {}, 0
    for example, (ids, values, focus) in windows.items():
        contexts[example] = Context(pieces[cursor : cursor + len(ids)], values, focus)
        cursor += len(ids)
    return contexts
