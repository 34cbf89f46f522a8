"""The Patchscope row engine: a vector, a site, a position and a planned prompt in; reads out.

Every Patchscope run in the project is a list of `PatchRow`s given to `run_rows`: the experiment
(`patchscope.scope.inject`) and the sweep (`patchscope.scope.sweep`) only build rows and name
what to read. A row writes its vector at its own site (rows of one batch may target different
layers, `patch_rows`) and at its prompt's placeholder; what comes back per row is a `RowReadout`.

Two passes, each run only when asked for:

1. Scoring (``scored`` token ids given): the next-token log-probabilities at the placeholder, and
   the neurons there. All rows share one prompt, so the prompt before the placeholder is run once
   and its KV cache repeated over each batch, which then runs only the placeholder and what follows.
2. Generation (``max_new_tokens > 0``, or ``trace``): HF ``generate`` on left-padded prompts with
   the patch in the prefill only, carried by the KV cache; cut after EOS per row. With ``trace``
   the neurons are read at every prompt position and at every fed-back generated token.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.model.hooks import capture, stop_after
from patchscope.model.loading import model_device
from patchscope.model.row_patch import patch_rows
from patchscope.scope.placeholder import PromptPlan


@dataclass
class PatchRow:
    """One row: write ``vector`` at ``site``, at the placeholder of ``prompt``; read ``neurons``."""

    vector: Tensor | None
    """``[d_model]``; None runs the prompt unpatched."""
    site: str | None
    """Where the vector is written, e.g. ``blocks.3.hook_resid_pre``; None runs unpatched."""
    prompt: PromptPlan
    """The planned target prompt; the vector goes to ``prompt.position``."""
    neurons: list[int] = field(default_factory=list)
    """Neurons of the read site to read in this row (every row of a run reads as many)."""


@dataclass(frozen=True)
class Generation:
    """How rows generate after the prompt (temperature 0 is greedy)."""

    max_new_tokens: int = 0
    """Tokens to generate; 0 runs the prompt only."""
    temperature: float = 0.0
    """0 for greedy decoding; above 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling."""
    seed: int = 0
    """Seed of the sampling generators, restored afterwards."""


@dataclass
class RowReadout:
    """What one row saw; a field is None when its pass was not asked for."""

    top1: int | None = None
    """The patched model's next token at the placeholder."""
    logprobs: Tensor | None = None
    """``[n_scored]`` log-probabilities of the scored tokens at the placeholder."""
    at_placeholder: Tensor | None = None
    """``[n_neurons]`` the row's neurons at the placeholder, in the prefill."""
    prompt_trace: Tensor | None = None
    """``[pos, n_neurons]`` the neurons at every prompt position (BOS first), with ``trace``."""
    generated_trace: Tensor | None = None
    """``[steps, n_neurons]`` the neurons as each generated token was fed back (the last never is)."""
    generated: list[int] | None = None
    """The generated tokens, up to and with EOS."""


def run_rows(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[PatchRow],
    *,
    neuron_site: str | None = None,
    scored: Tensor | None = None,
    trace: bool = False,
    generation: Generation = Generation(),
    batch_size: int | None = None,
) -> list[RowReadout]:
    """Run ``rows`` in batches of ``batch_size`` (all at once when None), in the order given.

    Args:
        model, tokenizer: the target model and its tokenizer.
        rows: the `PatchRow`s; with ``scored`` they must share one prompt.
        neuron_site: the site of the read neurons, e.g. ``blocks.2.mlp.hook_post``.
        scored: ``[n_scored]`` token ids whose log-probability at the placeholder is returned.
        trace: read the neurons at every prompt position and generated token (needs ``neuron_site``).
        generation: what to generate after the prompt.
        batch_size: rows per forward pass.

    Returns:
        One `RowReadout` per row, in order.
    """
    if trace and neuron_site is None:
        raise ValueError("`trace` reads neurons: name the `neuron_site`")
    if neuron_site is not None and len({len(row.neurons) for row in rows}) > 1:
        raise ValueError("every row must read the same number of neurons")
    readouts = [RowReadout() for _ in rows]
    size = batch_size or max(len(rows), 1)
    for start in range(0, len(rows), size):
        chunk, outs = rows[start : start + size], readouts[start : start + size]
        if scored is not None:
            _score(model, chunk, outs, scored, None if trace else neuron_site)
        if generation.max_new_tokens > 0 or trace:
            _generate(model, tokenizer, chunk, outs, generation, neuron_site if trace else None)
    return readouts


def _cache_keyword(model: nn.Module) -> str:
    """The KV cache argument and output field: ``cache`` in transformers 5.x, ``past_key_values`` in 4.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _expand(cache: Any, batch: int) -> Any:
    """A copy of a batch-1 KV cache, repeated to ``batch`` rows."""
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(batch)
    return copied


def _vectors(model: nn.Module, rows: list[PatchRow]) -> Tensor:
    """``[batch, d_model]`` in the model's dtype and device; zeros for unpatched rows."""
    device = model_device(model)
    dtype = cast(Any, model).get_input_embeddings().weight.dtype
    d_model: int = cast(Any, model).config.hidden_size
    return torch.stack(
        [
            row.vector.detach().to(device, dtype) if row.vector is not None else torch.zeros(d_model, device=device, dtype=dtype)
            for row in rows
        ]
    )


def _neuron_index(rows: list[PatchRow], device: torch.device) -> Tensor:
    return torch.tensor([row.neurons for row in rows], dtype=torch.long, device=device)  # [batch, n_neurons]


