"""Loaders for JumpReLU SAEs: pure functions from files to `JumpReLUSAE`, no pickle anywhere.

Formats, all behind `load_sae(spec)`:
- a Gemma Scope ``params.npz`` (keys ``W_enc`` ... or lower-case ``w_enc`` ...), or a folder holding one;
- a safetensors file with the same tensors;
- a SAELens folder: ``sae_weights.safetensors`` + ``cfg.json`` with ``architecture: jumprelu``;
- a Gemma Scope 2 folder: ``params.safetensors`` + ``config.json`` (`patchscope.sae.gemma_scope_2`), or that
  ``params.safetensors`` itself; the site comes from ``hf_hook_point_in``, transcoders load as
  `JumpReLUTranscoder`;
- a hub location ``REPO_ID/PATH``, e.g. ``google/gemma-scope-2b-pt-res/layer_11/width_16k/average_l0_80``,
  where the last part may be ``canonical`` (the average L0 closest to 100), or
  ``google/gemma-scope-2-270m-pt/resid_post/layer_5_width_16k_l0_medium``.
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

from patchscope.sae import gemma_scope_2
from patchscope.sae.gemma_scope_2 import JumpReLUTranscoder
from patchscope.sae.jumprelu import JumpReLUSAE, SAEError, SAEInfo, check_for_model, sae_layer_for_site

log = logging.getLogger(__name__)
KEYS = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")
GEMMA_SCOPE_PATH = re.compile(r"layer_(?P<layer>\d+)/width_(?P<width>\w+?)/(?:average_l0_(?P<l0>\d+)|(?P<canonical>canonical))")
CANONICAL_TARGET_L0 = 100

# Average L0 of the canonical (closest to 100) 16k residual SAE per layer of gemma-2-2b, as listed in
# google/gemma-scope-2b-pt-res (SAELens's "canonical" release names the same files). Used offline.
GEMMA_2_2B_RES_16K_CANONICAL_L0 = {
    0: 105,
    1: 102,
    2: 141,
    3: 59,
    4: 124,
    5: 68,
    6: 70,
    7: 69,
    8: 71,
    9: 73,
    10: 77,
    11: 80,
    12: 82,
    13: 84,
    14: 84,
    15: 78,
    16: 78,
    17: 77,
    18: 74,
    19: 73,
    20: 71,
    21: 70,
    22: 72,
    23: 75,
    24: 73,
    25: 116,
}
OFFLINE_CANONICAL = {("google/gemma-scope-2b-pt-res", "16k"): GEMMA_2_2B_RES_16K_CANONICAL_L0}
NEURONPEDIA_MODELS = {"google/gemma-scope-2b-pt-res": "gemma-2-2b", "google/gemma-scope-9b-pt-res": "gemma-2-9b"}


# -- tensors -> module


def sae_from_tensors(tensors: dict[str, torch.Tensor], info: SAEInfo, *, apply_b_dec_to_input: bool = False) -> JumpReLUSAE:
    """Rename keys (any case), check every shape, dtype and value, and build the module."""
    names = check_declared({name: tuple(t.shape) for name, t in tensors.items()}, info.source)
    t = {key: tensors[names[key]] for key in KEYS}
    for key, tensor in t.items():
        if not tensor.dtype.is_floating_point:
            raise SAEError(f"{info.source}: {names[key]} has dtype {tensor.dtype}; SAE parameters must be floating point")
    for key, tensor in t.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise SAEError(f"{info.source}: {names[key]} holds {bad} NaN/inf values; the file is corrupt, download it again")
    negative = int((t["threshold"] < 0).sum())
    if negative:
        raise SAEError(f"{info.source}: {names['threshold']} has {negative} negative entries; a JumpReLU threshold is >= 0")
    return JumpReLUSAE(**{k: v.to(torch.float32) for k, v in t.items()}, info=info, apply_b_dec_to_input=apply_b_dec_to_input)


def check_declared(shapes: dict[str, tuple[int, ...]], source: str, d_model: int | None = None) -> dict[str, str]:
    """Check the keys and shapes a file declares, before its tensors are read; returns ``{KEY: name in file}``.

    Keys match in any case, but only once: a file with both ``W_enc`` and ``W_ENC`` is ambiguous.
    """
    by_lower: dict[str, str] = {}
    for name in sorted(shapes):
        if name.lower() in by_lower:
            raise SAEError(f"{source}: holds both {by_lower[name.lower()]!r} and {name!r}; keep one of them")
        by_lower[name.lower()] = name
    missing = [key for key in KEYS if key.lower() not in by_lower]
    if missing:
        raise SAEError(f"{source}: missing {', '.join(missing)}; found keys {sorted(shapes)}. Is this a JumpReLU SAE?")
    names = {key: by_lower[key.lower()] for key in KEYS}
    w_enc = shapes[names["W_enc"]]
    if len(w_enc) != 2:
        raise SAEError(f"{source}: W_enc must be 2-D [d_model, d_sae], got shape {w_enc}")
    if d_model is not None and w_enc[0] != d_model:
        raise SAEError(
            f"{source}: SAE width mismatch: it reads d_model={w_enc[0]} vectors but the model's d_model is {d_model}; "
            "pick an SAE trained on this model"
        )
    d_in, d_sae = w_enc
    expected = {"b_enc": (d_sae,), "threshold": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for key, shape in expected.items():
        if tuple(shapes[names[key]]) != shape:
            raise SAEError(
                f"{source}: {key} has shape {tuple(shapes[names[key]])}, expected {shape} from W_enc [{d_in}, {d_sae}]"
            )
    return names


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """``{name: (shape, declared bytes, stored bytes)}`` from the .npy headers, without reading the data."""
    with path.open("rb") as file:
        magic = file.read(6)
    if magic == b"\x93NUMPY":
        raise SAEError(f"{path}: a single .npy array, not an .npz archive of SAE parameters; save them with numpy.savez")
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            with archive.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(stream)
                if dtype.hasobject:
                    raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
                data_bytes = member.file_size - stream.tell()
            declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            headers[member.filename.removesuffix(".npy")] = (tuple(shape), declared, data_bytes)
    return headers


def _read_npz(path: Path, d_model: int | None = None) -> dict[str, torch.Tensor]:
    try:
        headers = _npz_headers(path)
        check_declared({name: shape for name, (shape, _, _) in headers.items()}, str(path), d_model)
        for name, (shape, declared, stored) in headers.items():
            if declared > stored:
                raise SAEError(
                    f"{path}: {name} declares shape {shape} ({declared / 2**30:.1f} GiB) but holds only {stored} bytes; "
                    "the file is truncated or corrupt, download it again"
                )
        with np.load(path, allow_pickle=False) as archive:
            return {name: torch.from_numpy(np.array(archive[name])) for name in archive.files}
    except SAEError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise SAEError(f"{path}: truncated or corrupt npz ({error}); download it again") from error
    except ValueError as error:
        if "pickle" in str(error):
            raise SAEError(
                f"{path}: contains pickled objects, which patchscope never loads; use a plain npz or safetensors"
            ) from error
        raise SAEError(f"{path}: unreadable npz ({error})") from error


def _read_safetensors(path: Path, d_model: int | None = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as file:
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
        raise SAEError(f"{path}: truncated or corrupt safetensors file ({error}); download it again") from error
    check_declared(shapes, str(path), d_model)
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001
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


def load_npz(path: str | Path, info: SAEInfo | None = None, *, d_model: int | None = None) -> JumpReLUSAE:
    path = Path(path)
    return sae_from_tensors(_read_npz(path, d_model), info or info_from_path(str(path)))


def load_safetensors_file(path: str | Path, info: SAEInfo | None = None, *, d_model: int | None = None) -> JumpReLUSAE:
    path = Path(path)
    return sae_from_tensors(_read_safetensors(path, d_model), info or info_from_path(str(path)))


def load_saelens_dir(directory: str | Path, *, d_model: int | None = None) -> JumpReLUSAE:
    directory = Path(directory)
    try:
        cfg = json.loads((directory / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SAEError(f"{directory}/cfg.json is missing or not JSON ({error})") from error
    if not isinstance(cfg, dict):
        raise SAEError(f"{directory}/cfg.json holds a JSON {type(cfg).__name__}, not an object of SAELens settings")
    for key in ("d_in", "d_sae"):
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int)):
            raise SAEError(f"{directory}/cfg.json: {key} must be a whole number, got {cfg[key]!r}")
    architecture = cfg.get("architecture", "standard")
    if architecture != "jumprelu":
        raise SAEError(f"{directory}: SAELens architecture is {architecture!r}; patchscope loads only 'jumprelu' SAEs")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SAEError(f"{directory}: normalize_activations={cfg['normalize_activations']!r} is not supported")
    metadata: dict = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    site = metadata.get("hook_name", cfg.get("hook_name"))
    model = metadata.get("model_name", cfg.get("model_name"))
    base = info_from_path(str(directory))
    info = SAEInfo(
        site=site or base.site,
        model=model,
        layer=base.layer,
        width=base.width,
        l0=base.l0,
        source=str(directory),
        neuronpedia=metadata.get("neuronpedia_id"),
    )
    tensors = _read_safetensors(directory / "sae_weights.safetensors", d_model)
    sae = sae_from_tensors(tensors, info, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", False)))
    for key, actual in (("d_in", sae.d_model), ("d_sae", sae.d_sae)):
        if key in cfg and cfg[key] != actual:
            raise SAEError(f"{directory}: cfg.json says {key}={cfg[key]} but the weights have {actual}")
    return sae


def load_gemma_scope_2_dir(directory: str | Path, *, d_model: int | None = None, repo: str | None = None,
                           source: str | None = None) -> JumpReLUSAE:  # fmt: skip
    """A Gemma Scope 2 folder: ``config.json`` (architecture ``jump_relu``, hook points) + ``params.safetensors``.

    An SAE whose config names an output hook point other than its input (a transcoder) loads as a
    `JumpReLUTranscoder`, with ``affine_skip_connection [d_in, d_out]`` as its skip (orientation as
    Gemma Scope 2 applies it, ``x @ affine_skip_connection``; SAELens stores its transpose as ``W_skip``).
    """
    directory = Path(directory)
    config = gemma_scope_2.read_config(directory)
    info = gemma_scope_2.info_for(directory, config, repo=repo, source=source)
    tensors = _read_safetensors(directory / gemma_scope_2.PARAMS, d_model)
    sae = sae_from_tensors(tensors, info)
    skip = next((t for name, t in tensors.items() if name.lower() == "affine_skip_connection"), None)
    if info.site_out is None:
        if skip is not None:
            raise SAEError(f"{directory}: holds affine_skip_connection but its config names no hf_hook_point_out")
        return sae
    if skip is not None and tuple(skip.shape) != (sae.d_model, sae.W_dec.shape[1]):
        raise SAEError(
            f"{directory}: affine_skip_connection has shape {tuple(skip.shape)}, expected {(sae.d_model, sae.W_dec.shape[1])}"
        )
    parts = {k: getattr(sae, k) for k in KEYS}
    return JumpReLUTranscoder(**parts, info=info, W_skip=None if skip is None else skip.float())


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
        f"cannot resolve 'canonical' for {repo_id} layer {layer} width {width} offline; name the file (average_l0_N) or go online"
    )


def load_from_hub(repo_id: str, path: str, *, offline: bool = False, d_model: int | None = None) -> JumpReLUSAE:
    """``google/gemma-scope-2b-pt-res``, ``layer_11/width_16k/average_l0_80`` (or ``.../canonical``).

    When the hub is switched off or cannot be reached, only the local cache is read (no retries).
    """
    from huggingface_hub import hf_hub_download

    from patchscope.model.loading import hub_reachable, offline_mode

    unreachable = not offline and not offline_mode() and not hub_reachable()
    offline = offline or unreachable or offline_mode()

    if gemma_scope_2.is_folder_path(path):
        return _gemma_scope_2_from_hub(repo_id, path, offline=offline, unreachable=unreachable, d_model=d_model)
    path = path.strip("/").removesuffix("/params.npz")
    match = GEMMA_SCOPE_PATH.fullmatch(path)
    if match and match["canonical"]:
        l0 = canonical_l0(repo_id, int(match["layer"]), match["width"], offline=offline)
        path = f"layer_{match['layer']}/width_{match['width']}/average_l0_{l0}"
    try:
        local = hf_hub_download(repo_id, f"{path}/params.npz", local_files_only=offline)
    except Exception as error:  # noqa: BLE001 - many hub error types, one explanation
        why = "the hub cannot be reached and it is not in the local cache" if unreachable else type(error).__name__
        raise SAEError(
            f"could not fetch {repo_id}/{path}/params.npz ({why}); check the path, go online "
            "(`hf auth login` if needed), or pass a local params.npz"
        ) from error
    return load_npz(local, dataclasses.replace(info_from_path(path, repo=repo_id), source=f"{repo_id}/{path}"), d_model=d_model)


def _gemma_scope_2_from_hub(repo_id: str, path: str, *, offline: bool, unreachable: bool, d_model: int | None) -> JumpReLUSAE:
    """Fetch a Gemma Scope 2 folder's two files with ``hf_hub_download`` (the cache only when offline)."""
    from huggingface_hub import hf_hub_download

    folder = path.strip("/").removesuffix(f"/{gemma_scope_2.PARAMS}").removesuffix(f"/{gemma_scope_2.CONFIG}")
    local = []
    for name in (gemma_scope_2.CONFIG, gemma_scope_2.PARAMS):
        try:
            local.append(Path(hf_hub_download(repo_id, f"{folder}/{name}", local_files_only=offline)))
        except Exception as error:  # noqa: BLE001 - many hub error types, one explanation
            why = "the hub cannot be reached" if unreachable else ("offline" if offline else type(error).__name__)
            why += ", and it is not in the local cache" if offline else ""
            raise SAEError(
                f"could not fetch {repo_id}/{folder}/{name} ({why}); go online (`hf auth login` if needed), or download "
                f"{folder}/ ({gemma_scope_2.CONFIG} and {gemma_scope_2.PARAMS})"
            ) from error
    if local[0].parent != local[1].parent:
        raise SAEError(f"{repo_id}/{folder}: config.json and params.safetensors came from different snapshots; fetch again")
    return load_gemma_scope_2_dir(local[0].parent, d_model=d_model, repo=repo_id, source=f"{repo_id}/{folder}")


