"""The Patchscope sweep: source layers x target layers, scored against the source model's own prediction.

For each source token and each layer pair ``(s, t)``, the residual vector entering layer ``s`` at the
source position (``blocks.s.hook_resid_pre``) is written into the target prompt at its placeholder,
entering layer ``t`` (``blocks.t.hook_resid_pre``). Each cell is scored as in Ghandeharioun et al.
(2024), section 4.1: the patched model's next-token prediction *at the placeholder* against the
source model's own next-token prediction at the source position (precision@1), and the surprisal
of that token (nats). For a neuron source (an atlas entry), the neuron is also read at the
placeholder when ``t <= L``, the neuron's layer; at ``t == L`` that reactivation is by
construction (the vector enters the very layer whose MLP is read), so it is flagged, not scored.

Controls, per cell: ``unpatched`` (the same run for every cell), ``random_same_norm`` (one random
direction per source token and source layer, scaled to the vector's norm, drawn as
`patchscope.scope.controls.random_same_norm` says) and ``corpus_mean`` (the mean residual at layer
``s``, when given).

How it runs, all batched:
1. `read_sources`: one forward per chunk of source texts captures every source layer at once and
   the source model's next token.
2. Every cell and control becomes a `PatchRow`, sorted by target layer, run by the Patchscope
   engine (`patchscope.scope.rows.run_rows`): the prompt before the placeholder is run once per
   batch from a shared KV cache, and each row carries its own layer and vector.
3. Optional generation of the first tokens per row, by the same engine: HF ``generate`` with the
   KV cache, the patch in the prefill only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.model.hooks import capture
from patchscope.model.loading import model_device
from patchscope.model.sites import n_layers, parse_site
from patchscope.scope.config import PromptSpec
from patchscope.scope.controls import (
    CONTROLS,
    NO_NEURON,
    Condition,
    case_of,
    check_controls,
    context_window,
    random_same_norm,
    reactivation_ratio,
)
from patchscope.scope.placeholder import PromptPlan, plan_prompt
from patchscope.scope.prompts import TargetPrompt, target_prompt
from patchscope.scope.rows import Generation, PatchRow, run_rows
from patchscope.util.display import html_view


def resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@dataclass(frozen=True)
class SweepConfig(PromptSpec):
    """Which layer pairs to sweep, which controls to run, how to batch and generate."""

    prompt: str = field(
        default="identity",
        metadata={"help": "Target prompt: a preset name (identity, description, entity) or the prompt text itself."},
    )
    placeholder: str | None = field(
        default=None, metadata={"help": "Placeholder of a custom prompt (default x); presets bring their own."}
    )
    source_layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "Layers s whose blocks.s.hook_resid_pre is read at the source token (default: all)."}
    )
    target_layers: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "Layers t whose blocks.t.hook_resid_pre receives the vector at the placeholder (default: all)."},
    )
    pairs: Literal["lower", "all", "same"] = field(
        default="lower",
        metadata={
            "help": "lower: only pairs with t <= s (the default grid); all: every source x target pair; same: t == s only."
        },
    )
    controls: tuple[str, ...] = field(
        default=CONTROLS, metadata={"help": "Controls to run per cell: unpatched, random_same_norm, corpus_mean (needs a mean)."}
    )
    max_new_tokens: int = field(
        default=0, metadata={"help": "Tokens to generate greedily per cell (0: score the next token only)."}
    )
    batch_size: int = field(default=128, metadata={"help": "Rows per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of the random-vector control."})

    def target(self) -> TargetPrompt:
        """A preset by name, or the prompt text with its placeholder (`target_prompt`)."""
        return target_prompt(self.prompt, self.placeholder)

    def generation(self) -> Generation:
        return Generation(max_new_tokens=self.max_new_tokens, seed=self.seed)  # greedy: the seed changes nothing

    def chosen_controls(self) -> tuple[str, ...]:
        return self.controls

    def validate(self, layers: int | None = None) -> None:
        """Checks that need no model; with ``layers``, also the layer numbers."""
        check_controls(self.controls)
        self.validate_prompt()
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if self.pairs not in ("lower", "all", "same"):
            raise ValueError(f"`pairs` must be 'lower', 'all' or 'same', not {self.pairs!r}")
        if layers is not None:
            for name in ("source_layers", "target_layers"):
                bad = [layer for layer in getattr(self, name) or () if not 0 <= layer < layers]
                if bad:
                    raise ValueError(f"`{name}` {bad} out of range: the model has layers 0..{layers - 1}")
            if not self.layer_pairs(layers):
                raise ValueError(
                    f"no (source, target) layer pair fits `pairs` {self.pairs!r}; widen `target_layers` or set `pairs` to all"
                )

    def layer_pairs(self, layers: int) -> list[tuple[int, int]]:
        """Every ``(s, t)`` to run, sorted by source then target layer."""
        sources = sorted(set(self.source_layers if self.source_layers is not None else range(layers)))
        targets = sorted(set(self.target_layers if self.target_layers is not None else range(layers)))
        keep = {"all": lambda s, t: True, "lower": lambda s, t: t <= s, "same": lambda s, t: t == s}[self.pairs]
        return [(s, t) for s in sources for t in targets if keep(s, t)]


@dataclass
class Source:
    """One source token: the token ids that were run and its position among them."""

    ids: list[int]
    """Token ids of the source text (BOS first when the model uses one)."""
    position: int
    """Index of the source token in ``ids``."""
    label: str = ""
    """How to name it in outputs (e.g. ``doc 12 pos 40``)."""
    neuron_site: str | None = None
    """For a neuron source: its site, ``blocks.L.mlp.hook_post``."""
    neuron: int | None = None
    """For a neuron source: its index."""
    activation: float | None = None
    """For a neuron source: its activation at the source token (the reactivation ratio's denominator)."""


@dataclass
class SourceReading:
    """What the source pass saw for every source."""

    layers: list[int]
    vectors: Tensor  # [n_sources, n_layers, d_model], float32, on the CPU
    predicted: Tensor  # [n_sources] the source model's greedy next token after the source token
    tokens: list[int]
    """The source token ids."""


@torch.no_grad()
def read_sources(model: nn.Module, sources: list[Source], layers: list[int], *, batch_size: int = 16) -> SourceReading:
    """Read ``blocks.s.hook_resid_pre`` at every source token for all ``layers``, and the next-token prediction.

    Sources are right-padded (so positions keep their values) in chunks of similar positions; the
    LM head runs only at the chunk's distinct source positions.
    """
    device = model_device(model)
    sites = [resid_pre(layer) for layer in layers]
    order = sorted(range(len(sources)), key=lambda i: sources[i].position)
    vectors, predicted = [], []
    for start in range(0, len(sources), batch_size):
        chunk = [sources[i] for i in order[start : start + batch_size]]
        width = max(s.position + 1 for s in chunk)  # nothing after the source token matters (causal)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, source in enumerate(chunk):
            n = source.position + 1
            ids[row, :n] = torch.tensor(source.ids[:n])
            mask[row, :n] = 1
        positions = torch.tensor([s.position for s in chunk])
        kept = positions.unique()  # sorted
        rows = torch.arange(len(chunk))
        with capture(model, sites) as cache:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=kept.to(device)).logits
        picked = torch.searchsorted(kept, positions)
        predicted.append(logits[rows, picked.to(logits.device)].argmax(-1).cpu())  # [chunk]
        vectors.append(torch.stack([cache[site][rows, positions].float().cpu() for site in sites], dim=1))  # [chunk, layers, d]
    back = torch.tensor(order).argsort()  # to the caller's order
    return SourceReading(
        layers=list(layers),
        vectors=torch.cat(vectors)[back],
        predicted=torch.cat(predicted)[back],
        tokens=[s.ids[s.position] for s in sources],
    )