@torch.no_grad()
def _score(model: nn.Module, rows: list[PatchRow], outs: list[RowReadout], scored: Tensor, neuron_site: str | None) -> None:
    """The next-token prediction at the placeholder, the prompt before it run once for the batch."""
    prompt = rows[0].prompt
    if any(row.prompt.input_ids != prompt.input_ids or row.prompt.position != prompt.position for row in rows):
        raise ValueError("scoring at the placeholder needs one shared prompt for every row")
    device = model_device(model)
    ids = torch.tensor([prompt.input_ids], device=device)  # [1, pos]
    p, batch = prompt.position, len(rows)
    keyword = _cache_keyword(model)
    prefix = getattr(model(input_ids=ids[:, :p], use_cache=True), keyword) if p > 0 else None
    with (
        patch_rows(model, [row.site for row in rows], _vectors(model, rows), torch.full((batch,), p, device=device)),
        capture(model, [neuron_site] if neuron_site else [], positions=[p]) as seen,
    ):
        logits = model(
            input_ids=ids[:, p:].expand(batch, -1),
            attention_mask=torch.ones(batch, ids.shape[1], dtype=torch.long, device=device),
            use_cache=prefix is not None,
            **{keyword: _expand(prefix, batch) if prefix is not None else None},
            logits_to_keep=torch.tensor([0], device=device),
        ).logits[:, 0]  # [batch, vocab]: the prediction at the placeholder
    logprobs = logits.float().log_softmax(-1)
    top1 = logprobs.argmax(-1).cpu()
    picked = logprobs[:, scored.to(logprobs.device)].cpu()  # [batch, n_scored]
    neurons = None
    if neuron_site is not None:
        neurons = seen[neuron_site][:, 0].gather(1, _neuron_index(rows, device)).float().cpu()  # [batch, n_neurons]
    for i, out in enumerate(outs):
        out.top1, out.logprobs = int(top1[i]), picked[i]
        if neurons is not None:
            out.at_placeholder = neurons[i]


@dataclass
class _Padded:
    """Left-padded prompts of one batch."""

    input_ids: Tensor  # [batch, width]
    attention_mask: Tensor  # [batch, width]
    pads: list[int]
    """Padding tokens before each row's prompt."""
    width: int


def _left_pad(tokenizer: PreTrainedTokenizerBase, rows: list[PatchRow], device: torch.device) -> _Padded:
    width = max(len(row.prompt.input_ids) for row in rows)
    pads = [width - len(row.prompt.input_ids) for row in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad_id] * n + row.prompt.input_ids for n, row in zip(pads, rows)], device=device)
    mask = torch.tensor([[0] * n + [1] * len(row.prompt.input_ids) for n, row in zip(pads, rows)], device=device)
    return _Padded(ids, mask, pads, width)


@contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed only the generators sampling uses, inside a fork that restores them.

    `torch.manual_seed` would also reseed every GPU and leave the caller's generators changed.
    """
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.default_generators[devices[0]].manual_seed(seed)
        yield


@torch.no_grad()
def _generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[PatchRow],
    outs: list[RowReadout],
    generation: Generation,
    neuron_site: str | None,
) -> None:
    """Generate per row (or run the prompt only), the neurons traced when ``neuron_site`` is given."""
    device = model_device(model)
    padded = _left_pad(tokenizer, rows, device)
    positions = torch.tensor([n + row.prompt.position for n, row in zip(padded.pads, rows)], device=device)  # [batch]
    with (
        _seeded(device, generation.seed),
        patch_rows(model, [row.site for row in rows], _vectors(model, rows), positions),
        capture(model, [neuron_site] if neuron_site else [], keep_history=True) as seen,
    ):
        output = _generate_or_prefill(model, tokenizer, padded, generation, neuron_site)
    generated = output[:, padded.width :].cpu()
    eos = tokenizer.eos_token_id
    for index, out in enumerate(outs):
        tokens = generated[index].tolist()
        if eos in tokens:  # finished rows are padded by generate; keep up to and with EOS
            tokens = tokens[: tokens.index(eos) + 1]
        out.generated = tokens
    if neuron_site is not None:
        _read_trace(seen.history[neuron_site], rows, outs, padded)


def _generate_or_prefill(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, padded: _Padded, generation: Generation, neuron_site: str | None
) -> Tensor:
    """The prompt and its generated tokens, ``[batch, width + steps]``."""
    if generation.max_new_tokens == 0:
        with stop_after(model, neuron_site) if neuron_site else nullcontext():
            model(input_ids=padded.input_ids, attention_mask=padded.attention_mask)
        return padded.input_ids
    sampling = (
        {"do_sample": True, "temperature": generation.temperature, "top_p": generation.top_p}
        if generation.temperature > 0
        else {"do_sample": False}
    )
    return cast(Any, model).generate(
        input_ids=padded.input_ids,
        attention_mask=padded.attention_mask,
        max_new_tokens=generation.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        use_cache=True,
        **sampling,
    )


def _read_trace(history: list[Tensor], rows: list[PatchRow], outs: list[RowReadout], padded: _Padded) -> None:
    """Pick each row's neurons from the prefill and decode-step recordings."""
    trace = torch.cat(history, dim=1)  # prefill [batch, pos] then one per step: [batch, steps, d]
    index = _neuron_index(rows, trace.device)  # [batch, n_neurons]
    batch, steps = trace.shape[:2]
    picked = trace.gather(2, index.unsqueeze(1).expand(batch, steps, index.shape[1])).float().cpu()
    width = padded.width
    for i, (row, out) in enumerate(zip(rows, outs)):
        start = padded.pads[i]
        fed = max(len(out.generated or []) - 1, 0)
        out.at_placeholder = picked[i, start + row.prompt.position]
        out.prompt_trace = picked[i, start:width]
        out.generated_trace = picked[i, width : width + fed]
