"""The ``patchscope`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__


def _cmd_sites(args: argparse.Namespace) -> int:
    from .models import load_model
    from .sites import resolve, sites

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    for name in sites(model):
        ref = resolve(model, name)
        module_name = next(n for n, m in model.named_modules() if m is ref.module)
        print(f"{name:32s} {ref.point:6s} of {module_name}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .config import from_namespace
    from .data import SourceConfig, TextSource
    from .models import load_model
    from .profiler import ProfileConfig, guard_output, profile
    from .storage import check_writable

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
            atlas.export_original(out / f"gemma2_neuron_mapping_layer_{layer}.json", site, texts, tokenizer)
        atlas.export_parquet(out / f"top_examples_{site}.parquet", site, texts, tokenizer)
    print(f"wrote {out}/atlas.safetensors, atlas.json, the neuron mapping and top_examples_*.parquet")
    return 0


def _cmd_sae(args: argparse.Namespace) -> int:
    import torch

    from .attribution import attribute_neuron
    from .hooks import capture, stop_after
    from .models import load_config, load_model
    from .sae import check_site, top_features
    from .sae_io import load_sae

    sae = load_sae(args.sae, d_model=load_config(args.model).hidden_size)
    site = args.site or sae.info.site
    if site is None:
        raise ValueError("this SAE does not record its site; pass --site")
    check_site(sae, site, allow_mismatch=args.allow_site_mismatch)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = tokenizer(args.text, return_tensors="pt").input_ids.to(model.device)
    if not 0 <= args.position < ids.shape[1]:
        raise IndexError(f"--position {args.position} is outside the text's {ids.shape[1]} tokens (BOS is 0)")
    with torch.no_grad(), capture(model, site) as cache, stop_after(model, site):
        model(input_ids=ids)
    vector = cache[site][0, args.position]
    sae = sae.to(vector.device)
    token = tokenizer.decode([int(ids[0, args.position])])
    print(f"SAE {sae.info.source} (trained on {sae.info.site}, d_sae {sae.d_sae}) at {site}, position {args.position} {token!r}")
    print(format_readout(top_features(sae, vector, args.k, position=args.position)))
    if args.neuron is not None:
        result = attribute_neuron(model, sae, ids, args.position, vector, site=site, neuron=args.neuron, allow_site_mismatch=args.allow_site_mismatch)
        print(f"\nfeatures that drive neuron {args.neuron} of {result.neuron_site} (value {result.value:.4f}):")
        for feature in result.features[: args.k]:
            print(f"  {feature.index:>7d}  act {feature.activation:8.3f}  contribution {feature.contribution:+9.4f}  {feature.url or ''}")
        print(f"  b_dec {result.bias_contribution:+.4f}   SAE error {result.error_contribution:+.4f}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import from_namespace
    from .data import SourceConfig
    from .patchscope import PatchscopeConfig
    from .pipeline import ExperimentConfig, format_summary, run_experiment
    from .profiler import ProfileConfig

    config = from_namespace(
        ExperimentConfig,
        args,
        source=from_namespace(SourceConfig, args),
        profile=from_namespace(ProfileConfig, args),
        patchscope=from_namespace(PatchscopeConfig, args),
    )
    result = run_experiment(config)
    print(format_summary(result))
    print(f"\nwrote {config.out}/results.json")
    return 0


def format_readout(readout) -> str:
    lines = [f"  L0 {readout.l0}   relative error {readout.relative_error:.3f}   cosine {readout.cosine:.3f}"]
    lines += [f"  {hit.index:>7d}  {hit.activation:9.3f}  {hit.url or ''}" for hit in readout.features]
    lines += [f"  ! {note}" for note in readout.warnings]
    return "\n".join(lines)


def check_layers(model_name: str, layers: list[int]) -> None:
    """Layer numbers against the model's config, before its weights load."""
    from .models import load_config

    count = load_config(model_name).num_hidden_layers
    for layer in layers:
        if not 0 <= layer < count:
            raise ValueError(f"layer {layer} is out of range: {model_name} has layers 0..{count - 1}")


def summarize_atlas(atlas) -> str:
    extra = atlas.meta.extra
    lines = [
        f"profiled {atlas.meta.n_documents} documents ({atlas.meta.skipped_empty} empty skipped), "
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


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="google/gemma-2-2b", help="hub id, preset name or local directory")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchscope", description=__doc__)
    parser.add_argument("--version", action="version", version=f"patchscope {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    sites_parser = commands.add_parser("sites", help="list the hook sites of a model and the HF module behind each")
    _add_model_flags(sites_parser)
    sites_parser.set_defaults(run=_cmd_sites)
    from .config import add_dataclass_arguments
    from .data import SourceConfig
    from .profiler import ProfileConfig

    profile_parser = commands.add_parser("profile", help="profile every neuron of a layer over a corpus into an atlas")
    _add_model_flags(profile_parser)
    add_dataclass_arguments(profile_parser, SourceConfig)
    add_dataclass_arguments(profile_parser, ProfileConfig)
    profile_parser.add_argument("--out", required=True, help="output directory")
    profile_parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    profile_parser.set_defaults(run=_cmd_profile)

    sae_parser = commands.add_parser("sae", help="print the top SAE features of one token's residual vector")
    _add_model_flags(sae_parser)
    sae_parser.add_argument("--sae", required=True, help="params.npz / .safetensors file, SAELens folder, or REPO_ID/PATH")
    sae_parser.add_argument("--text", required=True)
    sae_parser.add_argument("--position", type=int, required=True, help="token position, BOS = 0")
    sae_parser.add_argument("--site", help="site to read (default: the site the SAE was trained on)")
    sae_parser.add_argument("--k", type=int, default=10, help="features to show")
    sae_parser.add_argument("--neuron", type=int, help="also rank the features by how much they drive this MLP neuron")
    sae_parser.add_argument("--allow-site-mismatch", action="store_true", help="read a vector from another site anyway")
    sae_parser.set_defaults(run=_cmd_sae)

    from .patchscope import PatchscopeConfig
    from .pipeline import ExperimentConfig

    run_parser = commands.add_parser("run", help="the whole experiment: profile, extract, SAE, Patchscope; writes results.json")
    add_dataclass_arguments(run_parser, ExperimentConfig, skip=("source", "profile", "patchscope"))
    add_dataclass_arguments(run_parser, SourceConfig)
    add_dataclass_arguments(run_parser, ProfileConfig)
    add_dataclass_arguments(run_parser, PatchscopeConfig)
    run_parser.set_defaults(run=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError, IndexError) as error:
        print(f"patchscope {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
