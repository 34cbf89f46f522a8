"""``patchscope report``: a static, offline HTML dashboard of an atlas."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from patchscope.cli.args import add_dataclass_arguments
    from patchscope.report.dashboard import DashboardConfig

    parser.add_argument("atlas", metavar="ATLAS_DIR", help="directory holding atlas.safetensors")
    parser.add_argument("--out", required=True, help="directory for the site (index.html, neurons/)")
    parser.add_argument("--model", default=None, help="model to replay the examples with (default: the one the atlas names)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--sae", action="append", default=[], metavar="SPEC", help="the SAE of a feature site, to replay it")
    add_dataclass_arguments(parser, DashboardConfig)


def run(args: argparse.Namespace) -> int:
    from patchscope.atlas.store import load_atlas
    from patchscope.cli.args import from_namespace
    from patchscope.report.dashboard import DashboardConfig, chosen_neurons, shown_examples, top_documents, write_dashboard
    from patchscope.report.inputs import atlas_model
    from patchscope.util.storage import check_writable

    config = from_namespace(DashboardConfig, args)
    config.validate()
    out = check_writable(args.out)
    atlas = load_atlas(args.atlas)
    chosen = chosen_neurons(atlas, config)  # checks `neurons` before the model loads
    docs = {
        e.doc for site, ns in chosen.items() for n in ns for g in shown_examples(atlas, site, n, config).values() for _, e in g
    }
    if config.all_neurons:  # every neuron's page quotes its top and bottom examples
        from patchscope.report.neuron_view import shown_documents

        docs |= shown_documents(atlas, config.examples)
    texts = atlas.texts(docs | top_documents(atlas))  # the index quotes every neuron's top token
    model, tokenizer = atlas_model(atlas, args.model, args.dtype, args.device)
    from typing import Any, cast

    from patchscope.sae.features import load_feature_sites

    features = load_feature_sites(args.sae, d_model=cast(Any, model.config).hidden_size, device=next(model.parameters()).device)
    index = write_dashboard(atlas, out, model=model, tokenizer=tokenizer, texts=texts, config=config, features=features)
    pages = f"{sum(len(ns) for ns in chosen.values())} neuron pages"
    if config.all_neurons:
        pages += f", and every other neuron's page drawn from the atlas's numbers ({out / 'neurons' / 'data'})"
    print(f"wrote {index} and {pages}; open it in a browser (works offline)")
    return 0
