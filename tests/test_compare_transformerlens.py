"""Our sites against TransformerLens on identical weights (needs the `compare` extra)."""

import pytest
import torch

from patchscope import capture, load_model

bridge_module = pytest.importorskip("transformer_lens.model_bridge", reason="install the `compare` extra")

SITES = [
    "blocks.1.hook_resid_pre",
    "blocks.2.hook_resid_pre",
    "blocks.1.mlp.hook_post",
    "blocks.2.mlp.hook_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_attn_out",
]


@pytest.mark.parametrize("family", ["gemma_dir", "llama_dir"])
def test_sites_match_transformerlens(family, request):
    directory = str(request.getfixturevalue(family))
    ours, tokenizer = load_model(directory, dtype="float32", device="cpu")
    theirs, _ = load_model(directory, dtype="float32", device="cpu")  # TL wraps its model: keep ours untouched
    bridge = bridge_module.TransformerBridge.boot_transformers(
        directory, hf_model=theirs, tokenizer=tokenizer, device="cpu", dtype=torch.float32
    )
    ids = tokenizer(
        ["The next train to the city leaves at 7", "Proteins fold into shapes"], return_tensors="pt", padding=True
    ).input_ids
    _, tl_cache = bridge.run_with_cache(ids, names_filter=lambda name: name in SITES)
    with capture(ours, SITES) as cache:
        ours(ids)
    for site in SITES:
        torch.testing.assert_close(cache[site], tl_cache[site], rtol=1e-5, atol=1e-5, msg=lambda m, site=site: f"{site}: {m}")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen3"])
def test_table_families_match_transformerlens(family, tmp_path):
    """GPT-2 (Conv1D), Pythia-style GPT-NeoX (parallel residual) and Qwen3 (q/k norms): every site we place
    on layer 1, against TransformerLens' own hook names on the same weights."""
    from factories import tiny_from_config
    from test_families import SPECS

    from patchscope import list_sites

    directory = str(tiny_from_config(tmp_path, SPECS[family].config))
    ours, tokenizer = load_model(directory, dtype="float32", device="cpu")
    theirs, _ = load_model(directory, dtype="float32", device="cpu")
    bridge = bridge_module.TransformerBridge.boot_transformers(
        directory, hf_model=theirs, tokenizer=tokenizer, device="cpu", dtype=torch.float32
    )
    ids = tokenizer(
        ["The next train to the city leaves at 7", "Proteins fold into shapes"], return_tensors="pt", padding=True
    ).input_ids
    sites = [s for s in list_sites(ours) if s.startswith("blocks.1.") or s == "hook_embed"]
    assert len(sites) == (7 if family == "gpt_neox" else 8)  # Pythia has no hook_resid_mid
    _, tl_cache = bridge.run_with_cache(ids, names_filter=lambda name: name in sites)
    with torch.no_grad(), capture(ours, sites) as cache:
        ours(ids)
    for site in sites:
        torch.testing.assert_close(cache[site], tl_cache[site], rtol=1e-5, atol=1e-5, msg=lambda m, site=site: f"{site}: {m}")
