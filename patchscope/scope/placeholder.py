"""Where the vector goes in the target prompt: the placeholder, found by character offsets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from transformers import PreTrainedTokenizerBase

from patchscope.atlas.batching import adds_bos

if TYPE_CHECKING:  # config.py builds on the engine, which plans rows with `PromptPlan`
    from patchscope.scope.config import PromptSpec


class PlaceholderError(ValueError):
    """The placeholder cannot be found as exactly one token of the prompt."""


POSITION_FALLBACK = "pass `position`"


def find_placeholder(
    tokenizer: PreTrainedTokenizerBase, prompt: str, placeholder: str = "x", *, fallback: str = POSITION_FALLBACK
) -> int:
    """Position (BOS counted) of the one token whose text is exactly ``placeholder``.

    Whole-word match on characters, then on the tokenizer's offsets; leading whitespace inside a
    token (``' x'``, ``'▁x'``) is allowed. Raises `PlaceholderError` when the word is absent, occurs
    more than once, or is split across or merged into other tokens; its message ends with ``fallback``,
    the way out that the caller offers (`PromptSpec.placeholder_fallback`).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise PlaceholderError(f"finding the placeholder needs a fast tokenizer (offset mapping); {fallback}")
    if not placeholder.strip():
        raise PlaceholderError("the placeholder must be a non-empty word")
    hits = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(placeholder)}(?!\w)", prompt)]
    if not hits:
        inside = placeholder in prompt
        raise PlaceholderError(
            f"placeholder {placeholder!r} is not a word of the prompt {prompt!r}"
            + (" (it only appears inside other words)" if inside else "")
            + f"; put it in the prompt, choose `placeholder`, or {fallback}"
        )
    if len(hits) > 1:
        raise PlaceholderError(
            f"placeholder {placeholder!r} appears {len(hits)} times in the prompt (characters {hits}); "
            f"make it unique or {fallback}"
        )
    start, end = hits[0]
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    overlapping = []
    for index, (token_start, token_end) in enumerate(encoding["offset_mapping"]):
        if token_end <= token_start or token_end <= start or token_start >= end:
            continue  # special tokens (BOS) have empty spans
        while token_start < token_end and prompt[token_start].isspace():
            token_start += 1
        overlapping.append((index, token_start, token_end))
    if len(overlapping) == 1 and overlapping[0][1:] == (start, end):
        return overlapping[0][0]
    pieces = [tokenizer.convert_ids_to_tokens(encoding["input_ids"][i]) for i, _, _ in overlapping]
    how = "split across" if len(overlapping) > 1 else "merged into"
    raise PlaceholderError(
        f"placeholder {placeholder!r} is {how} tokens {pieces}, so no single position holds it; "
        f"choose a placeholder that is one token, or {fallback}"
    )


@dataclass
class PromptPlan:
    """The tokenized target prompt and where the vector goes."""

    input_ids: list[int]
    position: int
    tokens: list[str] = field(default_factory=list)


def plan_prompt(tokenizer: PreTrainedTokenizerBase, config: PromptSpec) -> PromptPlan:
    """Tokenize the prompt (BOS as the model expects) and fix the patch position; no model needed.

    ``config`` is a `PatchscopeConfig` or a `SweepConfig`: its `PromptSpec.target` gives the text
    and placeholder (a sweep resolves preset names there).
    """
    chosen, explicit = config.target(), config.target_position()
    ids = tokenizer(chosen.text).input_ids
    if explicit is not None:
        if not 0 <= explicit < len(ids):
            raise PlaceholderError(f"`position` {explicit} is outside the prompt's {len(ids)} tokens (BOS is 0)")
        position = explicit
    else:
        position = find_placeholder(tokenizer, chosen.text, chosen.placeholder, fallback=config.placeholder_fallback())
    if position == 0 and adds_bos(tokenizer):
        raise PlaceholderError("position 0 is BOS; patching it is almost never meant")
    return PromptPlan(ids, position, cast(list[str], tokenizer.convert_ids_to_tokens(ids)))  # a list for a list of ids
