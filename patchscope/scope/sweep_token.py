"""Sweep one source token end to end: from a text or an atlas entry, checked, extracted, swept, saved.

What ``patchscope sweep`` runs, callable from Python:

    >>> outcome = sweep_token("./my-model", SweepInput(text="The quick brown fox", position=3), SweepConfig())
    >>> outcome.result.cells()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import Atlas, AtlasEntry
from patchscope.atlas.batching import Overflow
from patchscope.atlas.store import load_atlas
from patchscope.model.loading import DTypeName, load_config, load_model, load_tokenizer
from patchscope.model.sites import parse_site
from patchscope.scope.extract import extract
from patchscope.scope.placeholder import plan_prompt
from patchscope.scope.sweep import Source, SweepConfig, SweepResult, resid_pre, sweep
from patchscope.scope.sweep_files import check_plotting, save_sweep
from patchscope.util.storage import check_writable


@dataclass(frozen=True)
class SweepInput:
    """The source token (a text and position, or an atlas entry) and where the outputs go."""

    text: str | None = field(default=None, metadata={"help": "Source text; with `position`."})
    position: int | None = field(default=None, metadata={"help": "Token position of the source token in `text` (BOS = 0)."})
    atlas: str | None = field(
        default=None,
        metadata={"help": "Atlas directory: take the source token from its entry (`neuron`, `rank`) instead of a text."},
    )
    neuron: int | None = field(
        default=None, metadata={"help": "Neuron whose reactivation is read (with `atlas`, also the entry to sweep)."}
    )
    rank: int = field(default=0, metadata={"help": "Rank of the atlas entry (0 = the neuron's strongest example)."})
    neuron_site: str | None = field(
        default=None, metadata={"help": "Site of `neuron` (default: the atlas's first mlp.hook_post site)."}
    )
    out: str = field(default="patchscope-sweep", metadata={"help": "Output directory: sweep.json, sweep.parquet, heatmaps."})
    heatmaps: bool = field(default=True, metadata={"help": "Write PNG heatmaps (needs matplotlib)."})


@dataclass
class SourceText:
    """The source token resolved before the model loads: its document text and how it was segmented."""

    text: str
    position: int
    """Token position in ``text`` (BOS = 0)."""
    max_length: int
    overflow: Overflow
    neuron_site: str | None
    entry: AtlasEntry | None = None
    """The atlas entry the token comes from, re-checked when extracted."""
    atlas: Atlas | None = None


@dataclass
class SweepOutcome:
    """A finished sweep and the files written."""

    result: SweepResult
    written: list[Path]


def sweep_token(
    model_name: str, given: SweepInput, config: SweepConfig, *, dtype: DTypeName = "auto", device: str = "auto"
) -> SweepOutcome:
    """Check every input against the config and tokenizer, load the model, extract the source, sweep, save."""
    # 1. everything that needs no weights
    if (given.text is None) == (given.atlas is None):
        raise ValueError("give the source as `text` with `position`, or as `atlas` with `neuron`")
    model_config = load_config(model_name)
    config.validate(model_config.num_hidden_layers)
    tokenizer = load_tokenizer(model_name)
    chosen = config.target()
    prompt = plan_prompt(tokenizer, config)
    source_text = _from_atlas(given) if given.atlas is not None else _from_text(given, tokenizer)
    if given.neuron is not None:
        _check_neuron(given.neuron, cast(str, source_text.neuron_site), model_config.intermediate_size)
    if given.heatmaps:
        check_plotting()
    out = check_writable(given.out)

    # 2. the model, the source vector (re-checked against the atlas entry), the sweep
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    source = _extract_source(model, tokenizer, given, source_text)
    result = sweep(model, tokenizer, [source], prompt, config, means=_resid_means(source_text.atlas, model, tokenizer))
    result.prompt.update(
        name=config.prompt if config.prompt != chosen.text else "custom", origin=chosen.origin, placeholder=chosen.placeholder
    )
    written = save_sweep(result, out, heatmaps=given.heatmaps, title=f"{model_name}, {config.prompt}")
    return SweepOutcome(result, written)


def _from_atlas(given: SweepInput) -> SourceText:
    if given.neuron is None:
        raise ValueError("with `atlas`, name the `neuron` whose entry to sweep")
    atlas = load_atlas(cast(str, given.atlas))
    neuron_site = given.neuron_site or next((s for s in atlas.sites if s.endswith("mlp.hook_post")), None)
    if neuron_site is None:
        raise ValueError(f"the atlas has no mlp.hook_post site ({', '.join(atlas.sites)}); pass `neuron_site`")
    entry = atlas.entry(neuron_site, given.neuron, given.rank)
    text = atlas.texts([entry.doc])[entry.doc]
    return SourceText(text, entry.position, atlas.meta.max_length, atlas.meta.overflow, neuron_site, entry, atlas)


def _from_text(given: SweepInput, tokenizer: PreTrainedTokenizerBase) -> SourceText:
    text, position = cast(str, given.text), given.position  # `text` is given when `atlas` is not
    length = len(tokenizer(text).input_ids)
    if position is None or not 0 <= position < length:
        raise ValueError(f"`position` must be a token position of `text`, 0..{length - 1} (BOS = 0); got {position}")
    if given.neuron is not None and given.neuron_site is None:
        raise ValueError("with `text` and `neuron`, also name the `neuron_site`, e.g. blocks.6.mlp.hook_post")
    return SourceText(text, position, length, "truncate", given.neuron_site)


def _check_neuron(neuron: int, neuron_site: str, d_mlp: int) -> None:
    _, suffix = parse_site(neuron_site)
    if suffix != "mlp.hook_post" or not 0 <= neuron < d_mlp:
        raise ValueError(f"`neuron` {neuron} at `neuron_site` {neuron_site}: use an mlp.hook_post site and 0..{d_mlp - 1}")


def _extract_source(model: nn.Module, tokenizer: PreTrainedTokenizerBase, given: SweepInput, source_text: SourceText) -> Source:
    """The source token as the sweep takes it, its vector re-checked against the atlas entry."""
    neuron_site, entry = source_text.neuron_site, source_text.entry
    ex = extract(
        model,
        tokenizer,
        source_text.text,
        site=resid_pre(parse_site(neuron_site)[0] if neuron_site else 0),
        position=source_text.position,
        neuron=given.neuron,
        neuron_site=neuron_site if given.neuron is not None else None,
        entry=entry,
        max_length=source_text.max_length,
        overflow=source_text.overflow,
    )
    label = f"doc {entry.doc} pos {entry.position}" if entry else f"pos {source_text.position}"
    return Source(
        ex.segment_ids,
        ex.local_position,
        label,
        neuron_site if given.neuron is not None else None,
        given.neuron,
        entry.activation if entry else ex.activation,
    )


def _resid_means(atlas: Atlas | None, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[int, Tensor] | None:
    """The atlas's corpus means of ``blocks.s.hook_resid_pre``, by layer s, first slots left out (the corpus_mean control)."""
    if atlas is None:
        return None
    return {
        int(site.split(".")[1]): atlas.mean_without_first_slots(site, model, tokenizer)
        for site in atlas.sites
        if site.endswith("hook_resid_pre")
    }
