"""Patchscopes: take a residual vector from one text, write it into a target prompt, observe, generate.

    extract      re-run the atlas text, copy the vector at (site, position), re-check the neuron
    find_placeholder   locate the placeholder token by character offsets
    inject       one batched `generate`: every vector, plus controls, patched at the placeholder
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from .atlas import CONTEXT_TOKENS, AtlasEntry
from .batching import Overflow, adds_bos, segment_at
from .hooks import capture, patch, stop_after
from .models import model_device
from .sites import parse_site, resolve, site_order

DEFAULT_PROMPT = "A detailed description of x is that"


class PlaceholderError(ValueError):
    """The placeholder cannot be found as exactly one token of the prompt."""


class ReproductionError(RuntimeError):
    """Re-running an atlas entry did not give the recorded value: the wrong text, model or settings."""


@dataclass(frozen=True)
class PatchscopeConfig:
    """The target prompt, where to patch, what to observe and how to generate."""

    prompt: str = DEFAULT_PROMPT
    """Target prompt holding the placeholder word."""
    placeholder: str = "x"
    """Word whose token receives the vector; matched by character offsets, as a whole token."""
    position: int | None = None
    """Explicit target position (BOS = 0), instead of searching for the placeholder."""
    source_site: str | None = None
    """Where the vector is taken (default: blocks.{layer}.hook_resid_pre)."""
    target_site: str | None = None
    """Where it is written in the target prompt (default: the source site)."""
    max_new_tokens: int = 20
    """Tokens to generate after the prompt."""
    temperature: float = 0.0
    """0 for greedy decoding; above 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling."""
    seed: int = 0
    """Seed for sampling and for the random-vector control."""
    controls: bool = True
    """Also run the unpatched prompt, a random vector of the same norm, and the corpus mean."""

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be 0 or more, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
        for site in (self.source_site, self.target_site):
            if site is not None:
                parse_site(site)


# -- the placeholder


def find_placeholder(tokenizer: PreTrainedTokenizerBase, prompt: str, placeholder: str = "x") -> int:
    """Position (BOS counted) of the one token whose text is exactly ``placeholder``.

    Whole-word match on characters, then on the tokenizer's offsets; leading whitespace inside a
    token (``' x'``, ``'▁x'``) is allowed. Raises `PlaceholderError` when the word is absent, occurs
    more than once, or is split across or merged into other tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise PlaceholderError("finding the placeholder needs a fast tokenizer (offset mapping); pass --position instead")
    if not placeholder.strip():
        raise PlaceholderError("the placeholder must be a non-empty word")
    hits = [m.span() for m in re.finditer(rf"(?<!\w){re.escape(placeholder)}(?!\w)", prompt)]
    if not hits:
        inside = placeholder in prompt
        raise PlaceholderError(
            f"placeholder {placeholder!r} is not a word of the prompt {prompt!r}"
            + (" (it only appears inside other words)" if inside else "")
            + "; put it in the prompt, choose --placeholder, or pass --position"
        )
    if len(hits) > 1:
        raise PlaceholderError(
            f"placeholder {placeholder!r} appears {len(hits)} times in the prompt (characters {hits}); "
            "make it unique or pass --position"
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
        "choose a placeholder that is one token, or pass --position"
    )


# -- extraction


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
    """
    if entry is not None:
        neuron = entry.neuron if neuron is None else neuron
        neuron_site = entry.site if neuron_site is None else neuron_site
    try:
        segment, local = segment_at(tokenizer, text, position, max_length, overflow)
    except IndexError as error:
        if entry is None:
            raise
        raise ReproductionError(f"document {entry.doc} has no position {entry.position}: not the text that was profiled") from error
    ids = torch.tensor([segment.ids], device=model_device(model))
    names = [site] + ([neuron_site] if neuron_site and neuron_site != site else [])
    deepest = max(names, key=site_order)
    with torch.no_grad(), capture(model, names) as cache, stop_after(model, deepest):
        model(input_ids=ids, use_cache=False)
    vector = cache[site][0, local]
    activation = None
    if neuron is not None and neuron_site is not None:
        values = cache[neuron_site][0, local]
        if not 0 <= neuron < values.shape[-1]:
            raise IndexError(f"neuron {neuron} is out of range: {neuron_site} has neurons 0..{values.shape[-1] - 1}")
        activation = float(values[neuron])
    token_id = segment.ids[local]
    lo = max(segment.first_counted, local - CONTEXT_TOKENS)
    result = Extraction(
        vector=vector,
        site=site,
        doc=entry.doc if entry else None,
        position=position,
        token_id=token_id,
        token=tokenizer.decode([token_id]),
        context=tokenizer.decode(list(segment.ids[lo : local + CONTEXT_TOKENS + 1])),
        neuron_site=neuron_site,
        neuron=neuron,
        activation=activation,
        recorded=entry.activation if entry else None,
        segment_ids=list(segment.ids),
        local_position=local,
    )
    if entry is not None:
        _check_reproduced(result, entry, vector.dtype)
    return result


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


# -- inject, observe, generate


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


@dataclass
class PromptPlan:
    """The tokenized target prompt and where the vector goes."""

    input_ids: list[int]
    position: int
    tokens: list[str] = field(default_factory=list)


def plan_prompt(tokenizer: PreTrainedTokenizerBase, config: PatchscopeConfig) -> PromptPlan:
    """Tokenize the prompt (BOS as the model expects) and fix the patch position; no model needed."""
    ids = tokenizer(config.prompt).input_ids
    if config.position is not None:
        if not 0 <= config.position < len(ids):
            raise PlaceholderError(f"--position {config.position} is outside the prompt's {len(ids)} tokens (BOS is 0)")
        position = config.position
    else:
        position = find_placeholder(tokenizer, config.prompt, config.placeholder)
    if position == 0 and adds_bos(tokenizer):
        raise PlaceholderError("position 0 is BOS; patching it is almost never meant")
    return PromptPlan(ids, position, tokenizer.convert_ids_to_tokens(ids))


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
    carried by the KV cache (`patchscope.hooks.patch`); generation stops at EOS per row.
    """
    resolve(model, target_site), resolve(model, observe_site)
    device = model_device(model)
    dtype = model.get_input_embeddings().weight.dtype
    plans = [row.prompt or prompt for row in rows]
    if any(p is None for p in plans):
        raise ValueError("every row needs a prompt: pass `prompt` or set Row.prompt")
    width = max(len(p.input_ids) for p in plans)
    pads = [width - len(p.input_ids) for p in plans]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad_id] * n + p.input_ids for n, p in zip(pads, plans)], device=device)  # [batch, pos]
    attention_mask = torch.tensor([[0] * n + [1] * len(p.input_ids) for n, p in zip(pads, plans)], device=device)
    positions = torch.tensor([[n + p.position] for n, p in zip(pads, plans)], device=device)  # [batch, 1]
    d_model = model.config.hidden_size
    patched = torch.tensor([row.vector is not None for row in rows], device=device)
    vectors = torch.stack(
        [row.vector.detach().to(device, dtype) if row.vector is not None else torch.zeros(d_model, device=device, dtype=dtype) for row in rows]
    ).unsqueeze(1)  # [batch, 1, d_model]
    batch = len(rows)
    neurons = torch.tensor([row.neuron for row in rows], device=device)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad(), patch(model, target_site, vectors, positions=positions, rows=patched), capture(
            model, observe_site, keep_history=True
        ) as seen:
            if max_new_tokens > 0:
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
                output = model.generate(
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
    finally:
        torch.random.set_rng_state(rng_state)
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
                generated_text=tokenizer.decode(tokens, skip_special_tokens=True),
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
