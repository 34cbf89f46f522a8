import pytest
import torch

from patchscope import load_model
from patchscope.model.loading import ModelLoadError, resolve_dtype


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


def test_unsupported_family_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="gpt2"):
        load_model(str(tmp_path), device="cpu")


def test_gated_model_message(monkeypatch):
    def refuse(*args, **kwargs):  # what transformers raises for a gated repo without a token
        raise OSError("You are trying to access a gated repo. 401 Client Error. Access to model google/gemma-2-2b is restricted.")

    monkeypatch.setattr("patchscope.model.loading.AutoConfig.from_pretrained", refuse)
    with pytest.raises(ModelLoadError, match="gated.*huggingface-cli login.*local directory"):
        load_model("google/gemma-2-2b", device="cpu")
