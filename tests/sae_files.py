"""SAE files written in the exact Gemma Scope and SAELens layouts, with small shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

D_MODEL, D_SAE = 64, 96


def sae_params(seed: int = 0, d_model: int = D_MODEL, d_sae: int = D_SAE, decoder_scale: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": (rng.standard_normal((d_model, d_sae)) / np.sqrt(d_model)).astype(np.float32),
        "b_enc": (rng.standard_normal(d_sae) * 0.1).astype(np.float32),
        "threshold": np.abs(rng.standard_normal(d_sae) * 0.3).astype(np.float32),
        "W_dec": (rng.standard_normal((d_sae, d_model)) * decoder_scale / np.sqrt(d_model)).astype(np.float32),
        "b_dec": (rng.standard_normal(d_model) * 0.05).astype(np.float32),
    }


def numpy_jumprelu(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Gemma Scope formula, written independently in NumPy (float64)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    pre = x.astype(np.float64) @ p["W_enc"] + p["b_enc"]
    acts = np.maximum(pre, 0.0) * (pre > p["threshold"])
    return acts, acts @ p["W_dec"] + p["b_dec"]


def write_npz(path: Path, params: dict[str, np.ndarray], case: str = "upper") -> Path:
    rename = {
        "upper": lambda k: k,
        "lower": str.lower,
        "mixed": lambda k: {"W_enc": "W_enc", "W_dec": "w_dec", "threshold": "Threshold"}.get(k, k),
    }[case]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{rename(k): v for k, v in params.items()})
    return path


def write_saelens(directory: Path, params: dict[str, np.ndarray], hook_name: str, architecture: str = "jumprelu") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(params, str(directory / "sae_weights.safetensors"))
    d_model, d_sae = params["W_enc"].shape
    cfg = {
        "architecture": architecture,
        "d_in": d_model,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": hook_name, "model_name": "tiny-gemma2", "hook_head_index": None},
    }
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def write_hub_cache(cache: Path, repo_id: str, path: str, params: dict[str, np.ndarray]) -> Path:
    """Lay out a HF hub cache as hf_hub_download leaves it, so the real download code reads it offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return write_npz(repo / "snapshots" / commit / path / "params.npz", params)


GEMMA_SCOPE_2_RENAME = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}


def write_gemma_scope_2(
    folder: Path,
    params: dict[str, np.ndarray],
    hook_in: str,
    hook_out: str | None = None,
    *,
    architecture: str = "jump_relu",
    skip: np.ndarray | None = None,
    model_name: str = "google/gemma-3-270m-pt",
) -> Path:
    """A Gemma Scope 2 folder as published: lower-case tensors in params.safetensors, config.json with hook points.

    ``folder`` should be named like ``resid_post/layer_5_width_16k_l0_medium``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {GEMMA_SCOPE_2_RENAME[k]: v for k, v in params.items()}
    if skip is not None:
        tensors["affine_skip_connection"] = skip
    save_file(tensors, str(folder / "params.safetensors"))
    config = {
        "architecture": architecture,
        "model_name": model_name,
        "hf_hook_point_in": hook_in,
        "hf_hook_point_out": hook_out or hook_in,
        "width": int(params["W_enc"].shape[1]),
        "l0": 20,
        "affine_connection": skip is not None,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_hub_snapshot(cache: Path, repo_id: str) -> Path:
    """An empty snapshot of ``repo_id`` in a HF hub cache laid out as hf_hub_download leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit
