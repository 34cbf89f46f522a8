"""``patchscope profile``: profile every neuron of a layer over a corpus into an atlas."""

from __future__ import annotations

import argparse
import os
import sys

from patchscope.cli.common import add_model_flags, check_layers, layer_count


def register(parser: argparse.ArgumentParser) -> None:
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.sources import SourceConfig
    from patchscope.cli.args import add_dataclass_arguments

    add_model_flags(parser)
    add_dataclass_arguments(parser, SourceConfig)
    add_dataclass_arguments(parser, ProfileConfig)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--sae", action="append", default=[], metavar="SPEC", help=SAE_HELP)
    add_scale_flags(parser)


SAE_HELP = (
    "also profile this SAE's features, as a site of their own in the same forward pass (repeatable): a Gemma Scope "
    "params.npz, a Gemma Scope 2 folder, a SAELens folder or REPO_ID/PATH (docs/gemma-scope-2.md)"
)


def run(args: argparse.Namespace) -> int:
    from patchscope.atlas import distributed
    from patchscope.atlas.exports import DEFAULT_EXPORTS
    from patchscope.atlas.folder import Policy, plan_before_loading
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.profiling import profile
    from patchscope.atlas.sources import SourceConfig, TextSource
    from patchscope.cli.args import from_namespace
    from patchscope.model.loading import resolve_device, resolve_dtype
    from patchscope.model.sites import parse_site
    from patchscope.util.storage import check_writable

    if args.nproc > 1 and distributed.detect().size == 1:
        return launch(args.nproc)
    world = distributed.detect()
    source = TextSource(from_namespace(SourceConfig, args))
    config = from_namespace(ProfileConfig, args)
    config.validate()
    config = config.for_model(layer_count(args.model))  # --layers, expanded and checked before the weights load
    layers = [layer for layer, _ in map(parse_site, config.site_names()) if layer >= 0]
    check_layers(args.model, layers)
    out = check_writable(args.out)
    resolved = resolve_dtype(args.dtype, resolve_device(args.device))
    dtype = str(resolved).removeprefix("torch.")
    features = _load_features(args.model, args.sae)  # before the model: the SAEs are part of the run's key
    if world.is_main:
        print(say_footprint(args.model, config, resolved.itemsize, features), file=sys.stderr)
    plan_before_loading(out, world, args.model, source, config, dtype, Policy(resume=args.resume), features=features)
    device = distributed.rank_device(args.device, world)  # cuda:LOCAL_RANK under torchrun
    if args.device_map and world.size > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "`device_map` spreads one model over this node's GPUs: run one process per node (torchrun --nproc-per-node 1)"
        )
    model, tokenizer = _load(args, config, layers, device)
    atlas = profile(
        model,
        tokenizer,
        source,
        config,
        features=features,
        out=out,
        resume=args.resume,
        model_name=args.model,
        exports=DEFAULT_EXPORTS,
        progress=world.is_main,
    )
    if not world.is_main:  # rank 0 writes the one atlas and the exports
        return 0
    print(summarize_atlas(atlas))
    print(f"wrote {out}/atlas.safetensors, atlas.json, the neuron mapping and top_examples_*.parquet")
    return 0


def _load(args: argparse.Namespace, config, layers: list[int], device: str):
    """The model for a profile: never the layers after the deepest site, nor the LM head, unless a raw
    site outside the decoder layers (the final norm, the head) needs the whole model."""
    from patchscope.model.loading import load_model, load_model_until
    from patchscope.model.sites import is_raw, parse_site

    outside = any(is_raw(site) and parse_site(site)[0] < 0 for site in config.site_names())
    if args.truncated_load and not outside:
        return load_model_until(args.model, max(layers, default=0), dtype=args.dtype, device=device, device_map=args.device_map)
    return load_model(args.model, dtype=args.dtype, device=device, device_map=args.device_map)


def _load_features(model_name: str, specs: list[str]) -> list:
    """``--sae`` as feature sites, on the CPU (each SAE follows its site's activations to their device when it encodes)."""
    if not specs:
        return []
    from patchscope.model.loading import load_config
    from patchscope.sae.features import load_feature_sites

    return load_feature_sites(specs, d_model=load_config(model_name).hidden_size)


def say_footprint(model_name: str, config, dtype_bytes: int, features=()) -> str:
    """The atlas state and workspace of this run, from the model's config alone (`patchscope.atlas.footprint`)."""
    from patchscope.atlas.footprint import footprint, widths_from_config
    from patchscope.model.loading import load_config

    model_config = load_config(model_name)
    widths = widths_from_config(config.site_names(), model_config.hidden_size, model_config.intermediate_size)
    return footprint(config, widths | {f.name: f.d_sae for f in features}, dtype_bytes).describe()


def add_scale_flags(parser: argparse.ArgumentParser) -> None:
    """Data parallelism (torchrun), one model over several GPUs (accelerate), and truncated loading."""
    group = parser.add_argument_group("scaling out")
    group.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine, one per GPU (torchrun --standalone --nproc-per-node N); "
        "for several nodes, run torchrun yourself (see docs/scaling-out.md)",
    )
    group.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto: one model over several GPUs")
    group.add_argument(
        "--truncated-load",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load only the layers up to the deepest profiled site, without the LM head (values are unchanged)",
    )


def launch(nproc: int) -> int:
    """Re-run this command under torchrun's single-node launcher, ``nproc`` processes."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    argv = _without_nproc(sys.argv[1:])
    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "patchscope", *argv])
    except ChildFailedError:
        raise RuntimeError(f"a profiling process of {nproc} failed; its error is printed above") from None
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def summarize_atlas(atlas) -> str:
    meta, run = atlas.meta, atlas.meta.provenance
    rows = meta.rows_read
    lines = [
        f"profiled {meta.n_documents} documents ({meta.skipped_empty} empty skipped"
        f"{f'; rows {rows[0]}-{rows[1]} of {meta.dataset} read' if rows else ''}), "
        f"{atlas.n_tokens} tokens counted, {run.tokens_per_second} tok/s, "
        f"padding {100 * run.padding_fraction:.1f}%"
    ]
    for site in atlas.sites:
        top = atlas.top_neurons(site, 5)
        maxima = ", ".join(f"{n} ({float(atlas[site].max[n]):.3f})" for n in top)
        lines.append(f"  {site}: top neurons by max activation: {maxima}")
    if run.nonfinite_activations:
        lines.append(
            f"!! WARNING: {run.nonfinite_activations} activations were inf/nan and were left out: use bfloat16 or float32 !!"
        )
    return "\n".join(lines)
