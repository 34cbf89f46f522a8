"""Inject, observe, generate: one batched `generate` with every vector patched at its placeholder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.model.hooks import capture, patch, stop_after
from patchscope.model.loading import model_device
from patchscope.model.sites import resolve
from patchscope.scope.placeholder import PromptPlan


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
    device = model_device(model)
    dtype = cast(Any, model).get_input_embeddings().weight.dtype
    plans = cast(list[PromptPlan], [row.prompt or prompt for row in rows])  # a None is rejected just below
    if any(p is None for p in plans):
        raise ValueError("every row needs a prompt: pass `prompt` or set Row.prompt")
    width = max(len(p.input_ids) for p in plans)
    pads = [width - len(p.input_ids) for p in plans]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad_id] * n + p.input_ids for n, p in zip(pads, plans)], device=device)  # [batch, pos]
    attention_mask = torch.tensor([[0] * n + [1] * len(p.input_ids) for n, p in zip(pads, plans)], device=device)
    positions = torch.tensor([[n + p.position] for n, p in zip(pads, plans)], device=device)  # [batch, 1]
    d_model: int = cast(Any, model).config.hidden_size
    patched = torch.tensor([row.vector is not None for row in rows], device=device)
    vectors = torch.stack(
        [
            row.vector.detach().to(device, dtype) if row.vector is not None else torch.zeros(d_model, device=device, dtype=dtype)
            for row in rows
        ]
    ).unsqueeze(1)  # [batch, 1, d_model]
    batch = len(rows)
    neurons = torch.tensor([row.neuron for row in rows], device=device)
    # Seed only the generators sampling uses, inside a fork that restores them: `torch.manual_seed`
    # would also reseed every GPU and leave the caller's generators changed.
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.default_generators[devices[0]].manual_seed(seed)
        with (
            torch.no_grad(),
            patch(model, target_site, vectors, positions=positions, rows=patched),
            capture(model, observe_site, keep_history=True) as seen,
        ):
            if max_new_tokens > 0:
                sampling = (
                    {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
                )
                output = cast(Any, model).generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    use_cache=True,
                    **sampling,
                )
            else:
                with stop_after(model, observe_site):
                    model(input_ids=input_ids, attention_mask=attention_mask)
                output = input_ids
    trace = torch.cat(seen.history[observe_site], dim=1)  # prefill [batch, pos] then one per step: [batch, steps, d]
    picked = trace.gather(2, neurons.view(batch, 1, 1).expand(batch, trace.shape[1], 1)).squeeze(2).float().cpu()
    generated = output[:, width:].cpu()
    eos = tokenizer.eos_token_id
    observations = []
    for index, row in enumerate(rows):
        tokens = generated[index].tolist()
        if eos in tokens:  # finished rows are padded by generate; keep up to and with EOS
            tokens = tokens[: tokens.index(eos) + 1]
        start = pads[index]
        observations.append(
            Observation(
                label=row.label,
                neuron=row.neuron,
                at_placeholder=float(picked[index, start + plans[index].position]),
                prompt_activations=picked[index, start:width].tolist(),
                generated_activations=picked[index, width : width + max(len(tokens) - 1, 0)].tolist(),
                generated_tokens=tokens,
                generated_text=cast(str, tokenizer.decode(tokens, skip_special_tokens=True)),
                norm=float(row.vector.float().norm()) if row.vector is not None else None,
            )
        )
    return observations


def control_rows(vector: Tensor, neuron: int, *, mean: Tensor | None, seed: int) -> list[Row]:
    """Controls that make a patched activation mean something: same norm at random, the corpus mean."""
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(vector.shape[-1], generator=generator)
    random = random / random.norm() * vector.float().norm().cpu()
    rows = [Row("random_same_norm", neuron, random.to(vector.dtype))]
    if mean is not None:
        rows.append(Row("corpus_mean", neuron, mean.to(vector.dtype)))
    return rows
