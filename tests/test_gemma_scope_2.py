"""Gemma Scope 2 (patchscope/sae/gemma_scope_2.py and its loader): files in the published layout, no network."""

import json

import numpy as np
import pytest
import torch
from sae_files import D_MODEL, numpy_jumprelu, sae_params, write_gemma_scope_2, write_hub_snapshot

from patchscope.sae.gemma_scope_2 import JumpReLUTranscoder, hook_point_site
from patchscope.sae.jumprelu import SAEError, check_site
from patchscope.sae.loaders import load_sae, sae_spec_for_site

REPO = "google/gemma-scope-2-270m-pt"


def _x(n=6, seed=2):
    return np.random.default_rng(seed).standard_normal((n, D_MODEL)).astype(np.float32)


def test_resid_post_folder_equals_numpy_jumprelu(tmp_path):
    params = sae_params(seed=7)
    folder = write_gemma_scope_2(tmp_path / "resid_post/layer_5_width_16k_l0_medium", params, "model.layers.5.output")
    x = _x()
    acts, recon = numpy_jumprelu(params, x)
    for spec in (folder, folder / "params.safetensors"):
        sae = load_sae(spec)
        np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), acts, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(sae.encode(torch.from_numpy(x)).numpy() > 0, acts > 0)
        np.testing.assert_allclose(sae(torch.from_numpy(x)).numpy(), recon, rtol=1e-4, atol=1e-5)
        assert sae.info.site == "blocks.5.hook_resid_post" and sae.info.hook_point == "model.layers.5.output"
        assert (sae.info.layer, sae.info.width, sae.info.l0) == (5, "16k", 20.0)
    check_site(sae, "blocks.6.hook_resid_pre")  # the site rule, as for Gemma Scope 1
    with pytest.raises(SAEError, match="trained on blocks.5.hook_resid_post"):
        check_site(sae, "blocks.5.hook_resid_pre")


def test_mlp_out_site_comes_from_the_hook_point(tmp_path):
    folder = write_gemma_scope_2(
        tmp_path / "mlp_out_all/layer_3_width_16k_l0_small", sae_params(), "model.layers.3.post_feedforward_layernorm.output"
    )
    sae = load_sae(folder)
    assert sae.info.site == "blocks.3.hook_mlp_out" and sae.info.site_out is None
    check_site(sae, "blocks.3.hook_mlp_out")
    with pytest.raises(SAEError, match="trained on blocks.3.hook_mlp_out"):
        check_site(sae, "blocks.4.hook_resid_pre")


def test_attn_out_reads_o_proj_input_and_is_refused_at_every_site(tmp_path):
    folder = write_gemma_scope_2(
        tmp_path / "attn_out/layer_2_width_16k_l0_big", sae_params(), "model.layers.2.self_attn.o_proj.input"
    )
    sae = load_sae(folder)
    assert sae.info.site == "blocks.2.attn.hook_z"
    for site in ("blocks.2.hook_attn_out", "blocks.3.hook_resid_pre"):
        with pytest.raises(SAEError, match=r"o_proj.input.*hook_z.*not blocks.2.hook_attn_out"):
            check_site(sae, site, allow_site_mismatch=True)


def test_transcoder_with_affine_skip(tmp_path):
    params = sae_params(seed=9)
    skip = (np.random.default_rng(3).standard_normal((D_MODEL, D_MODEL)) * 0.1).astype(np.float32)
    folder = write_gemma_scope_2(
        tmp_path / "transcoder/layer_4_width_16k_l0_medium_affine",
        params,
        "model.layers.4.pre_feedforward_layernorm.output",
        "model.layers.4.post_feedforward_layernorm.output",
        skip=skip,
    )
    sae = load_sae(folder)
    assert isinstance(sae, JumpReLUTranscoder)
    assert sae.info.site == "blocks.4.ln2.hook_normalized" and sae.info.site_out == "blocks.4.hook_mlp_out"
    x = _x()
    acts, recon = numpy_jumprelu(params, x)
    np.testing.assert_allclose(
        sae.predict(torch.from_numpy(x)).numpy(), recon + x.astype(np.float64) @ skip, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), acts, rtol=1e-5, atol=1e-5)
    with pytest.raises(SAEError, match="ln2.hook_normalized"):
        check_site(sae, "blocks.4.hook_resid_mid")
    bad = write_gemma_scope_2(tmp_path / "transcoder/layer_4_width_16k_l0_big_affine", params,
                              "model.layers.4.pre_feedforward_layernorm.output",
                              "model.layers.4.post_feedforward_layernorm.output", skip=skip[:, :3])  # fmt: skip
    with pytest.raises(SAEError, match=r"affine_skip_connection has shape \(64, 3\)"):
        load_sae(bad)


