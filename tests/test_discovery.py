"""Structural discovery on decoders outside the family table: used when unambiguous, refused naming what it found."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from factories import FIXTURE_CORPUS, tiny_from_config
from transformers.activations import ACT2FN

from patchscope import capture, list_sites, load_model, resolve
from patchscope.model.families import FAMILIES
from patchscope.model.sites import SiteError, layout, refused_sites

TESTS = Path(__file__).resolve().parent
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)


def starcoder2(vocab: int):
    """Not in the table: ``mlp.c_fc`` / ``mlp.c_proj`` are Linear layers, the norms are LayerNorms."""
    return transformers.Starcoder2Config(vocab_size=vocab, num_key_value_heads=2, bos_token_id=2, eos_token_id=1, **SMALL)


@pytest.fixture(scope="module")
def discovered(tmp_path_factory):
    directory = tiny_from_config(tmp_path_factory.mktemp("starcoder2"), starcoder2)
    return load_model(str(directory), dtype="float32", device="cpu")


def test_a_family_outside_the_table_resolves_by_discovery(discovered):
    model, tokenizer = discovered
    assert model.config.model_type not in FAMILIES
    assert layout(model).rule == (
        "structural discovery: decoder layers at model.layers; mlp.hook_post, mlp.hook_pre from the MLP's projections"
    )
    assert resolve(model, "blocks.1.mlp.hook_post").module is model.model.layers[1].mlp.c_proj
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post"]
    names += ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"]
    assert set(names) <= set(list_sites(model))
    seen = {}
    mlp = model.model.layers[1].mlp
    handle = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    ids = tokenizer(FIXTURE_CORPUS[0], return_tensors="pt").input_ids
    try:
        with torch.no_grad(), capture(model, names) as cache:
            out = model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    for layer in range(2):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer], rtol=0, atol=0)
    pre = seen["x"] @ mlp.c_fc.weight.T + mlp.c_fc.bias
    torch.testing.assert_close(cache["blocks.1.mlp.hook_pre"], pre)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_post"], ACT2FN[model.config.hidden_act](pre))
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], cache["blocks.2.hook_resid_pre"], rtol=0, atol=0)


def test_sites_discovery_cannot_place_are_refused_with_the_raw_site_to_use(discovered):
    model, _ = discovered
    refused = refused_sites(model)
    assert set(refused) == {f"blocks.{L}.{s}" for L in range(3) for s in ("hook_attn_out", "hook_resid_mid", "hook_mlp_out")}
    with pytest.raises(SiteError, match=r"blocks.1.hook_mlp_out does not exist.*raw site such as 'model.layers.1.<mlp>:output'"):
        resolve(model, "blocks.1.hook_mlp_out")


def test_two_candidate_layer_lists_are_refused_by_name(discovered):
    model, _ = discovered
    model.model.adapters = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))  # also 3 modules of one class
    try:
        with pytest.raises(
            SiteError, match=r"'starcoder2'.*2 module lists could be the 3 decoder layers: model.layers, model.adapters"
        ):
            list_sites(model)
    finally:
        del model.model.adapters
    assert "blocks.0.hook_resid_pre" in list_sites(model)


def test_a_layer_without_an_mlp_child_refuses_mlp_sites_naming_its_children():
    """OPT keeps fc1 / fc2 on the layer itself: no MLP module to read, so discovery names what it saw."""
    config = transformers.OPTConfig(
        vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16
    )
    model = transformers.OPTForCausalLM(config).eval()
    assert layout(model).layers_path == "model.decoder.layers"
    with pytest.raises(SiteError, match=r"0 MLP-like children of model.decoder.layers.1 \(its children: self_attn, .*fc1, fc2"):
        resolve(model, "blocks.1.mlp.hook_post")
    resolve(model, "blocks.1.hook_resid_post")


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import transformers
from factories import tiny_from_config
from patchscope.cli.main import main

def config(vocab):
    return transformers.Starcoder2Config(vocab_size=vocab, num_key_value_heads=2, bos_token_id=2, eos_token_id=1, **{small!r})

tiny_from_config({model!r}, config, seed=11)
sys.exit(main(["profile", "--model", {model!r}, "--dataset", {data!r}, "--device", "cpu", "--out", {out!r},
               "--site", "blocks.1.mlp.hook_post", "model.layers.1.self_attn.o_proj:input",
               "--top-k", "3", "--max-length", "12", "--batch-tokens", "48"]))
"""


def test_a_fresh_family_outside_the_table_profiles_in_a_subprocess(tmp_path):
    """A new process builds a tiny Starcoder2, then `patchscope profile` runs it by discovery and by a raw site."""
    from patchscope.atlas.store import load_atlas

    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(t for t in FIXTURE_CORPUS if len(t) > 3))
    model_dir, out = tmp_path / "model", tmp_path / "atlas"
    model_dir.mkdir()
    script = CHILD.format(tests=str(TESTS), small=SMALL, model=str(model_dir), data=str(data), out=str(out))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    atlas = load_atlas(out)
    assert list(atlas.sites) == ["blocks.1.mlp.hook_post", "model.layers.1.self_attn.o_proj:input"]
    assert atlas["blocks.1.mlp.hook_post"].top.values.shape == (3, 48)
    assert atlas["model.layers.1.self_attn.o_proj:input"].top.values.shape == (3, 32)
    model, tokenizer = load_model(str(model_dir), dtype="float32", device="cpu")
    seen = {}
    handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    best = None
    try:
        for text in data.read_text().splitlines():
            with torch.no_grad():
                model(torch.tensor([tokenizer(text).input_ids[:12]]))
            top = seen["x"][0, 1:].amax(0)  # BOS left out, as the profiler's default
            best = top if best is None else torch.maximum(best, top)
    finally:
        handle.remove()
    torch.testing.assert_close(atlas["model.layers.1.self_attn.o_proj:input"].top.values[0], best, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "atlas.json").read_text())


def test_patchscope_sites_names_the_discovery_rule_and_the_refusals(discovered, tmp_path, capsys):
    from patchscope.cli.main import main

    model, tokenizer = discovered
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["sites", "--model", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--modules"]) == 0
    out = capsys.readouterr().out
    assert "sites placed by structural discovery: decoder layers at model.layers" in out
    assert re.search(r"^blocks\.1\.mlp\.hook_post +input +of model\.layers\.1\.mlp\.c_proj$", out, re.MULTILINE)
    assert "not available: blocks.1.hook_attn_out: discovery does not place hook_attn_out" in out
    assert "model.layers.1.self_attn.o_proj" in out  # --modules lists the paths for raw sites
