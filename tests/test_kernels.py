"""The plain-torch top-k merge against a brute-force Python reference."""

import random

import torch

from patchscope.atlas.stats import Moments, TopK
from patchscope.kernels.topk_merge import batch_moments, merge_topk, update


def brute_topk(rows, k, n):
    """rows: list of (acts list[n], doc, pos, token, counted). Plain Python sort per neuron."""
    out = []
    for neuron in range(n):
        candidates = [
            (r[0][neuron], r[1], r[2], r[3])
            for r in rows
            if r[4] and r[0][neuron] == r[0][neuron] and abs(r[0][neuron]) != float("inf")
        ]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        out.append(candidates[:k])
    return out


def run_batches(batches, k, n):
    state, moments = TopK.empty(k, n), Moments.zeros(n)
    for acts, doc, pos, tok, counted in batches:
        state, moments = update(state, moments, acts, doc, pos, tok, counted)
    return state, moments


def make_batches(seed, n_batches=5, tokens=13, n=7, ties=True):
    gen = torch.Generator().manual_seed(seed)
    batches, rows = [], []
    doc_ids = list(range(40))
    random.Random(seed).shuffle(doc_ids)  # batches do not arrive in document order
    for b in range(n_batches):
        acts = torch.randn(tokens, n, generator=gen)
        if ties:  # coarse values make exact ties across batches and documents
            acts = (acts * 2).round() / 2
        doc = torch.tensor([doc_ids[b * 2 + (i % 2)] for i in range(tokens)])
        pos = torch.tensor([i // 2 for i in range(tokens)])
        tok = torch.randint(0, 50, (tokens,), generator=gen)
        counted = torch.rand(tokens, generator=gen) > 0.2
        batches.append((acts, doc, pos, tok, counted))
        rows += [(acts[i].tolist(), int(doc[i]), int(pos[i]), int(tok[i]), bool(counted[i])) for i in range(tokens)]
    return batches, rows


def test_topk_matches_brute_force_with_ties():
    k, n = 4, 7
    for seed in range(5):
        batches, rows = make_batches(seed, n=n)
        state, _ = run_batches(batches, k, n)
        expected = brute_topk(rows, k, n)
        for neuron in range(n):
            got = [
                (
                    state.values[r, neuron].item(),
                    state.doc[r, neuron].item(),
                    state.pos[r, neuron].item(),
                    state.token[r, neuron].item(),
                )
                for r in range(k)
            ]
            assert got == expected[neuron], (seed, neuron)


def test_short_batches_and_empty_slots():
    k, n = 5, 3
    acts = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, float("nan")]])
    state, moments = update(
        TopK.empty(k, n),
        Moments.zeros(n),
        acts,
        torch.tensor([7, 8]),
        torch.tensor([1, 1]),
        torch.tensor([4, 5]),
        torch.tensor([True, True]),
    )
    assert state.values[:2, 0].tolist() == [3.0, 1.0]
    assert state.values[0, 1].item() == -1.0  # negative maxima are kept
    assert state.doc[2:].eq(-1).all() and torch.isinf(state.values[2:]).all()
    assert state.values[0, 2].item() == 0.5 and state.doc[1, 2].item() == -1  # nan never enters
    assert moments.nonfinite.tolist() == [0, 0, 1]
    assert moments.fire_count.tolist() == [2, 0, 1]


def test_moments_match_plain_sums():
    batches, rows = make_batches(3, ties=False)
    _, moments = run_batches(batches, 3, 7)
    counted = [r for r in rows if r[4]]
    assert moments.n_tokens.item() == len(counted)
    for neuron in range(7):
        values = [r[0][neuron] for r in counted]
        assert abs(moments.total[neuron].item() - sum(values)) < 1e-4
        assert abs(moments.total_sq[neuron].item() - sum(v * v for v in values)) < 1e-4
        assert moments.fire_count[neuron].item() == sum(v > 0 for v in values)


