"""Our Gemma Scope 2 loader against SAELens' own Gemma Scope 2 loader on the same folder (needs `sae-lens`).

SAELens is in no extra: it pins transformer-lens 3.9, below the `compare` extra's. Run this file in a
venv of its own (docs/gemma-scope-2.md, "Comparing with SAELens"). SAELens' loader reads the hub, so
its two network calls are pointed at the local folder: the file download, and the safetensors header
it reads for the shapes.
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_files import D_MODEL, sae_params, write_gemma_scope_2

from patchscope.sae.loaders import load_sae

pytest.importorskip("sae_lens", reason="install sae-lens in a venv of its own")
from sae_lens import SAE  # noqa: E402
from sae_lens.loading import pretrained_sae_loaders as saelens_loaders  # noqa: E402

REPO = "local/gemma-scope-2-tiny"  # not in SAELens' registry, so it is read as a plain repo id


def _offline(monkeypatch, root: Path) -> None:
    """hf_hub_download and the shape look-up, as SAELens' loader calls them, answered from ``root``."""

    def download(repo_id, filename, subfolder=None, force_download=False, **_):
        assert repo_id == REPO
        path = root / (subfolder or "") / filename
        assert path.is_file(), path
        return str(path)

    def shapes(repo_id, filename):
        raw = (root / filename).read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}

    monkeypatch.setattr(saelens_loaders, "hf_hub_download", download)
    monkeypatch.setattr(saelens_loaders, "get_safetensors_tensor_shapes", shapes)


def _theirs(folder_name: str):
    return SAE.from_pretrained(
        REPO, folder_name, device="cpu", dtype="float32", converter=saelens_loaders.gemma_3_sae_huggingface_loader
    )


def _inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, D_MODEL, generator=g, dtype=torch.float32)


def test_resid_post_encode_decode_equal_saelens(tmp_path, monkeypatch):
    name = "resid_post/layer_5_width_16k_l0_medium"
    folder = write_gemma_scope_2(tmp_path / name, sae_params(seed=11), "model.layers.5.output")
    _offline(monkeypatch, tmp_path)
    ours, theirs = load_sae(folder), _theirs(name)
    assert theirs.cfg.metadata.hook_name == ours.info.site == "blocks.5.hook_resid_post"
    x = _inputs()
    with torch.no_grad():
        acts = theirs.encode(x)
        assert 0 < int((acts > 0).sum()) < acts.numel()  # some features fire, some do not
        torch.testing.assert_close(ours.encode(x), acts)
        torch.testing.assert_close(ours.decode(acts), theirs.decode(acts))
        torch.testing.assert_close(ours(x), theirs(x))


def test_affine_transcoder_equals_saelens(tmp_path, monkeypatch):
    name = "transcoder/layer_4_width_16k_l0_medium_affine"
    skip = (np.random.default_rng(5).standard_normal((D_MODEL, D_MODEL)) * 0.1).astype(np.float32)
    folder = write_gemma_scope_2(
        tmp_path / name,
        sae_params(seed=12),
        "model.layers.4.pre_feedforward_layernorm.output",
        "model.layers.4.post_feedforward_layernorm.output",
        skip=skip,
    )
    _offline(monkeypatch, tmp_path)
    ours, theirs = load_sae(folder), _theirs(name)
    assert theirs.cfg.architecture() == "jumprelu_skip_transcoder"
    x = _inputs(seed=6)
    with torch.no_grad():
        acts = theirs.encode(x)
        assert 0 < int((acts > 0).sum()) < acts.numel()
        torch.testing.assert_close(ours.encode(x), acts)
        torch.testing.assert_close(ours.predict(x), theirs(x))  # decode plus the affine skip