@dataclass
class _Rows:
    """The rows of the target runs, columnar."""

    source: list[int]
    """Source index, or -1 for rows that do not depend on the source (corpus mean, unpatched)."""
    source_layer: list[int]
    target_layer: list[int]
    """-1 for the unpatched row."""
    condition: list[str]
    vectors: Tensor  # [rows, d_model]


def _build_rows(
    sources: list[Source],
    reading: SourceReading,
    pairs: list[tuple[int, int]],
    config: SweepConfig,
    means: dict[int, Tensor] | None,
) -> _Rows:
    n_sources, _, d_model = reading.vectors.shape
    index = {layer: i for i, layer in enumerate(reading.layers)}
    rows = _Rows([], [], [], [], torch.empty(0))
    vectors: list[Tensor] = []

    def add(source: int, s: int, t: int, condition: Condition, vector: Tensor) -> None:
        rows.source.append(source)
        rows.source_layer.append(s)
        rows.target_layer.append(t)
        rows.condition.append(condition.value)
        vectors.append(vector)

    random: dict[tuple[int, int], Tensor] = {}
    if Condition.RANDOM_SAME_NORM in config.controls:  # one direction per source token and source layer
        for j, token in enumerate(sources):
            key = (token.neuron if token.neuron is not None else -1, j, token.position)
            for layer, i in index.items():
                random[j, layer] = random_same_norm(reading.vectors[j, i], config.seed, *key, layer)
    for s, t in pairs:
        for source in range(n_sources):
            add(source, s, t, Condition.PATCHED, reading.vectors[source, index[s]])
        if Condition.RANDOM_SAME_NORM in config.controls:
            for source in range(n_sources):
                add(source, s, t, Condition.RANDOM_SAME_NORM, random[source, s])
        if Condition.CORPUS_MEAN in config.controls and means is not None and s in means:
            add(-1, s, t, Condition.CORPUS_MEAN, means[s].float().cpu())
    if Condition.UNPATCHED in config.controls:
        add(-1, -1, -1, Condition.UNPATCHED, torch.zeros(d_model))
    rows.vectors = torch.stack(vectors)
    return rows


