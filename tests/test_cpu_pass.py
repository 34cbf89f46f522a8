"""The one-pass CPU reduction against the plain references, batch by batch and over a stream of batches."""

import pytest
import torch

from patchscope.atlas.stats import TokenFields, TopK
from patchscope.kernels import bottomk, histogram, topk_merge
from patchscope.kernels.cpu_pass import Workspace, cpu_pass
from patchscope.kernels.topk_merge_fast import merge_topk_fast


def _stream(seed: int, dtype: torch.dtype, n: int = 40, coarse: bool = True):
    """Batches of varying length (partial last blocks, a batch shorter than a block), with exact ties
    across batches and documents, and uncounted rows (BOS, padding)."""
    gen = torch.Generator().manual_seed(seed)
    batches, doc0 = [], 1000
    for tokens in (256, 203, 64, 5, 512, 131, 256, 256):
        acts = torch.randn(tokens, n, generator=gen) * torch.linspace(0.01, 30, n)
        if coarse:
            acts = (acts * 2).round() / 2
        acts[:, 3] = 0.0  # a neuron that never fires: everything ties
        acts[:, 7] = 1.5  # another one tied everywhere, at another value: the dense columns must not swap
        docs = torch.arange(tokens) // 16
        doc0 -= int(docs.max()) + 1  # later batches hold earlier documents: their ties rank first
        doc = doc0 + docs.flip(0)  # and documents arrive out of order within a batch
        pos = torch.arange(tokens) % 16
        token = torch.randint(0, 99, (tokens,), generator=gen)
        counted = (pos > 0) & (torch.rand(tokens, generator=gen) > 0.05)
        batches.append((acts.to(dtype), doc, pos, token, counted))
    return batches


def _assert_same(a: TopK, b: TopK, what: str) -> None:
    for name in ("values", "doc", "pos", "token"):
        assert torch.equal(getattr(a, name), getattr(b, name)), (what, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [3, 20])
