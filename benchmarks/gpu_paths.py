"""The profiler's GPU paths: per-site reduction time against one layer's forward, host syncs, launches, compiles.

``measure(device, dtype, dry_run)`` returns printable rows; ``benchmarks/gpu.py`` prints them. On CUDA it
runs at the gemma-2-2b shape (d_mlp 9,216) at 4,096 and 8,192 tokens per batch; ``dry_run`` runs a
tiny shape at a few hundred tokens, on any device, to check the code (its numbers mean nothing).
What needs CUDA (the Triton pass, CUDA sync counts) is skipped off CUDA, with the reason in the row.

Rows (``kind``):

- ``reduction``: one site's reduction of one batch (`Profiler._reduce`, the hook's whole work) per path,
  against the forward of one decoder layer on the same tokens (``ratio``);
- ``reads``: host reads of device tensors (each a sync on a GPU) and aten ops (about one launch each)
  in one fold of one batch at every MLP site of the model, per batch;
- ``whole model``: tokens/s of one pass that profiles every layer's ``mlp.hook_post``;
- ``compile``: Dynamo frames compiled by a ``--compile`` run over batches of several shapes.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from patchscope.atlas.batching import Segment
from patchscope.atlas.compiled import compiles
from patchscope.atlas.engine import Profiler
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.stats import TokenFields
from patchscope.kernels.fused import triton_available
from patchscope.model.hooks import stop_after

from .common import build_model, random_batches, sync

HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default", "aten.equal.default"}
PATHS = {"triton": "Triton fused pass (auto on CUDA)", "inductor": "inductor fused pass", "separate": "separate eager kernels"}


class _Reads(TorchDispatchMode):
    """Counts aten ops, and host reads of non-CPU tensors (syncs on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if str(func) in HOST_READS and any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
            self.reads[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _median_ms(fn: Callable[[], Any], device: str, runs: int) -> float:
    fn()  # warm-up (and the one-off compile of the inductor path)
    samples = []
    for _ in range(runs):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - started)
    return round(statistics.median(samples) * 1000, 3)


def _segments(ids: torch.Tensor, first_doc: int = 0) -> list[Segment]:
    return [Segment(first_doc + i, 0, tuple(row), 1) for i, row in enumerate(ids.cpu().tolist())]


def _fields(tokens: int, device: str) -> TokenFields:
    index = torch.arange(tokens, device=device)
    return TokenFields(index // 128, index % 128, index % 1000, index % 128 != 0)


def _skip(path: str, device: str) -> str:
    if path == "triton" and not (device.startswith("cuda") and triton_available()):
        return "skipped: the Triton pass needs CUDA and `pip install triton`"
    if path == "inductor" and not device.startswith("cuda"):
        return "skipped: measured on CUDA only (on the CPU `auto` takes the one CPU pass)"
    return ""


def reduction_rows(model, *, device: str, dtype: torch.dtype, token_counts: list[int], runs: int) -> list[dict]:
    """One site's reduction per path, against one decoder layer's forward on the same tokens."""
    site = "blocks.1.mlp.hook_post"
    rows = []
    for tokens in token_counts:
        seq = min(tokens, 128)
        ids = random_batches(1, tokens // seq, seq, model.config.vocab_size, device)[0]
        with torch.inference_mode():
            before = _median_ms(partial(_forward_until, model, ids, "blocks.0.hook_resid_post"), device, runs)
            through = _median_ms(partial(_forward_until, model, ids, "blocks.1.hook_resid_post"), device, runs)
        layer_ms = round(max(through - before, 1e-3), 3)
        acts = torch.randn(tokens, model.config.intermediate_size, device=device).to(dtype)  # [tokens, d_mlp]
        for path, name in PATHS.items():
            row = dict(kind="reduction", path=name, device=device, dtype=str(dtype).removeprefix("torch."), tokens=tokens)
            row.update(d_mlp=acts.shape[1], layer_forward_ms=layer_ms)
            reason = _skip(path, device)
            if reason:
                rows.append({**row, "note": reason})
                continue
            profiler = Profiler(model, ProfileConfig(sites=[site], checkpoint_every=0, reduction=path))  # type: ignore[arg-type]
            profiler._fields = _fields(tokens, device)
            with torch.inference_mode():
                ms = _median_ms(partial(profiler._reduce, site, acts), device, runs)
            rows.append({**row, "reduce_ms_per_site": ms, "ratio_to_layer": round(ms / layer_ms, 2), "note": ""})
    return rows


def _forward_until(model, ids: torch.Tensor, site: str) -> None:
    with stop_after(model, site):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def reads_rows(model, *, device: str, dtype: torch.dtype, tokens: int) -> list[dict]:
    """Host reads and aten ops of one fold (every MLP site) per path, after a warm-up batch."""
    sites = [f"blocks.{i}.mlp.hook_post" for i in range(model.config.num_hidden_layers)]
    seq = min(tokens, 128)
    batches = random_batches(3, tokens // seq, seq, model.config.vocab_size, device)
    rows = []
    for path, name in PATHS.items():
        row = dict(
            kind="reads", path=name, device=device, dtype=str(dtype).removeprefix("torch."), tokens=tokens, sites=len(sites)
        )
        reason = _skip(path, device)
        if reason:
            rows.append({**row, "note": reason})
            continue
        profiler = Profiler(model, ProfileConfig(sites=tuple(sites), checkpoint_every=0, reduction=path))  # type: ignore[arg-type]
        profiler.fold(_segments(batches[0]), pad_id=0)  # warm-up: the first batch fills the state
        with _Reads() as counter:
            for b, ids in enumerate(batches[1:], start=1):
                profiler.fold(_segments(ids, b * len(ids)), pad_id=0)
        per_batch = len(batches) - 1
        reads = sum(counter.reads.values()) / per_batch
        rows.append({**row, "host_reads_per_batch": reads, "aten_ops_per_batch": counter.ops / per_batch, "note": ""})
    return rows


def whole_model_row(model, *, device: str, dtype: torch.dtype, tokens: int, runs: int) -> dict:
    """Tokens/s of one profiling pass over every layer's mlp.hook_post (the model's whole depth)."""
    sites = [f"blocks.{i}.mlp.hook_post" for i in range(model.config.num_hidden_layers)]
    seq = min(tokens, 128)
    batches = random_batches(2, tokens // seq, seq, model.config.vocab_size, device)
    profiler = Profiler(model, ProfileConfig(sites=tuple(sites), checkpoint_every=0))

    def run() -> None:
        for b, ids in enumerate(batches):
            profiler.fold(_segments(ids, b * len(ids)), pad_id=0)

    ms = _median_ms(run, device, runs)
    row = dict(kind="whole model", path="defaults, every mlp.hook_post", device=device, dtype=str(dtype).removeprefix("torch."))
    return {**row, "tokens": tokens, "sites": len(sites), "tokens_per_s": round(2 * tokens / (ms / 1000), 1), "note": ""}


def compile_row(model, *, device: str, dtype: torch.dtype, seq_lens: list[int]) -> dict:
    """Dynamo frames compiled by a --compile profiler over batches of several shapes (1-row ones included)."""
    profiler = Profiler(model, ProfileConfig(layer=model.config.num_hidden_layers - 1, checkpoint_every=0, compile=True))
    before = compiles()
    for b, seq in enumerate(seq_lens):
        rows = 1 if b % 2 else 4
        ids = random_batches(1, rows, seq, model.config.vocab_size, device, seed=b)[0]
        profiler.fold(_segments(ids, b * 8), pad_id=0)
    row = dict(kind="compile", path="--compile, layers before the site", device=device, dtype=str(dtype).removeprefix("torch."))
    return {**row, "batch_shapes": len(seq_lens), "dynamo_frames": compiles() - before, "note": "limit: 8 per code object"}


def measure(device: str, dtype: torch.dtype, dry_run: bool) -> list[dict]:
    """Every row above; ``dry_run``: the tiny shape, 2 layers, a few hundred tokens, one timed run."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return [dict(kind="all", device=device, note="skipped: CUDA is not available here")]
    shape, layers = ("tiny", 2) if dry_run else ("gemma-2-2b-shape", None)
    model = build_model(shape, layers=layers, dtype=dtype, device=device)
    two_layers = build_model(shape, layers=2, dtype=dtype, device=device) if not dry_run else model
    tokens = [256] if dry_run else [4096, 8192]
    runs = 1 if dry_run else 5
    rows = reduction_rows(two_layers, device=device, dtype=dtype, token_counts=tokens, runs=runs)
    rows += reads_rows(model, device=device, dtype=dtype, tokens=tokens[0])
    rows.append(whole_model_row(model, device=device, dtype=dtype, tokens=tokens[0], runs=runs))
    if dry_run:  # inductor takes minutes on a CPU; tests/test_compile.py covers the recompile count there
        rows.append(dict(kind="compile", device=device, note="skipped in --dry-run: tests/test_compile.py counts the frames"))
    else:
        rows.append(compile_row(two_layers, device=device, dtype=dtype, seq_lens=[128, 256, 512, 384]))
    return rows


if __name__ == "__main__":
    import sys

    chosen = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    for line in measure(chosen, torch.bfloat16, dry_run=chosen == "cpu"):
        print(line)
