"""Speed on the device, for `benchmarks.gpu`: one site against its floor and peers, and the whole model in one pass."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from patchscope.atlas.engine import Profiler
from patchscope.atlas.profile_config import ProfileConfig

from .common import build_model, interleaved, random_batches
from .floor import profiler_run, whole_call
from .gpu_plan import Plan, Row
from .profiling import _segments, bare_truncated, nnsight_stop, tl_best, transformer_lens_bridge

PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
"""Dense bf16/fp16 tensor-core peaks from the vendors' data sheets (SXM parts; no sparsity)."""


def _free(*models) -> None:
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _peers(model, batches, layer: int) -> tuple[dict[str, Callable[[], None]], list[Row]]:
    site = f"blocks.{layer}.mlp.hook_post"
    peers = {
        "floor: bare forward, decoder cut after the layer": bare_truncated(model, batches, layer),
        "profiler, steady state, defaults (top-k, moments, bottom-k, histogram)": profiler_run(model, batches, layer),
        "profiler, steady state, top-k and moments only": profiler_run(model, batches, layer, extras=False),
        "whole call: patchscope.profile(texts), defaults": whole_call(model, batches, layer),
    }
    skipped = []
    bridge = transformer_lens_bridge(model)
    if bridge is not None:
        peers["TransformerLens run_with_cache, names_filter + stop_at_layer"] = tl_best(bridge, batches, layer, site)
    else:
        skipped.append(Row("speed", "TransformerLens", note="skipped: transformer_lens is not installed"))
    nnsight = nnsight_stop(model, batches, layer)
    if nnsight is not None:
        peers["nnsight trace, .input.save() + tracer.stop()"] = nnsight
    else:
        skipped.append(Row("speed", "nnsight", note="skipped: nnsight is not installed"))
    return peers, skipped


def single_site(plan: Plan) -> list[Row]:
    """One layer's MLP neurons: the profiler (steady state and as a whole call) and its peers against the floor."""
    rows: list[Row] = []
    tokens = plan.n_batches * plan.batch * plan.seq_len
    for dtype in plan.dtypes:
        model = build_model(plan.shape, layers=None, dtype=dtype, device=plan.device)
        batches = random_batches(plan.n_batches, plan.batch, plan.seq_len, model.config.vocab_size, plan.device)
        peers, skipped = _peers(model, batches, plan.layer)
        timings = interleaved(
            {k: (fn, tokens) for k, fn in peers.items()}, warmup=plan.warmup, runs=plan.runs, device=plan.device, memory=False
        )
        floor = timings["floor: bare forward, decoder cut after the layer"].median
        for name, timing in timings.items():
            note = f"{floor / timing.median:.3f}x floor; median of {len(timing.seconds)} runs ({min(timing.seconds):.3f}-{max(timing.seconds):.3f} s)"
            rows.append(Row("speed", f"{_name(dtype)}, layer {plan.layer}: {name}", timing.tokens_per_s, "tokens/s", note=note))
        rows += skipped
        _free(model)
    return rows


def _flops_per_token(model, seq_len: int) -> float:
    """2 x the decoder's weights per token, plus the attention products over ``seq_len`` keys (eager
    attention computes every query-key pair); embeddings and the LM head are not run by the profiler."""
    config = model.config
    weights = sum(p.numel() for p in model.model.layers.parameters())
    attention = 2 * 2 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 2.0 * weights + attention


def _peak(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def whole_model(plan: Plan) -> list[Row]:
    """Every layer's MLP neurons profiled in one pass with the default statistics, against the full decoder."""
    dtype = plan.dtypes[0]
    model = build_model(plan.shape, layers=None, dtype=dtype, device=plan.device)
    n_layers = model.config.num_hidden_layers
    batches = random_batches(plan.n_batches, plan.batch, plan.seq_len, model.config.vocab_size, plan.device)
    sites = tuple(f"blocks.{i}.mlp.hook_post" for i in range(n_layers))
    profiler = Profiler(model, ProfileConfig(sites=sites, checkpoint_every=0))
    planned = _segments(batches)

    def every_layer() -> None:
        for rows in planned:
            profiler.fold(rows, pad_id=0)
        profiler.flush()

    tokens = plan.n_batches * plan.batch * plan.seq_len
    if plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    peers = {"all layers": (every_layer, tokens), "floor": (bare_truncated(model, batches, n_layers - 1), tokens)}
    timings = interleaved(peers, warmup=plan.warmup, runs=plan.runs, device=plan.device, memory=False)
    rate, floor_rate = timings["all layers"].tokens_per_s, timings["floor"].tokens_per_s
    label = f"{_name(dtype)}, {n_layers} layers x {model.config.intermediate_size} neurons in one pass"
    rows = [
        Row("whole model", f"{label}: profiler", rate, "tokens/s", note=f"{rate / floor_rate:.3f}x the full decoder's forward"),
        Row("whole model", f"{_name(dtype)}: full decoder forward (its floor)", floor_rate, "tokens/s"),
        Row("whole model", f"{label}: projected time for 10M tokens", 1e7 / rate / 3600, "hours"),
    ]
    peak = _peak(plan.device)
    flops = _flops_per_token(model, plan.seq_len)
    mfu = Row("whole model", f"{label}: MFU", None if peak is None else rate * flops / peak, "fraction of peak")
    mfu.note = f"{flops / 1e9:.2f} GFLOP/token" + ("" if peak else "; peak unknown for this device")
    rows.append(mfu)
    if plan.device.startswith("cuda"):
        rows.append(Row("whole model", f"{label}: peak memory", torch.cuda.max_memory_allocated() / 2**30, "GiB"))
    _free(model)
    return rows


def gpu_paths(plan: Plan) -> list[Row]:
    """The GPU path's own figures (`benchmarks.gpu_paths`): per-site reduction time against one layer's
    forward, host reads and aten ops per fold, the whole-model pass and the compile count."""
    from .gpu_paths import measure

    rows = []
    for found in measure(plan.device, plan.dtypes[0], plan.dry_run):
        fields = {key: value for key, value in found.items() if key != "note"}
        rows.append(
            Row("gpu paths", ", ".join(f"{key} {value}" for key, value in fields.items()), note=str(found.get("note", "")))
        )
    return rows
