"""``patchscope profile``: profile every neuron of a layer over a corpus into an atlas."""

from __future__ import annotations

import argparse

from patchscope.cli.common import add_model_flags, check_layers



def register(parser: argparse.ArgumentParser) -> None:
    from patchscope.atlas.config import ProfileConfig
    from patchscope.atlas.sources import SourceConfig
    from patchscope.cli.args import add_dataclass_arguments

    add_model_flags(parser)
    add_dataclass_arguments(parser, SourceConfig)
    add_dataclass_arguments(parser, ProfileConfig)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")


def run(args: argparse.Namespace) -> int:
    from patchscope.cli.args import from_namespace
    from patchscope.atlas.sources import SourceConfig, TextSource
    from patchscope.model.loading import load_model
    from patchscope.atlas.config import ProfileConfig
    from patchscope.atlas.exports import export_original, export_parquet
    from patchscope.atlas.run import guard_output, profile
    from patchscope.util.storage import check_writable

    source = TextSource(from_namespace(SourceConfig, args))
    config = from_namespace(ProfileConfig, args)
    config.validate()
    out = check_writable(args.out)
    guard_output(out, args.resume)
    check_layers(args.model, [int(site.split(".")[1]) for site in config.site_names() if site.startswith("blocks.")])
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    atlas = profile(model, tokenizer, source, config, out=out, resume=args.resume, model_name=args.model)
    print(summarize_atlas(atlas))
    texts = source.fetch(atlas.documents())
    for site in atlas.sites:
        layer = site.split(".")[1]
        if site.endswith("mlp.hook_post"):
            export_original(atlas, out / f"gemma2_neuron_mapping_layer_{layer}.json", site, texts, tokenizer)
        export_parquet(atlas, out / f"top_examples_{site}.parquet", site, texts, tokenizer)
    print(f"wrote {out}/atlas.safetensors, atlas.json, the neuron mapping and top_examples_*.parquet")
    return 0


def summarize_atlas(atlas) -> str:
    extra = atlas.meta.extra
    rows = extra.get("rows_read")
    lines = [
        f"profiled {atlas.meta.n_documents} documents ({atlas.meta.skipped_empty} empty skipped"
        f"{f'; rows {rows[0]}-{rows[1]} of {atlas.meta.dataset} read' if rows else ''}), "
        f"{atlas.n_tokens} tokens counted, {extra.get('tokens_per_second')} tok/s, "
        f"padding {100 * extra.get('padding_fraction', 0):.1f}%"
    ]
    for site in atlas.sites:
        top = atlas.top_neurons(site, 5)
        maxima = ", ".join(f"{n} ({float(atlas[site].max[n]):.3f})" for n in top)
        lines.append(f"  {site}: top neurons by max activation: {maxima}")
    nonfinite = extra.get("nonfinite_activations", 0)
    if nonfinite:
        lines.append(f"!! WARNING: {nonfinite} activations were inf/nan and were left out: use bfloat16 or float32 !!")
    return "\n".join(lines)