def test_merge_is_order_independent():
    batches, _ = make_batches(11)
    a, ma = run_batches(batches[:2], 4, 7)
    b, mb = run_batches(batches[2:], 4, 7)
    whole, mw = run_batches(batches, 4, 7)
    for merged in (merge_topk(a, b), merge_topk(b, a)):
        for name in ("values", "doc", "pos", "token"):
            assert torch.equal(getattr(merged, name), getattr(whole, name))
    torch.testing.assert_close((ma + mb).total, mw.total)


def test_fp16_overflow_never_wins():
    acts = torch.tensor([[60000.0], [1.0]], dtype=torch.float16) * 2  # inf in fp16
    top, _ = update(
        TopK.empty(2, 1),
        Moments.zeros(1),
        acts,
        torch.tensor([0, 1]),
        torch.tensor([1, 1]),
        torch.tensor([0, 0]),
        torch.tensor([True, True]),
    )
    assert top.values[0, 0].item() == 2.0 and top.doc[1, 0].item() == -1
    assert batch_moments(acts, torch.tensor([True, True])).nonfinite.item() == 1


def test_within_batch_ties_follow_the_ranking_rule():
    from patchscope.kernels import topk_merge, topk_merge_fast

    gen = torch.Generator().manual_seed(4)
    acts = (torch.randn(1024, 9, generator=gen) * 2).round().to(torch.bfloat16)  # big tie groups
    acts[:, 0] = 1.0
    acts[[900, 3, 512], 0] = 2.0  # three tokens tie for the top of neuron 0
    doc = torch.randperm(1024, generator=gen)  # rows arrive out of document order
    pos = torch.zeros(1024, dtype=torch.long)
    counted = torch.ones(1024, dtype=torch.bool)
    for topk in (topk_merge.batch_topk, topk_merge_fast.batch_topk):
        top = topk(acts, doc, pos, torch.zeros(1024, dtype=torch.long), counted, 2)
        assert top.doc[:, 0].tolist() == sorted(doc[[900, 3, 512]].tolist())[:2], topk
    rows = [(acts[i].float().tolist(), int(doc[i]), 0, 0, True) for i in range(1024)]
    expected = brute_topk(rows, 2, 9)
    top = topk_merge_fast.batch_topk(acts, doc, pos, torch.zeros(1024, dtype=torch.long), counted, 2)
    for neuron in range(9):
        assert [(top.values[r, neuron].item(), top.doc[r, neuron].item()) for r in range(2)] == [
            (c[0], c[1]) for c in expected[neuron]
        ]


def test_fast_kernels_match_the_reference():
    from patchscope.kernels import topk_merge, topk_merge_fast

    gen = torch.Generator().manual_seed(7)
    for tokens, k, clean in (
        (1024, 20, False),
        (1029, 20, False),
        (1029, 20, True),
        (37, 20, False),
        (300, 3, True),
        (12, 5, False),
    ):
        acts = torch.randn(tokens, 33, generator=gen)
        if not clean:  # the clean cases take the CPU path that skips inf/nan handling
            acts[torch.rand(tokens, 33, generator=gen) < 0.01] = float("inf")
            acts[torch.rand(tokens, 33, generator=gen) < 0.01] = float("nan")
            acts[:, 5] = float("-inf")  # a neuron that never has a finite value
        doc = torch.arange(tokens) // 10
        pos = torch.arange(tokens) % 10
        tok = torch.randint(0, 99, (tokens,), generator=gen)
        counted = torch.rand(tokens, generator=gen) > 0.1
        ref = topk_merge.batch_topk(acts, doc, pos, tok, counted, k)
        fast = topk_merge_fast.batch_topk(acts, doc, pos, tok, counted, k)
        for name in ("values", "doc", "pos", "token"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), (tokens, k, name)
        ref_m, fast_m = topk_merge.batch_moments(acts, counted), topk_merge_fast.batch_moments(acts, counted)
        for name in ("fire_count", "nonfinite", "n_tokens"):
            assert torch.equal(getattr(fast_m, name), getattr(ref_m, name)), name
        torch.testing.assert_close(fast_m.total, ref_m.total, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fast_m.total_sq, ref_m.total_sq, rtol=1e-5, atol=1e-4)
        if not clean:
            assert fast.doc[:, 5].eq(-1).all()


