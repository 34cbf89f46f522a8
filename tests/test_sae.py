import io
import json
import re
import warnings
import zipfile

import numpy as np
import pytest
import torch
from sae_files import D_MODEL, numpy_jumprelu, sae_params, write_hub_cache, write_npz, write_saelens
from safetensors.numpy import save_file

from patchscope import capture
from patchscope.sae.jumprelu import JumpReLUSAE, SAEError, SAESiteWarning, check_site, sae_layer_for_site, top_features
from patchscope.sae.loaders import load_sae


def _inputs(n=5, seed=1):
    return np.random.default_rng(seed).standard_normal((n, D_MODEL)).astype(np.float32)


def _check_against_numpy(sae: JumpReLUSAE, params):
    x = _inputs()
    acts, recon = numpy_jumprelu(params, x)
    ours = sae.encode(torch.from_numpy(x))
    np.testing.assert_allclose(ours.numpy(), acts, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours.numpy() > 0, acts > 0)
    np.testing.assert_allclose(sae(torch.from_numpy(x)).numpy(), recon, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["upper", "lower", "mixed"])
def test_gemma_scope_npz(tmp_path, case):
    params = sae_params()
    sae = load_sae(write_npz(tmp_path / "layer_1/width_16k/average_l0_22/params.npz", params, case))
    _check_against_numpy(sae, params)
    assert sae.info.layer == 1 and sae.info.l0 == 22 and sae.info.site == "blocks.1.hook_resid_post"


def test_safetensors_and_saelens(tmp_path):
    params = sae_params(seed=3)
    save_file(params, str(tmp_path / "sae.safetensors"))
    _check_against_numpy(load_sae(tmp_path / "sae.safetensors"), params)
    sae = load_sae(write_saelens(tmp_path / "lens", params, "blocks.2.hook_resid_post"))
    _check_against_numpy(sae, params)
    assert sae.info.site == "blocks.2.hook_resid_post" and sae.info.model == "tiny-gemma2"


def test_hub_location_through_hf_hub_download(tmp_path, monkeypatch):
    params = sae_params(seed=4)
    write_hub_cache(tmp_path, "google/gemma-scope-2b-pt-res", "layer_11/width_16k/average_l0_80", params)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    for spec in (
        "google/gemma-scope-2b-pt-res/layer_11/width_16k/average_l0_80",
        "google/gemma-scope-2b-pt-res/layer_11/width_16k/canonical",
    ):
        sae = load_sae(spec, offline=True)
        _check_against_numpy(sae, params)
        assert sae.info.site == "blocks.11.hook_resid_post" and sae.info.l0 == 80
        assert sae.feature_url(7) == "https://www.neuronpedia.org/gemma-2-2b/11-gemmascope-res-16k/7"
    with pytest.raises(SAEError, match="could not fetch"):
        load_sae("google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_59", offline=True)


def test_threshold_is_strict(tmp_path):
    params = sae_params()
    params["W_enc"][:, :2] = 0.0
    params["W_enc"][0, :2] = 1.0  # pre[0] = pre[1] = x[0] exactly
    params["b_enc"][:2] = 0.0
    params["threshold"][0] = 0.5
    params["threshold"][1] = np.nextafter(np.float32(0.5), np.float32(0))
    sae = load_sae(write_npz(tmp_path / "p.npz", params))
    x = torch.zeros(D_MODEL)
    x[0] = 0.5
    acts = sae.encode(x)
    assert acts[0].item() == 0.0 and acts[1].item() == 0.5


def test_dtype_handling(tmp_path):
    params = sae_params()
    sae = load_sae(write_npz(tmp_path / "p.npz", params))
    x = torch.from_numpy(_inputs()).to(torch.bfloat16)
    assert sae.encode(x).dtype == torch.float32
    assert sae(x, keep_dtype=True).dtype == torch.bfloat16
    assert sae.encode(x.reshape(1, 5, D_MODEL)).shape == (1, 5, 96)  # any leading shape


def test_bad_files(tmp_path):
    params = sae_params()
    no_threshold = {k: v for k, v in params.items() if k != "threshold"}
    with pytest.raises(SAEError, match="missing threshold"):
        load_sae(write_npz(tmp_path / "a.npz", no_threshold))
    wrong = dict(params, b_dec=np.zeros(D_MODEL + 1, np.float32))
    with pytest.raises(SAEError, match="b_dec has shape"):
        load_sae(write_npz(tmp_path / "b.npz", wrong))
    with pytest.raises(SAEError, match="width mismatch.*d_model=64.*128"):
        load_sae(write_npz(tmp_path / "c.npz", params), d_model=128)
    with pytest.raises(SAEError, match="'standard'.*jumprelu"):
        load_sae(write_saelens(tmp_path / "std", params, "blocks.0.hook_resid_post", architecture="standard"))
    good = write_npz(tmp_path / "d.npz", params)
    truncated = tmp_path / "e.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SAEError, match="truncated or corrupt"):
        load_sae(truncated)
    pickled = tmp_path / "f.npz"
    np.savez(pickled, W_enc=np.array([{"evil": 1}], dtype=object), **{k: v for k, v in params.items() if k != "W_enc"})
    with pytest.raises(SAEError, match="pickled"):
        load_sae(pickled)
    bad_st = tmp_path / "g.safetensors"
    bad_st.write_bytes(b"\xff" * 40)
    with pytest.raises(SAEError, match="corrupt safetensors"):
        load_sae(bad_st)
    lens = write_saelens(tmp_path / "lens", params, "blocks.0.hook_resid_post")
    cfg = json.loads((lens / "cfg.json").read_text())
    (lens / "cfg.json").write_text(json.dumps(dict(cfg, d_sae=7)))
    with pytest.raises(SAEError, match="d_sae=7"):
        load_sae(lens)


