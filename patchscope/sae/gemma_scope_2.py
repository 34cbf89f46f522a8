"""Gemma Scope 2: JumpReLU SAEs and transcoders for Gemma 3, in their published layout.

Sources (facts, checked against the files themselves; no code taken):
- SAELens ``tests/loading/test_pretrained_sae_loaders.py`` (Gemma Scope 2 support, SAELens PR #595):
  the folder names ``resid_post_all/layer_10_width_262k_l0_small``, ``transcoder_all/layer_5_width_16k_l0_big_affine``,
  ``attn_out_all/layer_11_width_16k_l0_small``, ``mlp_out/layer_17_width_16k_l0_big``, ``clt/layer_3_width_16k_l0_medium``;
  ``config.json`` with ``architecture: "jump_relu"``, ``model_name``, ``hf_hook_point_in`` / ``hf_hook_point_out``;
  ``params.safetensors`` with lower-case ``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``,
  ``threshold`` (and ``affine_skip_connection`` for affine transcoders).
- The hook points those configs declare: ``model.layers.L.output`` (resid_post),
  ``model.layers.L.post_feedforward_layernorm.output`` (mlp_out), ``model.layers.L.self_attn.o_proj.input``
  (attn_out), and ``pre_feedforward_layernorm.output`` -> ``post_feedforward_layernorm.output`` (transcoders).
- Neuronpedia: the ``l0_medium`` residual SAEs are the sources ``{model}/{L}-gemmascope-2-res-{width}``
  (its feature records carry ``hfFolderId: "resid_post/layer_L_width_16k_l0_medium"``).

Layout of one SAE::

    google/gemma-scope-2-270m-pt/
      resid_post/layer_{L}_width_{W}_l0_{small|medium|big}[_affine][_seed_1]/
        config.json
        params.safetensors
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from patchscope.sae.jumprelu import JumpReLUSAE, SAEError, SAEInfo

KINDS = (
    "resid_post",
    "resid_post_all",
    "mlp_out",
    "mlp_out_all",
    "attn_out",
    "attn_out_all",
    "transcoder",
    "transcoder_all",
    "clt",
)
"""The folders of a Gemma Scope 2 repo."""

FOLDER = re.compile(
    r"(?:^|/)(?P<kind>" + "|".join(sorted(KINDS, key=len, reverse=True)) + r")/layer_(?P<layer>\d+)_width_(?P<width>\d+[km])"
    r"_l0_(?P<l0>small|medium|big)(?P<affine>_affine)?(?P<seed>_seed_1)?/?$"
)
PARAMS, CONFIG = "params.safetensors", "config.json"
ARCHITECTURE = "jump_relu"

REPOS = {"google/gemma-3-270m": "google/gemma-scope-2-270m-pt", "google/gemma-3-270m-it": "google/gemma-scope-2-270m-it"}
"""Gemma Scope 2 repo of each Gemma 3 model we have a preset for (the other sizes follow the same scheme)."""
NEURONPEDIA_MODELS = {"google/gemma-scope-2-270m-pt": "gemma-3-270m"}

# What google/gemma-scope-2-270m-pt publishes at the residual stream, as the issue quotes SAELens'
# pretrained_saes.yaml; the stored copy of that file searched here predates Gemma Scope 2, so these lists
# are not re-checked (docs/gemma-scope-2.md says so).
RESID_POST_LAYERS_270M = (5, 9, 12, 15)
"""``resid_post``: these layers, widths 16k / 65k / 262k / 1m, L0 small / medium / big."""
RESID_POST_ALL_LAYERS_270M = range(18)
"""``resid_post_all``: every layer, widths 16k and 262k, L0 small and big."""
DEFAULT_WIDTH = "16k"
DEFAULT_L0 = {"resid_post": "medium", "resid_post_all": "small"}
"""``medium`` where it exists: those are the SAEs with Neuronpedia pages. ``resid_post_all`` has no
``medium``; ``small`` is the sparser of its two, so a read-out names fewer features."""

_HOOK_POINT = re.compile(r"^(?:model\.)?(?:language_model\.)?layers\.(?P<layer>\d+)(?P<rest>(?:\.[a-z_]+)*)$")


@dataclass(frozen=True)
class HookPoint:
    """What a Gemma Scope 2 ``hf_hook_point_*`` is in TransformerLens names, and whether patchscope can read it."""

    site: str
    """TransformerLens name, e.g. ``blocks.5.hook_resid_post`` or ``blocks.5.attn.hook_z`` (flattened)."""
    readable: bool
    """Whether the site is one of patchscope's own (`patchscope.model.sites.SITE_SUFFIXES`)."""
    note: str = ""
    """Why it is not, when it is not."""


