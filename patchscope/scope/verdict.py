"""What a neuron's Patchscope run shows, in words: its reactivation against the controls, its decode.

The texts are part of ``results.json`` and of the printed summary; the case they name comes from
`patchscope.scope.controls.Case`.

**The decode measure** (`DECODE_MEASURE`). Token ids cannot be compared: Gemma's ``getattr`` in
``"__getattr__"`` and ``▁getattr`` in ``-> getattr`` are different ids for the same text. So tokens are
compared as *strings*: each decoded, with surrounding whitespace and the tokenizer's word-start marker
(``▁``, ``Ġ``) stripped, case kept (`token_string`). A run **decodes** its source token when that string
occurs in the patched generation's text (`occurs_in`: where the string begins or ends with a letter or
digit, not inside a longer word, so ``a`` is not found in ``cat``; ``_`` counts as a boundary, so
``getattr`` is found in ``__getattr__``) and in no control's generation: a token every generation
contains (``-`` in an identity prompt full of ``->``) shows nothing.
Alongside, `DecodeRelatedness.patched` and ``random_same_norm`` give the share of distinct generated
token strings found among the source context's token strings, for a looser reading.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import CONTEXT_TOKENS
from patchscope.scope.controls import Case, Condition
from patchscope.scope.inject import Observation

WORD_START_MARKERS = "▁Ġ"
"""SentencePiece's and byte-level BPE's word-start markers, in case a tokenizer's decode leaves them."""

DECODE_MEASURE = "source_token_in_generation"
DECODE_MEASURE_TEXT = (
    "the source token's string (decoded; whitespace and word-start marker stripped; case kept) occurs in the patched "
    "generation, not inside a longer word, and in no control's generation"
)
OVERLAP_TEXT = f"share of distinct generated token strings found among the source context's (+-{CONTEXT_TOKENS} tokens)"

Headline = Literal["decoded", "not decoded", "not measured"]


@dataclass
class DecodeRelatedness:
    """Whether the generation carries the source token, against the controls' generations."""

    measure: str
    """Which measure decides `decoded`: `DECODE_MEASURE`."""
    measure_text: str
    """That measure in words."""
    source_token: str
    """The source token as compared: decoded, whitespace and word-start marker stripped, case kept."""
    decoded: bool | None
    """The source token's string is in the patched generation and in no control's; None when not measured
    (no generated tokens, or a token that is only whitespace)."""
    found_in: dict[str, bool]
    """By condition (patched and each control that generated): whether its generation holds the string."""
    overlap_text: str
    """What `patched` and `random_same_norm` measure."""
    patched: float | None
    """Share of the patched run's distinct generated token strings found among the context's; None without tokens."""
    random_same_norm: float | None
    """The same share for the random-direction control; None when it did not run."""
    same_as_unpatched: bool | None
    """Whether the patched generation equals the unpatched one; None when that control did not run."""


