"""Atlas files (`patchscope/atlas/store.py`): every corruption is named, none loads silently."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from run_inputs import TEXTS

from patchscope.atlas.atlas import Atlas, AtlasError
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.store import ATLAS_JSON, ATLAS_TENSORS, CHECKSUM_KEY, METADATA_KEY, load_atlas

LAYER = 2
SITE = f"blocks.{LAYER}.mlp.hook_post"


@pytest.fixture(scope="module")
def small_atlas(gemma, tmp_path_factory):
    model, tokenizer = gemma
    out = tmp_path_factory.mktemp("atlas")
    profile(model, tokenizer, TEXTS, ProfileConfig(layer=LAYER, top_k=3, max_length=16), out=out, progress=False)
    return out / ATLAS_TENSORS


def _header(raw: bytes) -> tuple[int, dict]:
    (size,) = struct.unpack("<Q", raw[:8])
    return size, json.loads(raw[8 : 8 + size])


def test_a_flipped_bit_is_detected(small_atlas, tmp_path):
    raw = bytearray(small_atlas.read_bytes())
    size, header = _header(bytes(raw))
    begin, end = header[f"{SITE}/values"]["data_offsets"]
    raw[8 + size + (begin + end) // 2] ^= 0x04  # one bit of one float
    (tmp_path / ATLAS_TENSORS).write_bytes(bytes(raw))
    with pytest.raises(AtlasError, match="fails its checksum"):
        load_atlas(tmp_path)


def _rewrite(tmp_path: Path, atlas: Atlas, metadata_edit=None, tensor_edit=None) -> Path:
    """Write ``atlas`` with edited tensors/metadata, as a buggy tool or a hand edit would (no checksum)."""
    from patchscope.util.storage import write_tensors

    tensors = atlas.tensors()
    if tensor_edit:
        tensor_edit(tensors)
    import dataclasses

    meta = dataclasses.asdict(atlas.meta) | {"sites": list(atlas.sites)}
    if metadata_edit:
        metadata_edit(meta)
    write_tensors(tmp_path / ATLAS_TENSORS, tensors, {METADATA_KEY: json.dumps(meta)})
    return tmp_path


@pytest.mark.parametrize(
    "metadata_edit, tensor_edit, message",
    [
        (lambda m: m.pop("sites"), None, "lists no `sites`"),
        (None, lambda t: t.pop(f"{SITE}/doc"), f"is missing the tensor '{SITE}/doc'"),
        (
            None,
            lambda t: t.__setitem__(f"{SITE}/pos", t[f"{SITE}/pos"][:, :50]),
            rf"{SITE}/pos has shape \(3, 50\), expected \(3, 128\)",
        ),
        (
            None,
            lambda t: t.__setitem__(f"{SITE}/values", t[f"{SITE}/values"].index_fill(1, torch.tensor([7]), float("nan"))),
            "nan or inf",
        ),
        (None, lambda t: t.__setitem__(f"{SITE}/doc", t[f"{SITE}/doc"].float()), "expected an integer dtype"),
        (lambda m: m.__setitem__("top_k", 20), None, r"expected \[top_k=20, neurons\]"),
    ],
)
def test_inconsistent_atlas_files_raise_atlas_error_naming_file_and_fault(
    small_atlas, tmp_path, metadata_edit, tensor_edit, message
):
    folder = _rewrite(tmp_path, load_atlas(small_atlas), metadata_edit, tensor_edit)
    with pytest.raises(AtlasError, match=message) as error:
        load_atlas(folder)
    assert str(folder / ATLAS_TENSORS) in str(error.value)


def test_checksum_is_stored_in_both_metadata_copies(small_atlas):
    from safetensors import safe_open

    with safe_open(str(small_atlas), framework="pt") as handle:
        inside = handle.metadata()[CHECKSUM_KEY]
    assert json.loads((small_atlas.parent / ATLAS_JSON).read_text())["checksum"] == inside and len(inside) == 64


def test_an_atlas_written_before_typed_metadata_still_loads(small_atlas, tmp_path):
    """The layout of earlier versions: flat dataset, split and column, and an ``extra`` dict of provenance."""
    atlas = load_atlas(small_atlas)
    identity = {
        "model": {"kind": "folder", "files": {"config.json": "abc"}},
        "data": {"kind": "file", "size": 3, "sha256": "d" * 64},
    }
    old = {
        "model": "some/model",
        "dataset": "corpus.jsonl",
        "split": "[0:7]",
        "text_column": "body",
        "max_length": 16,
        "top_k": atlas.meta.top_k,
        "extra": {
            "batches": 4,
            "seconds": 1.5,
            "tokens_this_run": 99,
            "fingerprint": "f" * 16,
            "identity": identity,
            "source": {"dataset": "corpus.jsonl", "split": None, "text_column": "body", "txt_mode": "lines", "streaming": False},
            "rows_read": [0, 6],
            "nonfinite_activations": 2,
        },
    }
    folder = _rewrite(tmp_path, atlas, metadata_edit=lambda m: (m.clear(), m.update(old, sites=list(atlas.sites))))
    meta = load_atlas(folder).meta
    assert (meta.model, meta.dataset, meta.split, meta.text_column, meta.max_length) == (
        "some/model",
        "corpus.jsonl",
        "",
        "body",
        16,
    )
    assert meta.inputs.to_json() == identity and meta.fingerprint == "f" * 16 and meta.rows_read == (0, 6)
    assert (meta.provenance.batches, meta.provenance.seconds, meta.provenance.tokens_this_run) == (4, 1.5, 99)
    assert meta.provenance.nonfinite_activations == 2
    without_source = dict(old, extra={})  # the oldest: no recorded source at all
    folder = _rewrite(
        tmp_path / "oldest", atlas, metadata_edit=lambda m: (m.clear(), m.update(without_source, sites=list(atlas.sites)))
    )
    meta = load_atlas(folder).meta
    assert meta.source is not None and (meta.dataset, meta.split, meta.text_column) == ("corpus.jsonl", "[0:7]", "body")


def test_typed_metadata_round_trips_through_the_files(small_atlas):
    from patchscope.atlas.atlas import AtlasMeta

    meta = load_atlas(small_atlas).meta
    assert AtlasMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta
    assert json.loads((small_atlas.parent / ATLAS_JSON).read_text())["split"] == meta.split