@dataclass
class _Outputs:
    """Per row: the next token at the placeholder, surprisals against every source, neurons, generations."""

    top1: Tensor  # [rows]
    surprisal: Tensor  # [rows, n_sources]: -log p(source j's predicted token)
    neurons: Tensor | None  # [rows, n_neurons] at the placeholder
    generated: list[list[int]] | None


def _run_rows(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: PromptPlan,
    rows: _Rows,
    targets: Tensor,
    *,
    neuron_site: str | None,
    neurons: list[int],
    config: SweepConfig,
) -> _Outputs:
    """Every row through the engine, sorted by target layer so that a batch holds few target sites."""
    order = sorted(range(len(rows.condition)), key=lambda i: rows.target_layer[i])
    engine_rows = [
        PatchRow(
            rows.vectors[i],
            resid_pre(rows.target_layer[i]) if rows.target_layer[i] >= 0 else None,
            prompt,
            neurons if neuron_site else [],
        )
        for i in order
    ]
    readouts = run_rows(
        model,
        tokenizer,
        engine_rows,
        neuron_site=neuron_site,
        scored=targets,
        generation=config.generation(),
        batch_size=config.batch_size,
    )
    back = [readouts[k] for k in torch.tensor(order, dtype=torch.long).argsort().tolist()]  # to the rows' order
    return _Outputs(
        top1=torch.tensor([cast(int, r.top1) for r in back], dtype=torch.long),
        surprisal=-torch.stack([cast(Tensor, r.logprobs) for r in back]),
        neurons=torch.stack([cast(Tensor, r.at_placeholder) for r in back]) if neuron_site else None,
        generated=[cast(list[int], r.generated) for r in back] if config.max_new_tokens > 0 else None,
    )