def test_only_jump_relu_is_loaded_and_the_config_must_name_its_site(tmp_path):
    folder = write_gemma_scope_2(tmp_path / "resid_post/layer_5_width_16k_l0_small", sae_params(), "model.layers.5.output",
                                 architecture="topk")  # fmt: skip
    with pytest.raises(SAEError, match="architecture is 'topk'.*'jump_relu'"):
        load_sae(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architecture="jump_relu", hf_hook_point_in=None)))
    with pytest.raises(SAEError, match="no hf_hook_point_in"):
        load_sae(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, architecture="jump_relu", hf_hook_point_in="embed")))
    with pytest.raises(SAEError, match="unknown Gemma Scope 2 hook point 'embed'"):
        load_sae(folder)


def test_hook_points():
    assert hook_point_site("model.layers.11.output").site == "blocks.11.hook_resid_post"
    assert hook_point_site("model.language_model.layers.0.output").site == "blocks.0.hook_resid_post"
    assert hook_point_site("model.layers.2.post_feedforward_layernorm.output").site == "blocks.2.hook_mlp_out"
    assert not hook_point_site("model.layers.2.self_attn.o_proj.input").readable


@pytest.mark.parametrize("layer", range(1, 18))
def test_preset_resolves_every_layer_of_gemma_3_270m(layer):
    spec = sae_spec_for_site("gemma-3-270m", f"blocks.{layer}.hook_resid_pre")
    kind, folder = ("resid_post", "l0_medium") if layer - 1 in (5, 9, 12, 15) else ("resid_post_all", "l0_small")
    assert spec == f"{REPO}/{kind}/layer_{layer - 1}_width_16k_{folder}"
    assert sae_spec_for_site("google/gemma-3-270m", f"blocks.{layer - 1}.hook_resid_post") == spec
    with pytest.raises(SAEError, match="hook_resid_post"):
        sae_spec_for_site("gemma-3-270m", "blocks.0.hook_resid_pre")


def test_hub_spec_reads_both_files_through_hf_hub_download(tmp_path, monkeypatch):
    params = sae_params(seed=11)
    snapshot = write_hub_snapshot(tmp_path, REPO)
    write_gemma_scope_2(snapshot / "resid_post/layer_9_width_16k_l0_medium", params, "model.layers.9.output")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    sae = load_sae(f"{REPO}/resid_post/layer_9_width_16k_l0_medium", offline=True)
    x = _x()
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), numpy_jumprelu(params, x)[0], rtol=1e-5, atol=1e-5)
    assert sae.info.source == f"{REPO}/resid_post/layer_9_width_16k_l0_medium"
    assert sae.feature_url(3) == "https://www.neuronpedia.org/gemma-3-270m/9-gemmascope-2-res-16k/3"
    other = f"{REPO}/resid_post_all/layer_3_width_16k_l0_small"
    with pytest.raises(SAEError, match=f"could not fetch {other}/config.json.*or download"):
        load_sae(other, offline=True)


def test_only_medium_resid_post_has_neuronpedia_pages(tmp_path, monkeypatch):
    snapshot = write_hub_snapshot(tmp_path, REPO)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    for path in ("resid_post_all/layer_9_width_16k_l0_small", "resid_post/layer_9_width_16k_l0_big"):
        write_gemma_scope_2(snapshot / path, sae_params(), "model.layers.9.output")
        assert load_sae(f"{REPO}/{path}", offline=True).feature_url(3) is None