def token_string(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token as text, compared across word-start and mid-word forms: ``'▁getattr'`` and ``'getattr'`` are ``'getattr'``."""
    return str(tokenizer.decode([token_id])).strip().strip(WORD_START_MARKERS).strip()


def generated_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


def occurs_in(wanted: str, text: str) -> bool:
    """``wanted`` in ``text``, not inside a longer run of letters and digits at an end where it has one."""
    if not wanted:
        return False
    before = r"(?<![^\W_])" if wanted[0].isalnum() else ""
    after = r"(?![^\W_])" if wanted[-1].isalnum() else ""
    return re.search(before + re.escape(wanted) + after, text) is not None


def reactivation_text(patched: float, controls: dict[str, float]) -> str:
    """Which controls the patched activation beats."""
    if not controls:
        return "no controls run"
    beaten = [name for name, value in controls.items() if patched > value]
    if len(beaten) == len(controls):
        return f"above every control ({', '.join(controls)})"
    if not beaten:
        return "not above any control"
    return f"above {', '.join(beaten)} only"


def overlap(generated: Iterable[str], context: set[str]) -> float | None:
    """Share of the distinct non-empty generated strings that also occur in the source token's context."""
    tokens = {t for t in generated if t}
    return len(tokens & context) / len(tokens) if tokens else None


def decode_relatedness(
    tokenizer: PreTrainedTokenizerBase, patched: Observation, controls: dict[str, Observation], context: list[int], source: int
) -> DecodeRelatedness:
    """``context`` holds the source token's context ids, ``source`` the source token's id."""
    random = controls.get(Condition.RANDOM_SAME_NORM.value)
    unpatched = controls.get(Condition.UNPATCHED.value)
    wanted = token_string(tokenizer, source)
    generations = {Condition.PATCHED.value: patched, **{k: v for k, v in controls.items() if v.generated_tokens}}
    found = {k: occurs_in(wanted, generated_text(tokenizer, o.generated_tokens)) for k, o in generations.items()}
    measurable = bool(wanted) and bool(patched.generated_tokens)
    strings = {token_string(tokenizer, i) for i in context} - {""}

    def share(o: Observation | None) -> float | None:
        return overlap((token_string(tokenizer, i) for i in o.generated_tokens), strings) if o else None

    return DecodeRelatedness(
        measure=DECODE_MEASURE,
        measure_text=DECODE_MEASURE_TEXT,
        source_token=wanted,
        decoded=(found[Condition.PATCHED.value] and not any(v for k, v in found.items() if k != Condition.PATCHED.value))
        if measurable
        else None,
        found_in=found,
        overlap_text=OVERLAP_TEXT,
        patched=share(patched),
        random_same_norm=share(random),
        same_as_unpatched=patched.generated_tokens == unpatched.generated_tokens if unpatched else None,
    )


def headline(decode: DecodeRelatedness) -> Headline:
    """The decode in one or two words, for a report card or a table cell."""
    if decode.decoded is None:
        return "not measured"
    return "decoded" if decode.decoded else "not decoded"


def case_explanation(case: Case, target_site: str, neuron_site: str) -> str:
    """What the reactivation can show in this case, in one sentence: the run report's explanation, given once."""
    if case is Case.SAME_LAYER:
        return (
            f"The vector is written at {target_site} and the neuron read in that layer's MLP ({neuron_site}), so the "
            "neuron fires again almost by construction: its reactivation is not evidence of a decode. The evidence is "
            "the generated text."
        )
    if case is Case.EARLIER_TARGET_LAYER:
        return (
            f"The vector is written at {target_site}, before the neuron's layer ({neuron_site}): a reactivation above "
            "every control is evidence that the vector carries what triggers the neuron."
        )
    return f"The vector is written at {target_site}, after the neuron's layer ({neuron_site}): the neuron cannot see the patch."


def verdict(
    case: Case, patched: float, controls: dict[str, float], decode: DecodeRelatedness, target_site: str, neuron_site: str
) -> str:
    """Says which case the run shows; the same-layer reactivation is never offered as evidence."""
    return f"{_reactivation_verdict(case, patched, controls, target_site, neuron_site)}; {decode_verdict(decode)}"


def _reactivation_verdict(case: Case, patched: float, controls: dict[str, float], target_site: str, neuron_site: str) -> str:
    reactivation = reactivation_text(patched, controls)
    if case is Case.SAME_LAYER:
        return (
            f"same layer: the vector is written at {target_site} and the neuron read in that layer's MLP, so its "
            f"reactivation, {reactivation}, holds by construction and is not evidence of a decode"
        )
    if case is Case.EARLIER_TARGET_LAYER:
        head = f"target layer before the neuron's ({target_site} -> {neuron_site}): reactivation {reactivation}"
        return head + (
            ", evidence that the vector carries the trigger" if reactivation.startswith("above every") else ", no evidence"
        )
    return f"target layer after the neuron's ({target_site} -> {neuron_site}): the neuron cannot see the patch"


def decode_verdict(decode: DecodeRelatedness) -> str:
    """The decode in one sentence: the measure's outcome and the controls that also generated the token."""
    token = repr(decode.source_token)
    if decode.same_as_unpatched:
        return "not decoded: the patched generation equals the unpatched one"
    if decode.decoded is None:
        return f"not measured (no generated tokens, or the source token {token} is only whitespace)"
    if decode.decoded:
        return f"decoded: the patched generation contains the source token {token}, no control's does"
    if not decode.found_in.get(Condition.PATCHED.value):
        return f"not decoded: the patched generation does not contain the source token {token}"
    also = [k for k, v in decode.found_in.items() if v and k != Condition.PATCHED.value]
    plural = "s" if len(also) > 1 else ""
    return f"not decoded: the source token {token} is in the patched generation, but also in the {', '.join(also)} generation{plural}"
