"""Our sites against nnsight's ``.input`` / ``.output`` of the same modules (needs the `compare` extra)."""

import pytest
import torch
from factories import tiny_from_config
from test_families import SPECS

from patchscope import capture, list_sites, load_model, resolve

nnsight = pytest.importorskip("nnsight", reason="install the `compare` extra")


def _envoy(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen3", "phi3"])
def test_sites_match_nnsight(family, tmp_path):
    model, tokenizer = load_model(str(tiny_from_config(tmp_path, SPECS[family].config)), dtype="float32", device="cpu")
    ids = tokenizer(
        ["The next train to the city leaves at 7", "Proteins fold into shapes"], return_tensors="pt", padding=True
    ).input_ids
    sites = [s for s in list_sites(model) if s.startswith("blocks.1.") or s == "hook_embed"]
    paths = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad(), capture(model, sites) as cache:
        model(ids)
    saved = {}
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), wrapped.trace(ids):
        for site in sites:  # in forward order, as nnsight requires
            ref = resolve(model, site)
            envoy = _envoy(wrapped, paths[id(ref.module)])
            saved[site] = (envoy.input if ref.point == "input" else envoy.output).save()
    for site in sites:
        value = saved[site][0] if isinstance(saved[site], tuple) else saved[site]
        ref = resolve(model, site)
        value = value if ref.part is None else value[..., ref.part]
        torch.testing.assert_close(cache[site], value, rtol=0, atol=0, msg=lambda m, site=site: f"{site}: {m}")