def test_fast_kernel_scratch_buffer_for_half_precision():
    from patchscope.kernels import topk_merge, topk_merge_fast

    gen = torch.Generator().manual_seed(9)
    acts = torch.randn(200, 17, generator=gen).to(torch.bfloat16)
    doc, pos, tok = torch.arange(200) // 10, torch.arange(200) % 10, torch.arange(200)
    counted = torch.ones(200, dtype=torch.bool)
    scratch = torch.full((5000,), 123.0)
    candidates, moments = topk_merge_fast.batch_stats(acts, doc, pos, tok, counted, 4, scratch)
    top = topk_merge.merge_topk(TopK.empty(4, 17), candidates)
    ref = topk_merge.batch_topk(acts, doc, pos, tok, counted, 4)
    assert torch.equal(top.values, ref.values) and torch.equal(top.doc, ref.doc) and torch.equal(top.pos, ref.pos)
    torch.testing.assert_close(moments.total, topk_merge.batch_moments(acts, counted).total, rtol=1e-5, atol=1e-4)


def test_fast_merge_matches_the_reference_merge():
    from patchscope.kernels import topk_merge, topk_merge_fast

    gen = torch.Generator().manual_seed(12)
    parts = []
    for _ in range(5):
        acts = ((torch.randn(300, 11, generator=gen) * 8).round() / 8).to(torch.bfloat16)  # small tie groups at the top
        doc = torch.randperm(10_000, generator=gen)[:300]
        parts.append(
            topk_merge_fast.batch_stats(acts, doc, torch.arange(300), torch.arange(300), torch.ones(300, dtype=torch.bool), 6)[0]
        )
    state = TopK.empty(6, 11)
    fast, ref = topk_merge_fast.merge_topk_fast(state, *parts), topk_merge.merge_topk(state, *parts)
    for name in ("values", "doc", "pos", "token"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name


def _identical_documents(copies: int, length: int, n: int, dtype=torch.float32, seed: int = 21):
    """One document's activations repeated ``copies`` times: every value ties ``copies`` ways."""
    gen = torch.Generator().manual_seed(seed)
    one = torch.randn(length, n, generator=gen).to(dtype)  # [pos, n]
    acts = one.repeat(copies, 1)  # [copies * pos, n]
    doc = torch.randperm(1000, generator=gen)[:copies].repeat_interleave(length)  # documents out of order
    pos = torch.arange(length).repeat(copies)
    token = torch.randint(0, 99, (length,), generator=gen).repeat(copies)
    return acts, doc, pos, token, pos > 0


def test_thirty_identical_documents_rank_exactly_inside_a_batch():
    """More than TIE_MARGIN + 1 rows tie at the k-th value: the overflowing neurons fall back to the reference."""
    from patchscope.kernels import topk_merge, topk_merge_fast

    for dtype, length in ((torch.float32, 40), (torch.bfloat16, 40), (torch.float32, 3)):
        acts, doc, pos, token, counted = _identical_documents(30, length, 13, dtype)
        for k in (1, 5, 20):
            ref = topk_merge.batch_topk(acts, doc, pos, token, counted, k)
            fast = topk_merge_fast.batch_topk(acts, doc, pos, token, counted, k)
            for name in ("values", "doc", "pos", "token"):
                assert torch.equal(getattr(fast, name), getattr(ref, name)), (dtype, length, k, name)


def test_thirty_identical_documents_rank_exactly_across_merges():
    """The same tie overflow across batches: 30 batches holding one copy each, merged at once."""
    from patchscope.kernels import topk_merge, topk_merge_fast

    acts, doc, pos, token, counted = _identical_documents(30, 16, 9)
    state, parts = TopK.empty(20, 9), []
    state_ref = state
    for copy in range(30):
        rows = slice(copy * 16, (copy + 1) * 16)
        parts.append(topk_merge_fast.batch_stats(acts[rows], doc[rows], pos[rows], token[rows], counted[rows], 20)[0])
        state_ref = topk_merge.merge_topk(
            state_ref, topk_merge.batch_topk(acts[rows], doc[rows], pos[rows], token[rows], counted[rows], 20)
        )
    fast = topk_merge_fast.merge_topk_fast(state, *parts)
    whole = topk_merge.batch_topk(acts, doc, pos, token, counted, 20)
    for name in ("values", "doc", "pos", "token"):
        assert torch.equal(getattr(fast, name), getattr(whole, name)), name
        assert torch.equal(getattr(state_ref, name), getattr(whole, name)), name


def _reduction_cases(seed: int = 7):
    """Batches with inf/nan, a never-finite neuron, uncounted rows, partial last blocks and 30-way ties."""
    gen = torch.Generator().manual_seed(seed)
    for tokens, k, n, dtype in (
        (1024, 20, 33, torch.float32),
        (1029, 20, 130, torch.bfloat16),
        (37, 20, 33, torch.float32),
        (300, 3, 40, torch.bfloat16),
        (5, 2, 7, torch.float32),
    ):
        acts = torch.randn(tokens, n, generator=gen).to(dtype)
        acts[torch.rand(tokens, n, generator=gen) < 0.01] = float("inf")
        acts[torch.rand(tokens, n, generator=gen) < 0.01] = float("nan")
        acts[:, 5] = float("-inf")  # a neuron that never has a finite value
        doc, pos = torch.arange(tokens) // 10, torch.arange(tokens) % 10
        yield acts, doc, pos, torch.randint(0, 99, (tokens,), generator=gen), torch.rand(tokens, generator=gen) > 0.1, k
    for dtype in (torch.float32, torch.bfloat16):
        yield (*_identical_documents(30, 40, 13, dtype), 20)


def _assert_reduction_matches_reference(reduce) -> None:
    """``reduce(acts, doc, pos, token, counted, k) -> (candidates, moments)`` against the plain reference."""
    from patchscope.kernels import topk_merge

    for acts, doc, pos, token, counted, k in _reduction_cases():
        candidates, moments = reduce(acts, doc, pos, token, counted, k)
        top = topk_merge.merge_topk(TopK.empty(k, acts.shape[1]), candidates)
        ref, ref_m = topk_merge.batch_topk(acts, doc, pos, token, counted, k), topk_merge.batch_moments(acts, counted)
        for name in ("values", "doc", "pos", "token"):
            assert torch.equal(getattr(top, name), getattr(ref, name)), (acts.shape, acts.dtype, name)
        for name in ("fire_count", "nonfinite", "n_tokens"):
            assert torch.equal(getattr(moments, name), getattr(ref_m, name)), (acts.shape, name)
        torch.testing.assert_close(moments.total, ref_m.total, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(moments.total_sq, ref_m.total_sq, rtol=1e-5, atol=1e-4)


def test_fused_pass_and_candidate_selection_match_the_reference():
    """`block_pass` uncompiled, then `exact_candidates`: the logic every fused backend shares."""
    from patchscope.kernels import fused

    _assert_reduction_matches_reference(lambda *a: fused.batch_stats(*a, backend="eager"))
    _assert_pieces_match_reference("eager")


def _pieces_cases():
    """The reduction cases, and more: fp16, a strided (transposed) batch, signed zeros tied with zeros."""
    yield from _reduction_cases()
    gen = torch.Generator().manual_seed(3)
    acts = (torch.randn(517, 70, generator=gen) * 4).round().to(torch.float16)
    acts[::7, 3] = float("-inf")
    acts[1::5, 4] = float("nan")
    acts[:, 6] = torch.where(torch.arange(517) % 2 == 0, 0.0, -0.0).to(torch.float16)  # 0.0 and -0.0 tie
    doc, pos = torch.arange(517).flip(0) // 9, torch.arange(517) % 9  # documents in falling order
    counted = torch.rand(517, generator=gen) > 0.1
    yield acts, doc, pos, torch.arange(517), counted, 20
    strided = torch.randn(70, 300, generator=gen).round().T  # [300, 70], stride (1, 300)
    yield strided, torch.arange(300) // 4, torch.arange(300) % 4, torch.arange(300), torch.ones(300, dtype=torch.bool), 5


def _assert_pieces_match_reference(backend: str) -> None:
    """`fused.fused_pieces` (top-k, bottom-k, moments, histogram) against every plain reference."""
    from patchscope.atlas.stats import TokenFields
    from patchscope.kernels import bottomk, fused, histogram, topk_merge

    for acts, doc, pos, token, counted, k in _pieces_cases():
        pieces = fused.fused_pieces(acts, TokenFields(doc, pos, token, counted), k, k, True, backend)
        top = topk_merge.merge_topk(TopK.empty(k, acts.shape[1]), pieces.top)
        bottom = bottomk.merge_bottomk(bottomk.empty_bottomk(k, acts.shape[1]), pieces.bottom)
        want_top = topk_merge.batch_topk(acts, doc, pos, token, counted, k)
        want_bottom = bottomk.batch_bottomk(acts, doc, pos, token, counted, k)
        for name in ("values", "doc", "pos", "token"):
            assert torch.equal(getattr(top, name), getattr(want_top, name)), (acts.shape, acts.dtype, name)
            assert torch.equal(getattr(bottom, name), getattr(want_bottom, name)), (acts.shape, acts.dtype, name)
        assert torch.equal(pieces.histogram, histogram.batch_histogram_reference(acts, counted)), (acts.shape, acts.dtype)
        want = topk_merge.batch_moments(acts, counted)
        for name in ("fire_count", "nonfinite", "n_tokens"):
            assert torch.equal(getattr(pieces.moments, name), getattr(want, name)), (acts.shape, name)
        torch.testing.assert_close(pieces.moments.total, want.total, rtol=1e-5, atol=1e-4)


def test_inductor_fused_pass_matches_the_reference():
    """The same pass compiled by torch.compile (C++ from inductor on the CPU); one graph for every length."""
    from patchscope.kernels import fused

    _assert_reduction_matches_reference(lambda *a: fused.batch_stats(*a, backend="inductor"))


TRITON_CHECK = """
import torch
from patchscope.kernels import fused
assert fused.resolve_backend("auto", torch.device("cpu")) == "eager"  # Triton is dispatched on CUDA only
import test_kernels
test_kernels._assert_reduction_matches_reference(lambda *a: fused.batch_stats(*a, backend="triton"))
test_kernels._assert_pieces_match_reference("triton")
test_kernels._assert_offsets_past_two_to_the_31_are_read()
print("triton kernel matches the reference")
"""


def _assert_offsets_past_two_to_the_31_are_read() -> None:
    """A row whose offset passes 2**31 elements (a batch over ~233k tokens at d_mlp 9,216) is read where it is.

    The storage is reserved, not touched (about 0.3 GB resident): only 3 rows of 128 are written. With
    int32 offsets the interpreter's read wraps around and the process dies (measured: SIGSEGV).
    """
    from patchscope.atlas.stats import TokenFields
    from patchscope.kernels import fused, topk_merge

    stride = 2**30 + 128  # row 2 starts at element 2**31 + 256
    acts = torch.empty(2 * stride + 128, dtype=torch.float16).as_strided((3, 128), (stride, 1))
    acts.copy_(torch.randn(3, 128).half())
    doc, pos, counted = torch.arange(3), torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool)
    pieces = fused.fused_pieces(acts, TokenFields(doc, pos, doc, counted), 2, 0, False, "triton")
    top = topk_merge.merge_topk(TopK.empty(2, 128), pieces.top)
    want = topk_merge.batch_topk(acts, doc, pos, doc, counted, 2)
    assert torch.equal(top.values, want.values) and torch.equal(top.doc, want.doc)


def test_triton_kernel_matches_the_reference_under_the_interpreter():
    """The CUDA kernel, run by Triton's CPU interpreter (its own process: the flag is read at import)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("triton", reason="pip install -e '.[triton]' (CI installs it so that this test runs)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "matches the reference" in done.stdout
