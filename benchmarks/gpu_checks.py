"""Correctness on the device, for `benchmarks.gpu`: hooks, the Triton pass, `profile`, a patch under a KV cache.

Every check builds the same seeded tiny Gemma-2 in float32 on the CPU and copies it to the device,
so the CPU and device runs share their weights exactly.
"""

from __future__ import annotations

import copy
import os

import torch

from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.stats import TokenFields, TopK
from patchscope.kernels.topk_merge import merge_topk
from patchscope.model.hooks import capture, patch

from .common import build_model, random_batches, word_texts, word_tokenizer
from .gpu_plan import Plan, Row

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Largest error allowed against float32 on the CPU, relative to the reference's largest magnitude."""


def _reference():
    return build_model("tiny", layers=None, dtype=torch.float32, device="cpu", seed=5)


def _on(model, device: str, dtype: torch.dtype):
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def hook_parity(plan: Plan) -> list[Row]:
    """Captured sites equal HF's own hidden states in the same dtype, and float32 within tolerance."""
    reference, rows = _reference(), []
    ids = random_batches(1, 4, 32, reference.config.vocab_size, "cpu")[0]
    sites = ["blocks.1.hook_resid_pre", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"]
    with capture(reference, sites) as want, torch.inference_mode():
        reference(ids)
    for dtype in plan.dtypes:
        model = _on(reference, plan.device, dtype)
        with capture(model, sites) as got, torch.inference_mode():
            hidden = model(ids.to(plan.device), output_hidden_states=True).hidden_states
        same = torch.equal(got[sites[0]], hidden[1]) and torch.equal(got[sites[2]], hidden[2])
        name = str(dtype).removeprefix("torch.")
        rows.append(Row("hook parity", f"{name}: resid_pre/resid_post == output_hidden_states", ok=same))
        for site in sites:
            error = _relative_error(got[site], want[site])
            rows.append(Row("hook parity", f"{name} vs float32 CPU: {site}", error, "max rel. error", error <= TOLERANCE[dtype]))
    return rows


def _fields(tokens: int, device: str) -> TokenFields:
    generator = torch.Generator().manual_seed(1)
    doc = torch.arange(tokens) // 64
    counted = torch.rand(tokens, generator=generator) > 0.05
    token = torch.randint(4, 1000, (tokens,), generator=generator)
    return TokenFields(doc.to(device), (torch.arange(tokens) % 64).to(device), token.to(device), counted.to(device))


def triton_pass(plan: Plan) -> list[Row]:
    """The Triton block pass against the eager reference on bf16 and fp16 batches with many exact ties."""
    from patchscope.kernels.fused import batch_stats, triton_available

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not triton_available() or (plan.device == "cpu" and not interpreted):
        why = "triton is not installed" if not triton_available() else "on the CPU it runs only under TRITON_INTERPRET=1"
        return [Row("triton pass", "Triton block pass vs eager", note=f"skipped: {why}")]
    rows, tokens = [], 512 if plan.dry_run else 4096
    fields = _fields(tokens, plan.device)
    for dtype in plan.dtypes:
        generator = torch.Generator().manual_seed(2)
        acts = (torch.randn(tokens, 300, generator=generator) * 4).round().to(dtype).to(plan.device)  # exact ties
        empty = TopK.empty(20, 300, plan.device)
        results = {}
        for backend in ("triton", "eager"):
            top, moments = batch_stats(acts, fields.doc, fields.pos, fields.token, fields.counted, 20, backend=backend)
            results[backend] = (merge_topk(empty, top), moments)
        (top_t, m_t), (top_e, m_e) = results["triton"], results["eager"]
        same_top = all(torch.equal(getattr(top_t, f), getattr(top_e, f)) for f in ("values", "doc", "pos", "token"))
        same_moments = torch.equal(m_t.fire_count, m_e.fire_count) and torch.allclose(m_t.total, m_e.total, rtol=1e-6, atol=1e-3)
        name = str(dtype).removeprefix("torch.")
        rows.append(Row("triton pass", f"{name}: top-k (ties included) and moments equal eager", ok=same_top and same_moments))
    return rows


def _texts(vocab: int) -> list[str]:
    return word_texts(random_batches(6, 8, 48, vocab, "cpu", seed=4))


def _differing_slots(got: TopK, want: TopK, tolerance: float) -> tuple[int, float]:
    """Slots whose (doc, pos) differ where the reference's neighbours are more than twice ``tolerance``
    apart (closer ones may tie or swap under another rounding), and the largest value difference."""
    values = want.values
    gap_up = torch.cat([torch.full_like(values[:1], float("inf")), values[:-1] - values[1:]])
    gap_down = torch.cat([values[:-1] - values[1:], torch.full_like(values[:1], float("inf"))])
    clear = (gap_up > 2 * tolerance) & (gap_down > 2 * tolerance)
    moved = (got.doc != want.doc) | (got.pos != want.pos)
    return int((moved & clear).sum()), float((got.values - want.values).abs().max())


def profile_parity(plan: Plan) -> list[Row]:
    """`profile` on the device against the CPU atlas of the same weights and texts."""
    reference, rows = _reference(), []
    tokenizer, texts = word_tokenizer(reference.config.vocab_size), _texts(reference.config.vocab_size)
    config = ProfileConfig(layer=2, top_k=8, max_length=48, batch_tokens=96, checkpoint_every=0)
    site = "blocks.2.mlp.hook_post"
    want = profile(reference, tokenizer, texts, config, progress=False)[site].top
    scale = float(want.values.abs().max())
    for dtype in (torch.float32, *plan.dtypes):
        got = profile(_on(reference, plan.device, dtype), tokenizer, texts, config, progress=False)[site].top
        tolerance = TOLERANCE[dtype] * scale
        moved, worst = _differing_slots(got, want, tolerance)
        name = str(dtype).removeprefix("torch.")
        rows.append(
            Row("profile parity", f"{name} on {plan.device}: slots whose document/position differ", moved, "slots", moved == 0)
        )
        rows.append(Row("profile parity", f"{name} on {plan.device}: largest value difference", worst, "abs", worst <= tolerance))
    return rows


def cached_patch(plan: Plan) -> list[Row]:
    """A patched greedy generation with the KV cache equals the same generation without it."""
    model = _on(_reference(), plan.device, torch.float32)
    generator = torch.Generator().manual_seed(6)
    ids = random_batches(1, 2, 12, model.config.vocab_size, "cpu", seed=6)[0].to(plan.device)
    vector = (torch.randn(model.config.hidden_size, generator=generator) * 8).to(plan.device)
    outputs = {}
    for cached in (True, False):
        with patch(model, "blocks.1.hook_resid_pre", vector, positions=[5]), torch.inference_mode():
            outputs[cached] = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=cached, pad_token_id=0
            )
    with torch.inference_mode():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    same = torch.equal(outputs[True], outputs[False])
    changed = not torch.equal(outputs[True], plain)
    note = "" if changed else "the patch did not change the greedy tokens: the check is weak"
    return [Row("cached patch", "patched generation: cached == uncached (float32, greedy)", ok=same, note=note)]