@dataclass
class SweepResult:
    """Every cell of a sweep, as a long table: one record per (source, s, t, condition)."""

    config: SweepConfig
    prompt: dict[str, Any]
    sources: list[dict[str, Any]]
    pairs: list[tuple[int, int]]
    table: dict[str, list[Any]]
    """Columns: source, source_layer, target_layer, condition, top1, top1_token, hit, surprisal,
    activation, ratio, case, generated, generated_text, source_token_in_generation."""
    neuron_layer: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    _repr_html_ = html_view  # heatmaps in Jupyter (patchscope.report.notebook)

    @property
    def source_layers(self) -> list[int]:
        return sorted({s for s, _ in self.pairs})

    @property
    def target_layers(self) -> list[int]:
        return sorted({t for _, t in self.pairs})

    def conditions(self) -> list[str]:
        return list(dict.fromkeys(self.table["condition"]))

    def grid(self, metric: str, condition: str = "patched") -> np.ndarray:
        """``[n_source_layers, n_target_layers]`` mean of ``metric`` over sources; NaN where no value."""
        s_index = {s: i for i, s in enumerate(self.source_layers)}
        t_index = {t: i for i, t in enumerate(self.target_layers)}
        total = np.zeros((len(s_index), len(t_index)))
        count = np.zeros_like(total)
        for s, t, c, value in zip(
            self.table["source_layer"], self.table["target_layer"], self.table["condition"], self.table[metric]
        ):
            if c != condition or value is None or (isinstance(value, float) and np.isnan(value)):
                continue
            total[s_index[s], t_index[t]] += float(value)
            count[s_index[s], t_index[t]] += 1
        with np.errstate(invalid="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def cells(self) -> list[dict[str, Any]]:
        """Per (s, t): each metric's mean over sources, for the patched run and every control."""
        metrics = ["hit", "surprisal", "ratio"] + (["source_token_in_generation"] if self.config.max_new_tokens else [])
        names = {
            "hit": "precision_at_1",
            "surprisal": "surprisal",
            "ratio": "reactivation",
            "source_token_in_generation": "source_token_in_generation",
        }
        grids = {(m, c): self.grid(m, c) for m in metrics for c in self.conditions()}
        s_index = {s: i for i, s in enumerate(self.source_layers)}
        t_index = {t: i for i, t in enumerate(self.target_layers)}
        out = []
        for s, t in self.pairs:
            cell: dict[str, Any] = {"source_layer": s, "target_layer": t, "case": _case(t, self.neuron_layer)}
            for condition in self.conditions():
                values = {names[m]: _finite(grids[m, condition][s_index[s], t_index[t]]) for m in metrics}
                if condition == "patched":
                    cell.update(values)
                else:
                    cell.setdefault("controls", {})[condition] = values
            out.append(cell)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "prompt": self.prompt,
            "sources": self.sources,
            "source_layers": self.source_layers,
            "target_layers": self.target_layers,
            "neuron_layer": self.neuron_layer,
            "cells": self.cells(),
            "summary": summary_lines(self),
            "timings": self.timings,
            "notes": self.notes,
        }


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)


def _case(target_layer: int, neuron_layer: int | None) -> str:
    """What a neuron's reactivation at this target layer can show, in words (`Case.description`)."""
    return NO_NEURON if neuron_layer is None else case_of(target_layer, neuron_layer).description


def sweep(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[Source],
    prompt: PromptPlan | None = None,
    config: SweepConfig = SweepConfig(),
    *,
    means: dict[int, Tensor] | None = None,
) -> SweepResult:
    """Run every (source, s, t) cell and its controls, batched; see the module docstring.

    ``prompt`` is the planned target prompt; by default ``config.prompt`` (a preset name or a text
    with ``config.placeholder``) is planned here. ``means`` maps a source layer to the corpus-mean
    residual there (the ``corpus_mean`` control).
    """
    layers = n_layers(model)
    config.validate(layers)
    if prompt is None:
        prompt = plan_prompt(tokenizer, config)
    neuron_site = _check_sources(sources)
    neuron_layer = parse_site(neuron_site)[0] if neuron_site else None
    pairs = config.layer_pairs(layers)
    notes = []
    if Condition.CORPUS_MEAN in config.controls and (means is None or any(s not in means for s, _ in pairs)):
        missing = sorted({s for s, _ in pairs if means is None or s not in means})
        notes.append(
            f"corpus_mean control skipped for source layers {', '.join(map(str, missing))}: no corpus mean was given for them "
            "(a sweep from an atlas takes the means of the layers it profiled at hook_resid_pre)"
        )
    timings: dict[str, float] = {}

    started = time.perf_counter()
    reading = read_sources(model, sources, sorted({s for s, _ in pairs}), batch_size=min(config.batch_size, 16))
    timings["read_sources"] = round(time.perf_counter() - started, 3)

    rows = _build_rows(sources, reading, pairs, config, means)
    neurons = sorted({s.neuron for s in sources if s.neuron is not None})
    started = time.perf_counter()
    outputs = _run_rows(
        model, tokenizer, prompt, rows, reading.predicted, neuron_site=neuron_site, neurons=neurons, config=config
    )
    timings["target_runs"] = round(time.perf_counter() - started, 3)
    timings["rows"] = len(rows.condition)

    table = _table(tokenizer, sources, reading, rows, outputs, pairs, neuron_layer, neurons)
    return SweepResult(
        config=config,
        prompt={
            "text": tokenizer.decode(prompt.input_ids, skip_special_tokens=True),
            "tokens": prompt.tokens,
            "position": prompt.position,
        },
        sources=_source_records(tokenizer, sources, reading),
        pairs=pairs,
        table=table,
        neuron_layer=neuron_layer,
        timings=timings,
        notes=notes,
    )


