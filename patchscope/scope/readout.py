"""The Patchscope phase of the experiment: each neuron's vector and its controls, read in one batch.

`read_neurons` builds the rows (patched, then the controls `PatchscopeConfig.controls` asks for),
runs them through `inject` (and so the one engine), and says per neuron what the run shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.model.sites import parse_site
from patchscope.scope.config import PatchscopeConfig
from patchscope.scope.controls import Case, Condition, case_of, context_window, reactivation_ratio
from patchscope.scope.inject import Observation, Row, control_rows, inject
from patchscope.scope.placeholder import PromptPlan
from patchscope.scope.verdict import DecodeRelatedness, decode_relatedness, verdict


@dataclass
class NeuronTarget:
    """One neuron to read, and the source token whose vector is written into the prompt."""

    neuron: int
    activation: float
    """The neuron's activation at the source token: the reactivation ratio's denominator."""
    vector: Tensor
    """``[d_model]`` the source token's vector at the source site."""
    segment_ids: list[int]
    """The token ids around the source token that were run (its context for the decode measure)."""
    local_position: int
    """Index of the source token in ``segment_ids``."""
    key: tuple[int, ...] = ()
    """Names the source token for the random control's seed, e.g. ``(doc, position)``."""


@dataclass
class NeuronReadout:
    """What the Patchscope run shows for one neuron."""

    patched: Observation
    controls: dict[str, Observation]
    """By control name, in the order they ran."""
    case: Case
    decode: DecodeRelatedness
    verdict: str


def read_neurons(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: PromptPlan,
    targets: list[NeuronTarget],
    *,
    target_site: str,
    neuron_site: str,
    config: PatchscopeConfig,
    mean: Tensor | None,
) -> list[NeuronReadout]:
    """Patch every target's vector (and its controls) at ``target_site`` and read its neuron at ``neuron_site``.

    ``mean`` is the corpus mean at the source site (the ``corpus_mean`` control; skipped when None).
    The random control's direction is drawn for ``(config.seed, neuron, *target.key)``.
    """
    rows: list[Row] = []
    spans: list[tuple[int, int]] = []
    for target in targets:
        start = len(rows)
        rows.append(Row(Condition.PATCHED.value, target.neuron, target.vector))
        if config.chosen_controls():
            rows.append(Row(Condition.UNPATCHED.value, target.neuron, None))
            rows += control_rows(target.vector, target.neuron, mean=mean, seed=config.seed, source=target.key)
        spans.append((start, len(rows)))
    generation = config.generation()
    observations = inject(
        model,
        tokenizer,
        rows,
        prompt,
        target_site=target_site,
        observe_site=neuron_site,
        max_new_tokens=generation.max_new_tokens,
        temperature=generation.temperature,
        top_p=generation.top_p,
        seed=generation.seed,
    )
    case = case_of(parse_site(target_site)[0], parse_site(neuron_site)[0])
    return [
        _readout(tokenizer, target, observations[start:end], case, target_site, neuron_site)
        for target, (start, end) in zip(targets, spans)
    ]


def _readout(
    tokenizer: PreTrainedTokenizerBase,
    target: NeuronTarget,
    mine: list[Observation],
    case: Case,
    target_site: str,
    neuron_site: str,
) -> NeuronReadout:
    for observation in mine:
        observation.ratio = reactivation_ratio(observation.at_placeholder, target.activation)
    patched, controls = mine[0], {o.label: o for o in mine[1:]}
    context = context_window(target.segment_ids, target.local_position)
    decode = decode_relatedness(tokenizer, patched, controls, context, target.segment_ids[target.local_position])
    text = verdict(
        case, patched.at_placeholder, {k: v.at_placeholder for k, v in controls.items()}, decode, target_site, neuron_site
    )
    return NeuronReadout(patched, controls, case, decode, text)
