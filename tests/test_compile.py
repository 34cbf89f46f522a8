"""`ProfileConfig.compile`: the compiled forward and reduction give the eager atlas within tolerance."""

import pytest
import torch
from factories import FIXTURE_CORPUS

from patchscope import load_model
from patchscope.atlas.compiled import compiles
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
"""Relative agreement documented for `ProfileConfig.compile` (patchscope/atlas/compiled.py)."""

# Documents of many lengths, so batches come in several shapes (the compiled graph turns dynamic).
TEXTS = [text[start:] for text in FIXTURE_CORPUS if text for start in (0, 7, 19)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_atlas_agrees_with_eager(gemma_dir, dtype):
    model, tokenizer = load_model(str(gemma_dir), dtype=dtype, device="cpu")
    config = ProfileConfig(layer=2, top_k=5, max_length=24, batch_tokens=96, checkpoint_every=0)
    eager = profile(model, tokenizer, TEXTS, config, progress=False)
    torch._dynamo.utils.counters.clear()
    compiled = profile(model, tokenizer, TEXTS, ProfileConfig(**{**config.__dict__, "compile": True}), progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something really was compiled
    # one dynamic graph per attention variant (sliding, full) and one per variant for 1-row batches, at most:
    # far below Dynamo's recompile limit (8 per code object), past which it would silently run eager
    assert compiles() <= 4, torch._dynamo.utils.counters["frames"]

    tol = TOLERANCE[dtype]
    site = "blocks.2.mlp.hook_post"
    ours, ref = compiled[site], eager[site]
    scale = ref.top.values[0].abs().max().item()
    # the k best values, sorted, move by at most the largest change of any one activation
    torch.testing.assert_close(ours.top.values, ref.top.values, rtol=tol, atol=tol * scale)
    assert torch.equal(ours.moments.n_tokens, ref.moments.n_tokens)
    n = ref.moments.n_tokens.item()
    torch.testing.assert_close(ours.moments.total / n, ref.moments.total / n, rtol=tol, atol=tol * scale)
    # the same top-1 token wherever the top two are told apart by more than the tolerance
    best, second = ref.top.values[0], ref.top.values[1]
    separated = (best - second) > 2 * tol * best.abs().clamp(min=scale * 0.1)
    assert separated.sum() > ref.top.values.shape[1] // 2  # the check covers most neurons
    for name in ("doc", "pos", "token"):
        assert torch.equal(getattr(ours.top, name)[0][separated], getattr(ref.top, name)[0][separated]), name