def test_matching_sae_for_a_site():
    from patchscope.sae.loaders import sae_spec_for_site

    assert (
        sae_spec_for_site("google/gemma-2-2b", "blocks.12.hook_resid_pre")
        == "google/gemma-scope-2b-pt-res/layer_11/width_16k/canonical"
    )
    assert sae_spec_for_site("gemma-2-2b", "blocks.12.hook_resid_post", l0=82).endswith("layer_12/width_16k/average_l0_82")
    with pytest.raises(SAEError, match="no Gemma Scope SAEs"):
        sae_spec_for_site("meta-llama/Llama-3.2-1B", "blocks.3.hook_resid_pre")


def test_site_rule(tmp_path):
    sae = load_sae(write_npz(tmp_path / "layer_1/width_16k/average_l0_22/params.npz", sae_params()))
    assert sae_layer_for_site("blocks.12.hook_resid_pre") == 11
    assert sae_layer_for_site("blocks.12.hook_resid_post") == 12
    with pytest.raises(SAEError):
        sae_layer_for_site("blocks.0.hook_resid_pre")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_site(sae, "blocks.2.hook_resid_pre")  # the layer-1 SAE reads resid_pre of layer 2
        check_site(sae, "blocks.1.hook_resid_post")
    with pytest.raises(SAEError, match="trained on blocks.1.hook_resid_post.*blocks.1.hook_resid_pre"):
        check_site(sae, "blocks.1.hook_resid_pre")  # the off-by-one the original made
    with pytest.warns(SAESiteWarning):
        check_site(sae, "blocks.1.hook_resid_pre", allow_site_mismatch=True)


def test_top_features_read_out(tmp_path):
    params = sae_params()
    sae = load_sae(write_npz(tmp_path / "p.npz", params))
    x = _inputs(1)[0]
    acts, recon = numpy_jumprelu(params, x)
    readout = top_features(sae, torch.from_numpy(x), k=4, position=0)
    expected = np.argsort(-acts)[:4]
    assert [f.index for f in readout.features] == expected.tolist()
    assert readout.l0 == int((acts > 0).sum())
    assert readout.relative_error == pytest.approx(np.linalg.norm(x - recon) / np.linalg.norm(x), rel=1e-4)
    assert readout.cosine == pytest.approx(x @ recon / np.linalg.norm(x) / np.linalg.norm(recon), rel=1e-4)
    assert readout.warnings and "BOS" in readout.warnings[0]


def test_neuron_attribution_against_finite_differences_and_ablation(gemma, tmp_path):
    from patchscope.sae.attribution import attribute_neuron, neuron_function

    model, tokenizer = gemma
    params = sae_params(seed=5, decoder_scale=0.2)
    params["threshold"][:] = 0.01  # many active features
    sae = load_sae(write_npz(tmp_path / "layer_1/width_16k/average_l0_50/params.npz", params))
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    site, position = "blocks.2.hook_resid_pre", 5
    with capture(model, site) as cache:
        model(ids)
    x = cache[site][0, position]
    acts = sae.encode(x)
    neuron = 0
    f = neuron_function(model, ids, site, position, "blocks.2.mlp.hook_post", neuron)
    result = attribute_neuron(model, sae, ids, position, x, site=site, neuron=neuron)
    assert result.value == pytest.approx(float(f(x)), abs=1e-6)
    assert len(result.features) == int((acts > 0).sum()) > 10
    total = sum(c.contribution for c in result.features) + result.bias_contribution + result.error_contribution
    assert total == pytest.approx(float(result.gradient @ x), rel=1e-4, abs=1e-5)
    contributions = [abs(c.contribution) for c in result.features]
    assert contributions == sorted(contributions, reverse=True)
    eps = 1e-2
    ablations, estimates = [], []
    for feature in result.features:
        direction = acts[feature.index] * sae.W_dec[feature.index]  # the feature's share of x
        if len(estimates) < 8:
            central = (float(f(x + eps * direction)) - float(f(x - eps * direction))) / (2 * eps)
            assert central == pytest.approx(feature.contribution, rel=2e-2, abs=1e-4)
        ablations.append(float(f(x - direction)) - result.value)  # remove the feature, re-run the layer
        estimates.append(-feature.contribution)
    # the first-order estimate is not the ablation, but it must rank and sign the big ones alike
    assert np.corrcoef(ablations, estimates)[0, 1] > 0.95
    assert all(np.sign(a) == np.sign(e) for a, e in zip(ablations[:5], estimates[:5]))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["W_enc"].__setitem__((0, 0), np.nan), "W_enc holds 1 NaN/inf"),
        (lambda p: p["W_dec"].__setitem__((3, 1), np.inf), "W_dec holds 1 NaN/inf"),
        (lambda p: p["threshold"].__setitem__(5, np.nan), "threshold holds 1 NaN/inf"),
        (lambda p: p["threshold"].__setitem__(5, -0.5), "threshold has 1 negative"),
        (lambda p: p.__setitem__("b_enc", np.arange(p["b_enc"].size, dtype=np.int32)), "b_enc has dtype torch.int32"),
        (lambda p: p.__setitem__("W_dec", p["W_dec"].astype(np.complex64)), "W_dec has dtype torch.complex64"),
        (lambda p: p.__setitem__("W_ENC", p["W_enc"].copy()), "holds both 'W_ENC' and 'W_enc'"),
    ],
)
def test_bad_values_are_refused(tmp_path, change, message):
    params = sae_params()
    change(params)
    with pytest.raises(SAEError, match=re.escape(message)):
        load_sae(write_npz(tmp_path / "p.npz", params))
    if params["W_dec"].dtype != np.complex64:  # safetensors has no complex dtype
        save_file(params, str(tmp_path / "p.safetensors"))
        with pytest.raises(SAEError, match=re.escape(message)):
            load_sae(tmp_path / "p.safetensors")


