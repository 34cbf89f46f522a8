"""What a neuron's Patchscope run shows, in words: its reactivation against the controls, its decode.

The texts are part of ``results.json`` and of the printed summary; the case they name comes from
`patchscope.scope.controls.Case`.
"""

from __future__ import annotations

from dataclasses import dataclass

from patchscope.atlas.atlas import CONTEXT_TOKENS
from patchscope.scope.controls import Case, Condition
from patchscope.scope.inject import Observation


@dataclass
class DecodeRelatedness:
    """How related the generated tokens are to the source token's context, against the random control."""

    measure: str
    """What the two shares measure, in words."""
    patched: float | None
    """Share of the patched run's distinct generated tokens found in the context; None without tokens."""
    random_same_norm: float | None
    """The same share for the random-direction control; None when it did not run."""
    same_as_unpatched: bool | None
    """Whether the patched generation equals the unpatched one; None when that control did not run."""


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


def overlap(generated: list[int], context: set[int]) -> float | None:
    """Share of the distinct generated tokens that also occur in the source token's context."""
    tokens = set(generated)
    return len(tokens & context) / len(tokens) if tokens else None


def decode_relatedness(patched: Observation, controls: dict[str, Observation], context: set[int]) -> DecodeRelatedness:
    random = controls.get(Condition.RANDOM_SAME_NORM.value)
    unpatched = controls.get(Condition.UNPATCHED.value)
    return DecodeRelatedness(
        measure=f"share of distinct generated tokens found in the source context (+-{CONTEXT_TOKENS} tokens)",
        patched=overlap(patched.generated_tokens, context),
        random_same_norm=overlap(random.generated_tokens, context) if random else None,
        same_as_unpatched=patched.generated_tokens == unpatched.generated_tokens if unpatched else None,
    )


def verdict(
    case: Case, patched: float, controls: dict[str, float], decode: DecodeRelatedness, target_site: str, neuron_site: str
) -> str:
    """Says which case the run shows; the same-layer reactivation is never offered as evidence."""
    return f"{_reactivation_verdict(case, patched, controls, target_site, neuron_site)}; {_decode_verdict(decode)}"


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


def _decode_verdict(decode: DecodeRelatedness) -> str:
    ours, theirs = decode.patched, decode.random_same_norm
    if decode.same_as_unpatched:
        return "the patched generation equals the unpatched one: no decode"
    if ours is None or theirs is None:
        return "decode relatedness not measured (needs generated tokens and the random control)"
    if ours > theirs:
        return f"generated tokens overlap the source context more than the random control's ({ours:.2f} vs {theirs:.2f})"
    return (
        f"generated tokens overlap the source context no more than the random control's ({ours:.2f} vs {theirs:.2f}): unrelated"
    )