def _check_sources(sources: list[Source]) -> str | None:
    """Refuse sources the sweep cannot run; the one site of the neuron sources, if any."""
    if not sources:
        raise ValueError("no sources to sweep")
    unsited = [s.neuron for s in sources if s.neuron is not None and s.neuron_site is None]
    if unsited:
        raise ValueError(f"neuron {unsited[0]} has no `neuron_site`: name the site it is read at, e.g. blocks.6.mlp.hook_post")
    neuron_sites = {s.neuron_site for s in sources if s.neuron is not None}
    if len(neuron_sites) > 1:
        raise ValueError(f"all neuron sources must share one site, got {sorted(cast(set[str], neuron_sites))}")
    for source in sources:
        if not 0 <= source.position < len(source.ids):
            raise IndexError(f"source {source.label!r}: position {source.position} is outside its {len(source.ids)} tokens")
    return next(iter(neuron_sites), None)


def _source_records(tokenizer: PreTrainedTokenizerBase, sources: list[Source], reading: SourceReading) -> list[dict[str, Any]]:
    return [
        {
            "label": s.label,
            "position": s.position,
            "token": tokenizer.decode([reading.tokens[i]]),
            "predicted": int(reading.predicted[i]),
            "predicted_token": tokenizer.decode([int(reading.predicted[i])]),
            "context": tokenizer.decode(context_window(s.ids, s.position), skip_special_tokens=True),
            "neuron_site": s.neuron_site,
            "neuron": s.neuron,
            "activation": s.activation,
        }
        for i, s in enumerate(sources)
    ]


_COLUMNS = ["source", "source_layer", "target_layer", "condition", "top1", "top1_token", "hit", "surprisal"]
_COLUMNS += ["activation", "ratio", "case"]
_GENERATION_COLUMNS = ["generated", "generated_text", "source_token_in_generation"]


def _table(
    tokenizer: PreTrainedTokenizerBase,
    sources: list[Source],
    reading: SourceReading,
    rows: _Rows,
    outputs: _Outputs,
    pairs: list[tuple[int, int]],
    neuron_layer: int | None,
    unique_neurons: list[int],
) -> dict[str, list[Any]]:
    """Expand the rows into one record per (source, s, t, condition).

    Source-independent rows (corpus mean per (s, t), the one unpatched run) are scored against
    every source; the unpatched run repeats in every cell.
    """
    columns = _COLUMNS + (_GENERATION_COLUMNS if outputs.generated is not None else [])
    table: dict[str, list[Any]] = {name: [] for name in columns}
    record = _Recorder(tokenizer, sources, reading, outputs, neuron_layer, unique_neurons, table)
    find = _row_finder(rows)
    for s, t in pairs:
        for condition in dict.fromkeys(rows.condition):
            for j in range(len(sources)):
                i = find(j, s, t, condition)
                if i is not None:
                    record(i, j, s, t, condition)
    return table


def _row_finder(rows: _Rows):
    """``find(source, s, t, condition)``: the row that holds that record, or None where none was run."""
    shared = {
        (rows.source_layer[i], rows.target_layer[i], rows.condition[i]): i
        for i in range(len(rows.condition))
        if rows.source[i] < 0
    }
    own = {
        (rows.source[i], rows.source_layer[i], rows.target_layer[i], rows.condition[i]): i
        for i in range(len(rows.condition))
        if rows.source[i] >= 0
    }

    def find(source: int, s: int, t: int, condition: str) -> int | None:
        if condition == Condition.UNPATCHED:
            return shared[(-1, -1, condition)]
        return shared.get((s, t, condition), own.get((source, s, t, condition)))

    return find


