import re
import shutil

import pytest
import torch
from transformers import AutoConfig

from patchscope import load_model
from patchscope.model.loading import ModelLoadError, load_config, load_tokenizer, resolve_dtype


def test_load_from_directory_uses_eager_and_eval(gemma):
    model, tokenizer = gemma
    assert model.config._attn_implementation == "eager"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert tokenizer("x").input_ids[0] == tokenizer.bos_token_id


def test_dtype_choice(gemma_dir):
    model, _ = load_model(str(gemma_dir), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int8", torch.device("cpu"))


def test_offline_hub_id_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import; set it as a user's env would
    with pytest.raises(ModelLoadError, match="local directory"):
        load_model("google/gemma-2-2b-does-not-exist", device="cpu")


def test_gated_model_message(monkeypatch):
    def refuse(*args, **kwargs):  # what transformers raises for a gated repo without a token
        raise OSError("You are trying to access a gated repo. 401 Client Error. Access to model google/gemma-2-2b is restricted.")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # a user's shell may set them (offline runs do)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("patchscope.model.loading.AutoConfig.from_pretrained", refuse)
    monkeypatch.setattr("patchscope.model.loading.hub_reachable", lambda endpoint: True)
    with pytest.raises(ModelLoadError, match="gated.*`hf auth login`.*local directory.*embedded gemma-3-270m runs offline"):
        load_model("google/gemma-2-2b", device="cpu")


def test_a_typo_suggests_the_nearest_presets_and_the_offline_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="did you mean 'gemma-3-270m'") as caught:
        load_config("gemma-3-270")
    assert "patchscope run --model gemma-3-270m --dataset python-docs" in str(caught.value)
    with pytest.raises(ModelLoadError) as exact:  # a preset's own hub id gets no suggestion
        load_config("google/gemma-2-2b")
    assert "did you mean" not in str(exact.value) and "embedded gemma-3-270m runs offline" in str(exact.value)


@pytest.mark.parametrize("name", ["./no-such-model", "no/such/model", "/tmp/definitely-not-here-patchscope", "~/no-such-model"])
def test_a_mistyped_local_path_says_no_such_directory(name, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the hub must not be asked about a local path")

    monkeypatch.setattr("patchscope.model.loading.AutoConfig.from_pretrained", never)
    for load in (load_config, load_tokenizer, lambda n: load_model(n, device="cpu")):
        with pytest.raises(ModelLoadError, match=f"no such directory: {re.escape(repr(name))}"):
            load(name)


def _no_hub(monkeypatch):
    """An unreachable hub: nothing listens on the discard port of this machine."""
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")


def test_unreachable_hub_or_offline_fails_at_once_with_a_clear_message(monkeypatch, tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("no download may be tried: it would retry for 30 s")

    monkeypatch.setattr("patchscope.model.loading.AutoConfig.from_pretrained", never)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    _no_hub(monkeypatch)
    with pytest.raises(
        ModelLoadError, match=r"the hub \(http://127.0.0.1:9\) cannot be reached and the model is not in the local cache"
    ):
        load_model("org/not-cached", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and the model is not in the local cache"):
        load_config("org/not-cached")


def test_a_cached_model_loads_from_the_cache_when_the_hub_is_unreachable(gemma_dir, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny-gemma2"
    shutil.copytree(gemma_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    _no_hub(monkeypatch)
    calls = []
    original = AutoConfig.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return original(cls, *args, **{**kwargs, "cache_dir": str(tmp_path)})

    monkeypatch.setattr("patchscope.model.loading.AutoConfig.from_pretrained", classmethod(spy))
    assert load_config("org/tiny-gemma2").num_hidden_layers == 4
    assert calls == [True]