def hook_point_site(point: str) -> HookPoint:
    """``model.layers.5.output`` -> ``blocks.5.hook_resid_post``; the other published points likewise."""
    match = _HOOK_POINT.fullmatch(point.strip())
    if match is None:
        raise SAEError(f"unknown Gemma Scope 2 hook point {point!r}; expected model.layers.<L>.<module>.<input|output>")
    layer, rest = int(match["layer"]), match["rest"]
    if rest == ".output":
        return HookPoint(f"blocks.{layer}.hook_resid_post", True)
    if rest == ".post_feedforward_layernorm.output":
        return HookPoint(f"blocks.{layer}.hook_mlp_out", True)
    if rest == ".post_attention_layernorm.output":
        return HookPoint(f"blocks.{layer}.hook_attn_out", True)
    if rest == ".pre_feedforward_layernorm.input":
        return HookPoint(f"blocks.{layer}.hook_resid_mid", True)
    if rest == ".self_attn.o_proj.input":
        return HookPoint(
            f"blocks.{layer}.attn.hook_z",
            False,
            f"it reads {point}, the concatenated head outputs (TransformerLens' blocks.{layer}.attn.hook_z, flattened "
            f"to [pos, n_heads * d_head]), before o_proj and post_attention_layernorm; that is not blocks.{layer}.hook_attn_out",
        )
    if rest == ".pre_feedforward_layernorm.output":
        return HookPoint(
            f"blocks.{layer}.ln2.hook_normalized",
            False,
            f"it reads {point}, the normalised MLP input (TransformerLens' blocks.{layer}.ln2.hook_normalized)",
        )
    raise SAEError(f"Gemma Scope 2 hook point {point!r} has no TransformerLens name in patchscope")


class JumpReLUTranscoder(JumpReLUSAE):
    """A Gemma Scope 2 transcoder: encodes its input site, predicts its output site.

    ``predict(x) = decode(encode(x)) + x @ W_skip`` with ``W_skip [d_in, d_out]`` the affine skip
    connection (``affine_skip_connection`` in the file; zero for a transcoder without one).
    """

    W_skip: Tensor

    def __init__(self, *args, W_skip: Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        skip = W_skip if W_skip is not None else torch.zeros(self.d_model, self.W_dec.shape[1])
        self.register_buffer("W_skip", skip.float())  # [d_in, d_out]

    def predict(self, x: Tensor) -> Tensor:
        """``[..., d_in]`` (the input site) -> the output site ``[..., d_out]``, float32."""
        x32 = x.to(self.W_enc.device, torch.float32)
        return self.decode(self.encode(x32)) + x32 @ self.W_skip


def read_config(directory: Path) -> dict:
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SAEError(f"{directory}/{CONFIG} is missing or not JSON ({error}); download the folder again") from error
    if not isinstance(config, dict):
        raise SAEError(f"{directory}/{CONFIG} holds a JSON {type(config).__name__}, not an object")
    architecture = config.get("architecture")
    if architecture != ARCHITECTURE:
        raise SAEError(
            f"{directory}: architecture is {architecture!r}; patchscope loads only {ARCHITECTURE!r} Gemma Scope 2 SAEs"
        )
    if not isinstance(config.get("hf_hook_point_in"), str):
        raise SAEError(f"{directory}/{CONFIG} names no hf_hook_point_in; patchscope cannot tell which site the SAE reads")
    return config


def info_for(directory: Path, config: dict, *, repo: str | None = None, source: str | None = None) -> SAEInfo:
    """Site from ``hf_hook_point_in``; layer, width and L0 from the folder name where it follows the scheme."""
    point_in = hook_point_site(config["hf_hook_point_in"])
    point_out = hook_point_site(config["hf_hook_point_out"]) if isinstance(config.get("hf_hook_point_out"), str) else None
    match = FOLDER.search(directory.as_posix())
    kind = match["kind"] if match else None
    model = NEURONPEDIA_MODELS.get(repo or "")
    neuronpedia = None
    if model and match and kind == "resid_post" and match["l0"] == "medium" and not match["affine"] and not match["seed"]:
        neuronpedia = f"{model}/{match['layer']}-gemmascope-2-res-{match['width']}"
    return SAEInfo(
        site=point_in.site,
        model=config.get("model_name"),
        layer=int(match["layer"]) if match else None,
        width=match["width"] if match else None,
        l0=float(config["l0"]) if isinstance(config.get("l0"), (int, float)) else None,
        source=source or str(directory),
        neuronpedia=neuronpedia,
        hook_point=config["hf_hook_point_in"],
        site_out=point_out.site if point_out and point_out.site != point_in.site else None,
        unreadable=point_in.note,
    )


def spec_for_layer(repo: str, sae_layer: int, width: str = DEFAULT_WIDTH) -> str:
    """``REPO_ID/PATH`` of the residual SAE reading ``blocks.{sae_layer}.hook_resid_post``.

    From ``resid_post`` where that layer is published (with its Neuronpedia pages), else from ``resid_post_all``.
    """
    if sae_layer not in RESID_POST_ALL_LAYERS_270M:
        raise SAEError(
            f"{repo} has residual SAEs for layers 0..{RESID_POST_ALL_LAYERS_270M[-1]} (resid_post_all); "
            f"layer {sae_layer} has none"
        )
    kind = "resid_post" if sae_layer in RESID_POST_LAYERS_270M else "resid_post_all"
    return f"{repo}/{kind}/layer_{sae_layer}_width_{width}_l0_{DEFAULT_L0[kind]}"


def is_folder_path(path: str) -> bool:
    """Whether a hub path names a Gemma Scope 2 folder (or a file in one)."""
    return FOLDER.search(path.strip("/").removesuffix(f"/{PARAMS}").removesuffix(f"/{CONFIG}")) is not None
