"""``patchscope sae``: the top SAE features of one token's residual vector."""

from __future__ import annotations

import argparse

from patchscope.cli.common import add_model_flags


def register(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument("--sae", required=True, help="params.npz / .safetensors file, SAELens folder, or REPO_ID/PATH")
    parser.add_argument("--text", required=True, help="the text to run through the model")
    parser.add_argument("--position", type=int, required=True, help="token position, BOS = 0")
    parser.add_argument("--site", help="site to read (default: the site the SAE was trained on)")
    parser.add_argument("--k", type=int, default=10, help="features to show")
    parser.add_argument("--neuron", type=int, help="also rank the features by how much they drive this MLP neuron")
    parser.add_argument("--allow-site-mismatch", action="store_true", help="read a vector from another site anyway")


def run(args: argparse.Namespace) -> int:
    import torch

    from patchscope.cli.common import check_layers
    from patchscope.model.hooks import run_with_cache
    from patchscope.model.loading import load_config, load_model, load_tokenizer
    from patchscope.model.sites import parse_site
    from patchscope.sae.attribution import attribute_neuron
    from patchscope.sae.jumprelu import check_site, top_features
    from patchscope.sae.loaders import load_sae

    # every check that needs no weights: the SAE, its site, the layer, the neuron and the position
    model_config = load_config(args.model)
    sae = load_sae(args.sae, d_model=model_config.hidden_size)
    site = args.site or sae.info.site
    if site is None:
        raise ValueError("this SAE does not record its site; pass --site")
    check_site(sae, site, allow_site_mismatch=args.allow_site_mismatch)
    if parse_site(site)[0] >= 0:  # hook_embed has no layer
        check_layers(args.model, [parse_site(site)[0]])
    if args.neuron is not None and not 0 <= args.neuron < model_config.intermediate_size:
        raise ValueError(f"--neuron {args.neuron} is out of range: the MLP has neurons 0..{model_config.intermediate_size - 1}")
    length = len(load_tokenizer(args.model)(args.text).input_ids)
    if not 0 <= args.position < length:
        raise IndexError(f"--position {args.position} is outside the text's {length} tokens (BOS is 0)")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    ids = tokenizer(args.text, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        _, cache = run_with_cache(model, ids, site)
    vector = cache[site][0, args.position]
    sae = sae.to(vector.device)
    token = tokenizer.decode([int(ids[0, args.position])])
    print(f"SAE {sae.info.source} (trained on {sae.info.site}, d_sae {sae.d_sae}) at {site}, position {args.position} {token!r}")
    print(format_readout(top_features(sae, vector, args.k, position=args.position)))
    if args.neuron is not None:
        result = attribute_neuron(
            model, sae, ids, args.position, vector, site=site, neuron=args.neuron, allow_site_mismatch=args.allow_site_mismatch
        )
        print(f"\nfeatures that drive neuron {args.neuron} of {result.neuron_site} (value {result.value:.4f}):")
        for feature in result.features[: args.k]:
            print(
                f"  {feature.index:>7d}  act {feature.activation:8.3f}  contribution {feature.contribution:+9.4f}  {feature.url or ''}"
            )
        print(f"  b_dec {result.bias_contribution:+.4f}   SAE error {result.error_contribution:+.4f}")
    return 0


def format_readout(readout) -> str:
    lines = [f"  L0 {readout.l0}   relative error {readout.relative_error:.3f}   cosine {readout.cosine:.3f}"]
    lines += [f"  {hit.index:>7d}  {hit.activation:9.3f}  {hit.url or ''}" for hit in readout.features]
    lines += [f"  ! {note}" for note in readout.warnings]
    return "\n".join(lines)
