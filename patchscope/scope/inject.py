"""Inject, observe, generate: labelled rows of one target site, run through the Patchscope engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.model.sites import resolve
from patchscope.scope.controls import Condition, random_same_norm
from patchscope.scope.placeholder import PromptPlan
from patchscope.scope.rows import Generation, PatchRow, RowReadout, run_rows


@dataclass
class Row:
    """One row of the batched run: a vector to patch (or none), the neuron to read, optionally its own prompt."""

    label: str
    neuron: int
    vector: Tensor | None  # [d_model]; None runs the prompt unpatched
    prompt: PromptPlan | None = None
    """Defaults to the prompt given to `inject`."""


@dataclass
class Observation:
    """What one row saw."""

    label: str
    neuron: int
    at_placeholder: float
    """The neuron at the placeholder position, in the prefill."""
    prompt_activations: list[float]
    """The neuron at every prompt position (BOS first)."""
    generated_activations: list[float]
    """The neuron when each generated token was fed back (the last generated token is never fed)."""
    generated_tokens: list[int]
    generated_text: str
    norm: float | None = None
    """Norm of the patched vector."""
    ratio: float | None = None
    """``at_placeholder`` divided by the neuron's original maximum."""


def inject(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Row],
    prompt: PromptPlan | None = None,
    *,
    target_site: str,
    observe_site: str,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[Observation]:
    """Run every row in one batch: patch its vector at its prompt position, read its neuron, generate.

    Rows with different prompts are left-padded. The patch is applied in the prefill only and is
    carried by the KV cache (`patchscope.model.hooks.patch`); generation stops at EOS per row.
    The rows run through the one Patchscope engine, `patchscope.scope.rows.run_rows`.

    Args:
        model, tokenizer: the target model and its tokenizer.
        rows: one `Row` per generation: a label, the neuron to observe, and the vector to write
            (None for the unpatched control).
        prompt: the target prompt and placeholder position (`plan_prompt`), for rows without their own.
        target_site: where the vector is written, e.g. ``"blocks.12.hook_resid_pre"``.
        observe_site: the site of the observed neuron, e.g. ``"blocks.12.mlp.hook_post"``.
        max_new_tokens, temperature, top_p, seed: generation (temperature 0 is greedy).

    Returns:
        One `Observation` per row, in order: the neuron at the placeholder and at every token, and the text generated.

    Example:
        >>> plan = plan_prompt(tokenizer, PatchscopeConfig())
        >>> (obs,) = inject(model, tokenizer, [Row("patched", neuron, vector)], plan,
        ...                 target_site="blocks.12.hook_resid_pre", observe_site="blocks.12.mlp.hook_post")
        >>> obs.generated_text
    """
    resolve(model, target_site), resolve(model, observe_site)
    plans = [row.prompt or prompt for row in rows]
    if any(p is None for p in plans):
        raise ValueError("every row needs a prompt: pass `prompt` or set Row.prompt")
    engine_rows = [
        PatchRow(row.vector, target_site if row.vector is not None else None, cast(PromptPlan, plan), [row.neuron])
        for row, plan in zip(rows, plans)  # a None plan is rejected just above
    ]
    generation = Generation(max_new_tokens, temperature, top_p, seed)
    readouts = run_rows(model, tokenizer, engine_rows, neuron_site=observe_site, trace=True, generation=generation)
    return [_observation(tokenizer, row, out) for row, out in zip(rows, readouts)]


def _observation(tokenizer: PreTrainedTokenizerBase, row: Row, out: RowReadout) -> Observation:
    # `trace` fills every field read here
    tokens = cast(list[int], out.generated)
    return Observation(
        label=row.label,
        neuron=row.neuron,
        at_placeholder=float(cast(Tensor, out.at_placeholder)[0]),
        prompt_activations=cast(Tensor, out.prompt_trace)[:, 0].tolist(),
        generated_activations=cast(Tensor, out.generated_trace)[:, 0].tolist(),
        generated_tokens=tokens,
        generated_text=cast(str, tokenizer.decode(tokens, skip_special_tokens=True)),
        norm=float(row.vector.float().norm()) if row.vector is not None else None,
    )


def control_rows(vector: Tensor, neuron: int, *, mean: Tensor | None, seed: int, source: tuple[int, ...] = ()) -> list[Row]:
    """Controls that make a patched activation mean something: same norm at random, the corpus mean.

    The random direction is drawn for ``(seed, neuron, *source)`` (`random_same_norm`), so each
    neuron and each source token (e.g. its document and position) gets its own.
    """
    random = random_same_norm(vector, seed, neuron, *source)
    rows = [Row(Condition.RANDOM_SAME_NORM.value, neuron, random.to(vector.dtype))]
    if mean is not None:
        rows.append(Row(Condition.CORPUS_MEAN.value, neuron, mean.to(vector.dtype)))
    return rows