def test_the_site_error_names_the_keyword_that_exists(tmp_path):
    sae = load_sae(write_npz(tmp_path / "layer_1/width_16k/average_l0_22/params.npz", sae_params()))
    with pytest.raises(SAEError) as error:
        check_site(sae, "blocks.1.hook_resid_pre")
    assert "`allow_site_mismatch`" in str(error.value)
    with pytest.warns(SAESiteWarning):
        check_site(sae, "blocks.1.hook_resid_pre", allow_site_mismatch=True)


def _npz_declaring(path, shapes):
    """An npz whose .npy headers declare ``shapes`` but hold only a few bytes of data."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, shape in shapes.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
            archive.writestr(f"{name}.npy", header.getvalue() + b"\0" * 64)
    return path


def test_declared_shapes_are_checked_before_allocating(tmp_path):
    huge = {
        "W_enc": (100_000, 10_000_000),
        "b_enc": (10_000_000,),
        "threshold": (10_000_000,),
        "W_dec": (10_000_000, 100_000),
        "b_dec": (100_000,),
    }
    path = _npz_declaring(tmp_path / "huge.npz", huge)
    with pytest.raises(SAEError, match="width mismatch.*d_model=100000.*64"):
        load_sae(path, d_model=D_MODEL)
    with pytest.raises(SAEError, match=r"declares shape \(100000, 10000000\).*truncated or corrupt"):
        load_sae(path)
    params = sae_params()
    save_file(params, str(tmp_path / "s.safetensors"))
    with pytest.raises(SAEError, match="width mismatch"):
        load_sae(tmp_path / "s.safetensors", d_model=D_MODEL + 1)


def test_npy_named_npz_and_bad_saelens_configs(tmp_path):
    np.save(tmp_path / "p.npy", np.zeros(3, np.float32))
    (tmp_path / "p.npy").rename(tmp_path / "p.npz")
    with pytest.raises(SAEError, match="single .npy array, not an .npz"):
        load_sae(tmp_path / "p.npz")
    lens = write_saelens(tmp_path / "lens", sae_params(), "blocks.0.hook_resid_post")
    cfg = json.loads((lens / "cfg.json").read_text())
    (lens / "cfg.json").write_text(json.dumps([cfg]))
    with pytest.raises(SAEError, match="cfg.json holds a JSON list, not an object"):
        load_sae(lens)
    (lens / "cfg.json").write_text(json.dumps(dict(cfg, d_sae="lots")))
    with pytest.raises(SAEError, match="d_sae must be a whole number, got 'lots'"):
        load_sae(lens)
    (lens / "cfg.json").write_text(json.dumps(dict(cfg, metadata=["x"])))
    assert load_sae(lens).info.site is None


def test_unreachable_hub_reads_the_cache_without_retrying(tmp_path, monkeypatch):
    params = sae_params(seed=4)
    write_hub_cache(tmp_path, "google/gemma-scope-2b-pt-res", "layer_11/width_16k/average_l0_80", params)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there

    def no_listing(*args, **kwargs):
        raise AssertionError("an unreachable hub must not be asked (each request retries for seconds)")

    monkeypatch.setattr("huggingface_hub.list_repo_files", no_listing)
    sae = load_sae("google/gemma-scope-2b-pt-res/layer_11/width_16k/canonical")  # offline not asked for
    _check_against_numpy(sae, params)
    with pytest.raises(SAEError, match="the hub cannot be reached and it is not in the local cache"):
        load_sae("google/gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_59")