class _Recorder:
    """Appends one record of the long table: row ``i`` scored against source ``j`` in cell ``(s, t)``."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sources: list[Source],
        reading: SourceReading,
        outputs: _Outputs,
        neuron_layer: int | None,
        unique_neurons: list[int],
        table: dict[str, list[Any]],
    ) -> None:
        self.tokenizer, self.sources, self.reading, self.outputs = tokenizer, sources, reading, outputs
        self.neuron_layer, self.table = neuron_layer, table
        self.neuron_column = {n: i for i, n in enumerate(unique_neurons)}
        self.source_text = [cast(str, tokenizer.decode([t])).strip() for t in reading.tokens]
        self.top1 = outputs.top1.tolist()
        self.surprisal = outputs.surprisal.tolist()
        self.token_text = {k: tokenizer.decode([k]) for k in set(self.top1)}

    def __call__(self, i: int, j: int, s: int, t: int, condition: str) -> None:
        activation, ratio = self._neuron(i, j, t, condition)
        top1 = self.top1[i]
        values = {
            "source": j,
            "source_layer": s,
            "target_layer": t,
            "condition": condition,
            "top1": top1,
            "top1_token": self.token_text[top1],
            "hit": float(top1 == int(self.reading.predicted[j])),
            "surprisal": self.surprisal[i][j],
            "activation": activation,
            "ratio": ratio,
            "case": _case(t, self.neuron_layer) if condition != Condition.UNPATCHED else Condition.UNPATCHED.value,
        }
        if self.outputs.generated is not None:
            tokens = self.outputs.generated[i]
            pieces = {cast(str, self.tokenizer.decode([k])).strip() for k in tokens}
            text = self.source_text[j]
            values["generated"] = tokens
            values["generated_text"] = self.tokenizer.decode(tokens, skip_special_tokens=True)
            values["source_token_in_generation"] = float(bool(text) and text in pieces)
        for name, value in values.items():
            self.table[name].append(value)

    def _neuron(self, i: int, j: int, t: int, condition: str) -> tuple[float | None, float | None]:
        """The source's neuron in row ``i`` and its reactivation ratio; None where it is not read."""
        source, neurons = self.sources[j], self.outputs.neurons
        if source.neuron is None or neurons is None:
            return None, None
        if condition != Condition.UNPATCHED and t > cast(int, self.neuron_layer):  # a neuron source sets the layer
            return None, None
        activation = float(neurons[i, self.neuron_column[source.neuron]])
        return activation, reactivation_ratio(activation, source.activation)


def summary_lines(result: SweepResult) -> list[str]:
    """What the sweep shows, in words: where the decode works, against the random control."""
    lines = []
    conditions = result.conditions()
    best = max(result.cells(), key=lambda c: (c["precision_at_1"] or 0.0, -(c["surprisal"] or 0.0)))
    lines.append(
        f"best cell s={best['source_layer']} t={best['target_layer']}: precision@1 {best['precision_at_1']:.3f}, "
        f"surprisal {best['surprisal']:.2f} nats over {len(result.sources)} source{'' if len(result.sources) == 1 else 's'}"
    )
    for condition in ("random_same_norm", "corpus_mean", "unpatched"):
        if condition in conditions:
            grid = result.grid("hit", condition)
            lines.append(f"control {condition}: precision@1 at most {np.nanmax(grid):.3f} over all cells")
    if "random_same_norm" in conditions:
        margin = result.grid("hit") - result.grid("hit", "random_same_norm")
        above = int(np.sum(margin > 0))
        lines.append(f"patched precision@1 above the random-vector control in {above} of {len(result.pairs)} cells")
    if result.neuron_layer is not None:
        L = result.neuron_layer
        ratios = [c for c in result.cells() if c["target_layer"] <= L and c["reactivation"] is not None]
        same = [c["reactivation"] for c in ratios if c["target_layer"] == L]
        earlier = [c for c in ratios if c["target_layer"] < L]
        if same:
            lines.append(
                f"reactivation at t = {L} (the neuron's own layer) averages {np.mean(same):.3f}: by construction, "
                "not evidence of a decode"
            )
        if earlier:
            top = max(earlier, key=lambda c: c["reactivation"])
            random = (top.get("controls", {}).get("random_same_norm") or {}).get("reactivation")
            vs = f" (random control {random:.3f})" if random is not None else ""
            lines.append(
                f"earliest-layer evidence: best reactivation at t < {L} is {top['reactivation']:.3f} at s={top['source_layer']} t={top['target_layer']}{vs}"
            )
        else:
            lines.append(f"no target layer below {L} was swept, so the reactivation here is no evidence of a decode")
    lines += [f"note: {note}" for note in result.notes]
    return lines