def test_streamed_cpu_pass_matches_the_references(dtype, k):
    batches = _stream(k, dtype)
    if dtype == torch.float16:  # and activations that are a strided view, as a hook may hand over
        batches = [(torch.cat([acts, acts], 1)[:, ::2], *rest) for acts, *rest in batches]
    n = batches[0][0].shape[1]
    workspace = Workspace()
    top, bottom = TopK.empty(k, n), bottomk.empty_bottomk(k, n)
    ref_top, ref_bottom = TopK.empty(k, n), bottomk.empty_bottomk(k, n)
    counts = histogram.empty_histogram(n)
    skipped = False
    for acts, doc, pos, token, counted in batches:
        pieces = cpu_pass(
            acts,
            TokenFields(doc, pos, token, counted),
            top_k=k,
            bottom_k=k,
            histogram=True,
            workspace=workspace,
            top_floor=top.values.amin(0),
            bottom_ceiling=bottom.values.amax(0),
        )
        assert pieces is not None and pieces.bottom is not None and pieces.histogram is not None
        filled = (pieces.top.values > float("-inf")).sum(0)  # [n]
        skipped |= bool((filled < min(k + 8, int(counted.sum()))).any())  # fewer than the dense selection keeps
        top = merge_topk_fast(top, pieces.top)
        bottom = bottomk.merge_bottomk_fast(bottom, pieces.bottom)
        counts += pieces.histogram

        ref_top = topk_merge.merge_topk(ref_top, topk_merge.batch_topk(acts, doc, pos, token, counted, k))
        ref_bottom = bottomk.merge_bottomk(ref_bottom, bottomk.batch_bottomk(acts, doc, pos, token, counted, k))
        _assert_same(top, ref_top, "top")
        _assert_same(bottom, ref_bottom, "bottom")
        assert torch.equal(pieces.histogram, histogram.batch_histogram_reference(acts, counted))
        ref_m = topk_merge.batch_moments(acts, counted)
        for name in ("fire_count", "nonfinite", "n_tokens"):
            assert torch.equal(getattr(pieces.moments, name), getattr(ref_m, name)), name
        torch.testing.assert_close(pieces.moments.total, ref_m.total, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(pieces.moments.total_sq, ref_m.total_sq, rtol=1e-5, atol=1e-2)
    assert skipped, "the floor never let a batch skip a block"


def test_blocks_below_the_floor_are_skipped_entirely():
    acts = torch.randn(256, 6)  # 32 blocks: more than the dense selection reads
    everything = torch.ones(256, dtype=torch.bool)
    ids = torch.arange(256)
    kwargs = dict(top_k=2, bottom_k=2, histogram=False, workspace=Workspace())
    floor, ceiling = torch.full((6,), 100.0), torch.full((6,), -100.0)
    pieces = cpu_pass(acts, TokenFields(ids, ids, ids, everything), top_floor=floor, bottom_ceiling=ceiling, **kwargs)
    assert pieces is not None and pieces.bottom is not None
    assert pieces.top.k == 0 and pieces.bottom.k == 0
    floor[4] = float(acts[:, 4].max())  # one neuron's best row reaches its floor, exactly (a tie)
    pieces = cpu_pass(acts, TokenFields(ids, ids, ids, everything), top_floor=floor, bottom_ceiling=ceiling, **kwargs)
    assert pieces is not None and pieces.top.k == 1  # the one entry reaching it
    best = int(acts[:, 4].argmax())
    assert best in pieces.top.doc[:, 4].tolist() and pieces.top.doc[:, 0].eq(-1).all()


def test_a_batch_with_inf_or_nan_is_left_to_the_plain_kernels():
    acts = torch.randn(32, 4)
    ids, everything = torch.arange(32), torch.ones(32, dtype=torch.bool)
    kwargs = dict(top_k=2, bottom_k=2, histogram=True, workspace=Workspace())
    assert cpu_pass(acts, TokenFields(ids, ids, ids, everything), **kwargs) is not None
    for bad in (float("inf"), float("nan")):
        broken = acts.clone()
        broken[7, 2] = bad
        assert cpu_pass(broken, TokenFields(ids, ids, ids, everything), **kwargs) is None
    broken = acts.clone()
    broken[0, 1] = float("nan")  # in an uncounted row too: the plain kernels handle it
    assert cpu_pass(broken, TokenFields(ids, ids, ids, everything.logical_not()), **kwargs) is None


def test_bottomk_candidates_rank_ties_past_the_margin_exactly():
    """More rows tie at the k-th smallest value than the candidates keep: the plain bottom-k path
    (off the CPU, and for batches holding inf or nan) must still pick them by the ranking rule."""
    gen = torch.Generator().manual_seed(3)
    acts = torch.randint(-1, 2, (400, 5), generator=gen).float()  # values in {-1, 0, 1}: hundreds of ties
    doc = torch.randperm(400, generator=gen)
    pos, token = torch.zeros(400, dtype=torch.long), torch.arange(400)
    counted = torch.rand(400, generator=gen) > 0.1
    candidates = bottomk.bottomk_candidates(acts, doc, pos, token, counted, 3)
    _assert_same(
        bottomk.merge_bottomk_fast(bottomk.empty_bottomk(3, 5), candidates),
        bottomk.batch_bottomk(acts, doc, pos, token, counted, 3),
        "bottom",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_histogram_counts_every_group_of_neurons(dtype):
    """300 neurons: two full groups of `HISTOGRAM_GROUP` and a partial one, each counted by its own bincount,
    over magnitudes from below the centre bin to past the overflow bin, of both signs."""
    from patchscope.kernels.cpu_pass import HISTOGRAM_GROUP

    n = 300
    assert n > 2 * HISTOGRAM_GROUP and n % HISTOGRAM_GROUP
    gen = torch.Generator().manual_seed(5)
    acts = torch.randn(77, n, generator=gen) * torch.pow(2.0, torch.randint(-14, 14, (77, n), generator=gen).float())
    acts[:, 130] = 0.0  # a neuron in the second group that never fires
    acts = acts.to(dtype)
    ids = torch.arange(77)
    counted = torch.rand(77, generator=gen) > 0.2
    pieces = cpu_pass(acts, TokenFields(ids, ids, ids, counted), top_k=2, bottom_k=0, histogram=True, workspace=Workspace())
    assert pieces is not None and pieces.histogram is not None
    assert torch.equal(pieces.histogram, histogram.batch_histogram_reference(acts, counted))
