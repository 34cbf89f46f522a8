"""Loaders for JumpReLU SAEs: pure functions from files to `JumpReLUSAE`, no pickle anywhere.

Formats, all behind `load_sae(spec)`:
- a Gemma Scope ``params.npz`` (keys ``W_enc`` ... or lower-case ``w_enc`` ...), or a folder holding one;
- a safetensors file with the same tensors;
- a SAELens folder: ``sae_weights.safetensors`` + ``cfg.json`` with ``architecture: jumprelu``;
- a hub location ``REPO_ID/PATH``, e.g. ``google/gemma-scope-2b-pt-res/layer_11/width_16k/average_l0_80``,
  where the last part may be ``canonical`` (the average L0 closest to 100).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from patchscope.sae.jumprelu import JumpReLUSAE, SAEError, SAEInfo, check_for_model, sae_layer_for_site

log = logging.getLogger(__name__)
KEYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")
GEMMA_SCOPE_PATH = re.compile(r"layer_(?P<layer>\d+)/width_(?P<width>\w+?)/(?:average_l0_(?P<l0>\d+)|(?P<canonical>canonical))")
CANONICAL_TARGET_L0 = 100

# Average L0 of the canonical (closest to 100) 16k residual SAE per layer of gemma-2-2b, as listed in
# google/gemma-scope-2b-pt-res (SAELens's "canonical" release names the same files). Used offline.
GEMMA_2_2B_RES_16K_CANONICAL_L0 = {
    0: 105, 1: 102, 2: 141, 3: 59, 4: 124, 5: 68, 6: 70, 7: 69, 8: 71, 9: 73, 10: 77, 11: 80, 12: 82,
    13: 84, 14: 84, 15: 78, 16: 78, 17: 77, 18: 74, 19: 73, 20: 71, 21: 70, 22: 72, 23: 75, 24: 73, 25: 116,
}
OFFLINE_CANONICAL = {("google/gemma-scope-2b-pt-res", "16k"): GEMMA_2_2B_RES_16K_CANONICAL_L0}
NEURONPEDIA_MODELS = {"google/gemma-scope-2b-pt-res": "gemma-2-2b", "google/gemma-scope-9b-pt-res": "gemma-2-9b"}


# -- tensors -> module


def sae_from_tensors(tensors: dict[str, torch.Tensor], info: SAEInfo, *, apply_b_dec_to_input: bool = False) -> JumpReLUSAE:
    """Rename keys (any case), check every shape, and build the module."""
    by_lower = {name.lower(): name for name in tensors}
    missing = [key for key in KEYS if key.lower() not in by_lower]
    if missing:
        raise SAEError(f"{info.source}: missing {', '.join(missing)}; found keys {sorted(tensors)}. Is this a JumpReLU SAE?")
    t = {key: tensors[by_lower[key.lower()]] for key in KEYS}
    if t["W_enc"].dim() != 2:
        raise SAEError(f"{info.source}: W_enc must be 2-D [d_model, d_sae], got shape {tuple(t['W_enc'].shape)}")
    d_model, d_sae = t["W_enc"].shape
    expected = {"b_enc": (d_sae,), "threshold": (d_sae,), "W_dec": (d_sae, d_model), "b_dec": (d_model,)}
    for key, shape in expected.items():
        if tuple(t[key].shape) != shape:
            raise SAEError(
                f"{info.source}: {key} has shape {tuple(t[key].shape)}, expected {shape} from W_enc [{d_model}, {d_sae}]"
            )
    return JumpReLUSAE(**{k: v.to(torch.float32) for k, v in t.items()}, info=info, apply_b_dec_to_input=apply_b_dec_to_input)


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise SAEError(f"{path}: a single .npy array, not an .npz archive of SAE parameters")
            return {name: torch.from_numpy(np.array(archive[name])) for name in archive.files}
    except SAEError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise SAEError(f"{path}: truncated or corrupt npz ({error}); download it again") from error
    except ValueError as error:
        if "pickle" in str(error):
            raise SAEError(f"{path}: contains pickled objects, which patchscope never loads; use a plain npz or safetensors") from error
        raise SAEError(f"{path}: unreadable npz ({error})") from error


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
        raise SAEError(f"{path}: truncated or corrupt safetensors file ({error}); download it again") from error


def info_from_path(path: str, *, repo: str | None = None) -> SAEInfo:
    """Layer, width, L0 and site from a Gemma Scope style path, where it has one."""
    match = GEMMA_SCOPE_PATH.search(path.replace("\\", "/"))
    if match is None:
        return SAEInfo(source=path)
    layer, width = int(match["layer"]), match["width"]
    kind = "res" if repo is None or "-res" in repo else ("mlp" if "-mlp" in repo else None)
    site = {"res": f"blocks.{layer}.hook_resid_post", "mlp": f"blocks.{layer}.hook_mlp_out"}.get(kind or "")
    model = NEURONPEDIA_MODELS.get(repo or "")
    return SAEInfo(
        site=site,
        model=model,
        layer=layer,
        width=width,
        l0=float(match["l0"]) if match["l0"] else None,
        source=path,
        neuronpedia=f"{model}/{layer}-gemmascope-res-{width}" if model and kind == "res" else None,
    )


def load_npz(path: str | Path, info: SAEInfo | None = None) -> JumpReLUSAE:
    path = Path(path)
    return sae_from_tensors(_read_npz(path), info or info_from_path(str(path)))


def load_safetensors_file(path: str | Path, info: SAEInfo | None = None) -> JumpReLUSAE:
    path = Path(path)
    return sae_from_tensors(_read_safetensors(path), info or info_from_path(str(path)))


def load_saelens_dir(directory: str | Path) -> JumpReLUSAE:
    directory = Path(directory)
    try:
        cfg = json.loads((directory / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SAEError(f"{directory}/cfg.json is missing or not JSON ({error})") from error
    architecture = cfg.get("architecture", "standard")
    if architecture != "jumprelu":
        raise SAEError(f"{directory}: SAELens architecture is {architecture!r}; patchscope loads only 'jumprelu' SAEs")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SAEError(f"{directory}: normalize_activations={cfg['normalize_activations']!r} is not supported")
    metadata = cfg.get("metadata", {}) or {}
    site = metadata.get("hook_name", cfg.get("hook_name"))
    model = metadata.get("model_name", cfg.get("model_name"))
    base = info_from_path(str(directory))
    info = SAEInfo(site=site or base.site, model=model, layer=base.layer, width=base.width, l0=base.l0, source=str(directory), neuronpedia=metadata.get("neuronpedia_id"))
    sae = sae_from_tensors(_read_safetensors(directory / "sae_weights.safetensors"), info, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)))
    for key, actual in (("d_in", sae.d_model), ("d_sae", sae.d_sae)):
        if key in cfg and int(cfg[key]) != actual:
            raise SAEError(f"{directory}: cfg.json says {key}={cfg[key]} but the weights have {actual}")
    return sae


# -- hub


def canonical_l0(repo_id: str, layer: int, width: str, *, offline: bool = False) -> int:
    """The average-L0 variant closest to 100 for one layer and width, from the repo listing (or a built-in table)."""
    if not offline:
        try:
            from huggingface_hub import list_repo_files

            files = list_repo_files(repo_id)
            prefix = re.compile(rf"^layer_{layer}/width_{re.escape(width)}/average_l0_(\d+)/params\.npz$")
            options = sorted(int(m.group(1)) for f in files if (m := prefix.match(f)))
            if options:
                return min(options, key=lambda l0: (abs(l0 - CANONICAL_TARGET_L0), l0))
        except Exception as error:  # noqa: BLE001 - offline or no access: fall back to the table
            log.info("could not list %s (%s); using the built-in canonical table", repo_id, type(error).__name__)
    table = OFFLINE_CANONICAL.get((repo_id, width), {})
    if layer in table:
        return table[layer]
    raise SAEError(
        f"cannot resolve 'canonical' for {repo_id} layer {layer} width {width} offline; "
        "name the file (average_l0_N) or go online"
    )


def load_from_hub(repo_id: str, path: str, *, offline: bool = False) -> JumpReLUSAE:
    """``google/gemma-scope-2b-pt-res``, ``layer_11/width_16k/average_l0_80`` (or ``.../canonical``)."""
    from huggingface_hub import hf_hub_download

    path = path.strip("/").removesuffix("/params.npz")
    match = GEMMA_SCOPE_PATH.fullmatch(path)
    if match and match["canonical"]:
        l0 = canonical_l0(repo_id, int(match["layer"]), match["width"], offline=offline)
        path = f"layer_{match['layer']}/width_{match['width']}/average_l0_{l0}"
    try:
        local = hf_hub_download(repo_id, f"{path}/params.npz", local_files_only=offline)
    except Exception as error:  # noqa: BLE001 - many hub error types, one explanation
        raise SAEError(
            f"could not fetch {repo_id}/{path}/params.npz ({type(error).__name__}); check the path, go online "
            "(`huggingface-cli login` if needed), or pass a local params.npz"
        ) from error
    return load_npz(local, dataclasses.replace(info_from_path(path, repo=repo_id), source=f"{repo_id}/{path}"))


def load_sae(spec: str | Path, *, device: str | torch.device = "cpu", d_model: int | None = None, offline: bool = False) -> JumpReLUSAE:
    """Load an SAE from a file, a folder or a hub location (see the module docstring).

    ``d_model`` (the model's width) is checked before the SAE is used.
    """
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        if (path / "cfg.json").exists() and (path / "sae_weights.safetensors").exists():
            sae = load_saelens_dir(path)
        elif (path / "params.npz").exists():
            sae = load_npz(path / "params.npz")
        else:
            raise SAEError(f"{path}: neither a SAELens folder (cfg.json + sae_weights.safetensors) nor a Gemma Scope folder (params.npz)")
    elif path.suffix == ".npz":
        if not path.is_file():
            raise SAEError(f"no such SAE file: {path}")
        sae = load_npz(path)
    elif path.suffix == ".safetensors":
        if not path.is_file():
            raise SAEError(f"no such SAE file: {path}")
        sae = load_safetensors_file(path)
    else:
        parts = text.strip("/").split("/")
        if len(parts) < 3:
            raise SAEError(
                f"cannot read SAE spec {text!r}: give a params.npz / .safetensors file, a SAELens folder, or "
                "REPO_ID/PATH such as google/gemma-scope-2b-pt-res/layer_11/width_16k/canonical"
            )
        sae = load_from_hub("/".join(parts[:2]), "/".join(parts[2:]), offline=offline)
    if d_model is not None:
        check_for_model(sae, d_model)
    return sae.to(device)


def gemma_scope_spec(repo_id: str, layer: int, width: str = "16k", l0: str | int = "canonical") -> str:
    """The hub spec of a Gemma Scope residual SAE."""
    tail = "canonical" if l0 == "canonical" else f"average_l0_{l0}"
    return f"{repo_id}/layer_{layer}/width_{width}/{tail}"


def sae_spec_for_site(model: str, site: str, width: str = "16k", l0: str | int = "canonical") -> str:
    """The Gemma Scope residual SAE that reads ``site`` of a preset model, by the site rule.

    ``sae_spec_for_site("google/gemma-2-2b", "blocks.12.hook_resid_pre")`` is the layer-11 SAE.
    """
    from patchscope.model.loading import preset_for

    preset = preset_for(model)
    if preset is None:
        raise SAEError(f"no Gemma Scope SAEs are known for {model!r}; pass an SAE spec explicitly")
    return gemma_scope_spec(preset.sae_repo, sae_layer_for_site(site), width, l0)