def load_sae(
    spec: str | Path, *, device: str | torch.device = "cpu", d_model: int | None = None, offline: bool = False
) -> JumpReLUSAE:
    """Load a JumpReLU SAE from a file, a folder or a hub location (see the module docstring).

    Args:
        spec: a ``params.npz`` or ``.safetensors`` file, a SAELens folder, a folder holding
            ``params.npz``, or ``REPO_ID/PATH`` on the hub (the last part may be ``canonical``).
        device: where the SAE's tensors go.
        d_model: the model's width; checked against the declared shapes before any tensor is read.
        offline: use the local hub cache only.

    Returns:
        A `JumpReLUSAE` (float32), with `SAEInfo` on where it came from and the site it reads.

    Raises:
        SAEError: a missing, corrupt or inconsistent file (shapes, dtypes, NaN, duplicate keys).

    Example:
        >>> sae = load_sae("google/gemma-scope-2b-pt-res/layer_11/width_16k/canonical", d_model=2304)
        >>> top_features(sae, vector, k=5)
    """
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        if (path / "cfg.json").exists() and (path / "sae_weights.safetensors").exists():
            sae = load_saelens_dir(path, d_model=d_model)
        elif (path / gemma_scope_2.CONFIG).exists() and (path / gemma_scope_2.PARAMS).exists():
            sae = load_gemma_scope_2_dir(path, d_model=d_model)
        elif (path / "params.npz").exists():
            sae = load_npz(path / "params.npz", d_model=d_model)
        else:
            raise SAEError(
                f"{path}: neither a SAELens folder (cfg.json + sae_weights.safetensors), a Gemma Scope 2 folder "
                "(config.json + params.safetensors) nor a Gemma Scope folder (params.npz)"
            )
    elif path.suffix == ".npz":
        if not path.is_file():
            raise SAEError(f"no such SAE file: {path}")
        sae = load_npz(path, d_model=d_model)
    elif path.suffix == ".safetensors":
        if not path.is_file():
            raise SAEError(f"no such SAE file: {path}")
        # a Gemma Scope 2 params.safetensors beside its config.json
        if path.name == gemma_scope_2.PARAMS and (path.parent / gemma_scope_2.CONFIG).is_file():
            sae = load_gemma_scope_2_dir(path.parent, d_model=d_model)
        else:
            sae = load_safetensors_file(path, d_model=d_model)
    else:
        parts = text.strip("/").split("/")
        if len(parts) < 3:
            raise SAEError(
                f"cannot read SAE spec {text!r}: give a params.npz / .safetensors file, a SAELens folder, or "
                "REPO_ID/PATH such as google/gemma-scope-2b-pt-res/layer_11/width_16k/canonical"
            )
        sae = load_from_hub("/".join(parts[:2]), "/".join(parts[2:]), offline=offline, d_model=d_model)
    if d_model is not None:
        check_for_model(sae, d_model)
    return sae.to(device)


