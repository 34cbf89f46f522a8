"""Loading HF causal LMs the way the experiments need them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from patchscope.model import gguf
from patchscope.model.sites import SUPPORTED_FAMILIES

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelPreset:
    """A model we know: its hub id and the Gemma Scope residual SAEs that go with it."""

    hub_id: str
    """HuggingFace hub id of the model."""
    sae_repo: str | None
    """Hub repo of its Gemma Scope residual-stream SAEs (None: no SAE preset)."""
    neuronpedia_id: str
    """Model id in Neuronpedia feature URLs."""
    gguf: Callable[[], Path] | None = None
    """For a model embedded in a pip package: returns its GGUF file (assembling it if needed)."""


PRESETS: dict[str, ModelPreset] = {
    "gemma-2-2b": ModelPreset("google/gemma-2-2b", "google/gemma-scope-2b-pt-res", "gemma-2-2b"),
    "gemma-2-9b": ModelPreset("google/gemma-2-9b", "google/gemma-scope-9b-pt-res", "gemma-2-9b"),
    "gemma-3-270m": ModelPreset("google/gemma-3-270m", None, "gemma-3-270m", gguf.gemma3_270m),
    "smollm2-135m": ModelPreset("HuggingFaceTB/SmolLM2-135M-Instruct", None, "smollm2-135m", gguf.smollm2_135m),
}
DEFAULT_MODEL = "google/gemma-2-2b"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says how to fix it."""


def preset_for(name_or_path: str) -> ModelPreset | None:
    """The preset for a preset name or its hub id, else None."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    return next((p for p in PRESETS.values() if p.hub_id == name_or_path), None)


def model_source(name_or_path: str) -> str:
    """What transformers loads for a name: the cached float32 folder of an embedded preset or of a
    ``.gguf`` file (converted on first use), the hub id of another preset, else the name itself."""
    preset = PRESETS.get(name_or_path)
    try:
        if preset is not None and preset.gguf is not None:
            return str(gguf.converted(preset.gguf()))
        if name_or_path.lower().endswith(".gguf"):
            return str(gguf.converted(Path(name_or_path)))
    except gguf.GGUFError as error:
        raise ModelLoadError(str(error)) from error
    return preset.hub_id if preset else name_or_path


def resolve_device(device: DeviceName | str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    return torch.device(device)


def resolve_dtype(dtype: DTypeName | str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU: Gemma-2 can overflow in fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _explain(name_or_path: str, error: Exception) -> ModelLoadError:
    text = f"{type(error).__name__}: {error}"
    if os.path.isdir(name_or_path):
        return ModelLoadError(f"could not load the model in directory {name_or_path!r}: {text}")
    gated = any(word in text for word in ("gated", "401", "403", "Unauthorized", "restricted"))
    if gated:
        hint = (
            "this model is gated: accept its licence on huggingface.co, then `huggingface-cli login` "
            "(or set HF_TOKEN), or pass a local directory that holds the weights"
        )
    else:
        hint = (
            "the hub could not be reached or has no such model: check the id, go online, "
            "or pass a local directory saved with save_pretrained"
        )
    return ModelLoadError(f"could not load {name_or_path!r}: {hint}.\n  ({text})")


def load_config(name_or_path: str, *, trust_remote_code: bool = False, token: str | bool | None = None):
    """Just the model's config (small, fast): lets callers check layer and neuron numbers before loading weights."""
    source = model_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, token=token)
    except Exception as error:  # noqa: BLE001
        raise _explain(source, error) from error


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, token: str | bool | None = None) -> PreTrainedTokenizerBase:
    """Just the tokenizer: lets callers check a prompt before the weights load."""
    source = model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, token=token)
    except Exception as error:  # noqa: BLE001
        raise _explain(source, error) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: DTypeName | torch.dtype = "auto",
    device: DeviceName | str = "auto",
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    ``name_or_path`` is a hub id, a preset name (``gemma-2-2b``; ``gemma-3-270m`` and ``smollm2-135m``
    come from pip packages, see `patchscope.model.gguf`), a local directory or a ``.gguf`` file. Gemma-family
    models load with eager attention, the only one that applies Gemma-2's attention soft-cap.
    ``device_map`` (e.g. ``"auto"``) hands placement to accelerate for models larger than one GPU.
    """
    source = model_source(name_or_path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    common = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except Exception as error:  # noqa: BLE001 - every failure gets the same explanation
        raise _explain(source, error) from error
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"{source!r} is a {config.model_type!r} model; patchscope's hook sites support "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}"
        )
    if attn_implementation is None and config.model_type.startswith("gemma"):
        attn_implementation = "eager"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            device_map=device_map,
            **common,
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except Exception as error:  # noqa: BLE001
        raise _explain(source, error) from error
    if device_map is None:
        model.to(torch_device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the input embeddings (where input ids must go, also under a device_map)."""
    return model.get_input_embeddings().weight.device
