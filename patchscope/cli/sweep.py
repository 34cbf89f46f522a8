"""``patchscope sweep``: source x target layer Patchscope sweep of one token, with metrics and heatmaps."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import cast

from patchscope.cli.common import add_model_flags


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


def register(parser: argparse.ArgumentParser) -> None:
    from patchscope.cli.args import add_dataclass_arguments
    from patchscope.scope.sweep import SweepConfig

    add_model_flags(parser)
    add_dataclass_arguments(parser, SweepInput)
    add_dataclass_arguments(parser, SweepConfig)


def run(args: argparse.Namespace) -> int:
    from patchscope.cli.args import from_namespace
    from patchscope.scope.sweep import SweepConfig

    given = from_namespace(SweepInput, args)
    config = from_namespace(SweepConfig, args)
    result, written = sweep_command(args.model, given, config, dtype=args.dtype, device=args.device)
    from patchscope.scope.sweep import summary_lines

    print("\n".join(summary_lines(result)))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def sweep_command(model_name: str, given: SweepInput, config, *, dtype: str = "auto", device: str = "auto"):
    """Check every input against the config and tokenizer, load the model, extract the source, sweep, save."""
    from patchscope.atlas.sources import SourceConfig, TextSource
    from patchscope.atlas.store import load_atlas
    from patchscope.model.loading import DTypeName, load_config, load_model, load_tokenizer
    from patchscope.model.sites import parse_site
    from patchscope.scope.config import PatchscopeConfig
    from patchscope.scope.extract import extract
    from patchscope.scope.heatmap import check_plotting, save_sweep
    from patchscope.scope.placeholder import plan_prompt
    from patchscope.scope.prompts import target_prompt
    from patchscope.scope.sweep import Source, resid_pre, sweep
    from patchscope.util.storage import check_writable

    # 1. everything that needs no weights
    if (given.text is None) == (given.atlas is None):
        raise ValueError("give the source as `text` with `position`, or as `atlas` with `neuron`")
    model_config = load_config(model_name)
    config.validate(model_config.num_hidden_layers)
    tokenizer = load_tokenizer(model_name)
    chosen = target_prompt(config.prompt, config.placeholder)
    prompt = plan_prompt(tokenizer, PatchscopeConfig(prompt=chosen.text, placeholder=chosen.placeholder))
    atlas = entry = None
    position: int | None
    neuron_site = given.neuron_site
    if given.atlas is not None:
        if given.neuron is None:
            raise ValueError("with `atlas`, name the `neuron` whose entry to sweep")
        atlas = load_atlas(given.atlas)
        neuron_site = neuron_site or next((s for s in atlas.sites if s.endswith("mlp.hook_post")), None)
        if neuron_site is None:
            raise ValueError(f"the atlas has no mlp.hook_post site ({', '.join(atlas.sites)}); pass `neuron_site`")
        entry = atlas.entry(neuron_site, given.neuron, given.rank)
        text = TextSource(
            SourceConfig(dataset=atlas.meta.dataset, split=atlas.meta.split, text_column=atlas.meta.text_column)
        ).fetch([entry.doc])[entry.doc]
        position, max_length, overflow = entry.position, atlas.meta.max_length, atlas.meta.overflow
    else:
        text, position = cast(str, given.text), given.position  # `text` is given when `atlas` is not
        length = len(tokenizer(text).input_ids)
        if position is None or not 0 <= position < length:
            raise ValueError(f"`position` must be a token position of `text`, 0..{length - 1} (BOS = 0); got {position}")
        max_length, overflow = length, "truncate"
        if given.neuron is not None and neuron_site is None:
            raise ValueError("with `text` and `neuron`, also name the `neuron_site`, e.g. blocks.6.mlp.hook_post")
    if given.neuron is not None:
        layer, suffix = parse_site(cast(str, neuron_site))  # checked above for both kinds of source
        if suffix != "mlp.hook_post" or not 0 <= given.neuron < model_config.intermediate_size:
            raise ValueError(
                f"`neuron` {given.neuron} at `neuron_site` {neuron_site}: use an mlp.hook_post site and 0..{model_config.intermediate_size - 1}"
            )
    if given.heatmaps:
        check_plotting()
    out = check_writable(given.out)

    # 2. the model, the source vector (re-checked against the atlas entry), the sweep
    model, tokenizer = load_model(model_name, dtype=cast(DTypeName, dtype), device=device)
    ex = extract(
        model,
        tokenizer,
        text,
        site=resid_pre(parse_site(neuron_site)[0] if neuron_site else 0),
        position=position,
        neuron=given.neuron,
        neuron_site=neuron_site if given.neuron is not None else None,
        entry=entry,
        max_length=max_length,
        overflow=overflow,
    )
    label = f"doc {entry.doc} pos {entry.position}" if entry else f"pos {position}"
    source = Source(
        ex.segment_ids,
        ex.local_position,
        label,
        neuron_site if given.neuron is not None else None,
        given.neuron,
        entry.activation if entry else ex.activation,
    )
    means = None
    if atlas is not None:
        means = {int(site.split(".")[1]): stats.mean for site, stats in atlas.sites.items() if site.endswith("hook_resid_pre")}
    result = sweep(model, tokenizer, [source], prompt, config, means=means)
    result.prompt.update(
        name=config.prompt if config.prompt != chosen.text else "custom", origin=chosen.origin, placeholder=chosen.placeholder
    )
    written = save_sweep(result, out, heatmaps=given.heatmaps, title=f"{model_name}, {config.prompt}")
    return result, written