def gemma_scope_spec(repo_id: str, layer: int, width: str = "16k", l0: str | int = "canonical") -> str:
    """The hub spec of a Gemma Scope residual SAE."""
    tail = "canonical" if l0 == "canonical" else f"average_l0_{l0}"
    return f"{repo_id}/layer_{layer}/width_{width}/{tail}"


def sae_spec_for_site(model: str, site: str, width: str = "16k", l0: str | int = "canonical") -> str:
    """The Gemma Scope residual SAE that reads ``site`` of a preset model, by the site rule.

    ``sae_spec_for_site("google/gemma-2-2b", "blocks.12.hook_resid_pre")`` is the layer-11 SAE;
    ``sae_spec_for_site("gemma-3-270m", "blocks.6.hook_resid_pre")`` is Gemma Scope 2's layer-5
    ``resid_post`` SAE (`patchscope.sae.gemma_scope_2.spec_for_layer` chooses width and L0 there).
    """
    from patchscope.model.loading import preset_for

    preset = preset_for(model)
    if preset is None or preset.sae_repo is None:
        raise SAEError(f"no Gemma Scope SAEs are known for {model!r}; pass an SAE spec explicitly")
    if preset.sae_repo in gemma_scope_2.REPOS.values():
        return gemma_scope_2.spec_for_layer(preset.sae_repo, sae_layer_for_site(site), width)
    return gemma_scope_spec(preset.sae_repo, sae_layer_for_site(site), width, l0)
