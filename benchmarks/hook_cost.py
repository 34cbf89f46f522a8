"""What hooks cost: one capture, one patch, and every site of every layer, ours against TransformerLens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

from patchscope.model.hooks import capture, patch
from patchscope.model.sites import list_sites

from .common import Timing, interleaved, random_batches
from .profiling import transformer_lens_bridge

SITE_TYPES = ("hook_resid_pre", "mlp.hook_post", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def _ours(model, ids, mode: str, names: list[str]) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            if mode == "none":
                model(input_ids=ids, use_cache=False)
            elif mode == "capture":
                with capture(model, names):
                    model(input_ids=ids, use_cache=False)
            else:
                width = model.config.intermediate_size if names[0].endswith("mlp.hook_post") else model.config.hidden_size
                with patch(model, names[0], torch.ones(width, device=ids.device, dtype=model.dtype), positions=[5]):
                    model(input_ids=ids, use_cache=False)

    return run


def _tl(bridge, ids, mode: str, names: list[str] | None) -> Callable[[], None]:
    def replace(value, hook):
        value = value.clone()
        value[:, 5] = 1.0
        return value

    def run() -> None:
        with torch.inference_mode():
            if mode == "none":
                bridge(ids)
            elif mode == "capture":
                if names is None:
                    bridge.run_with_cache(ids)
                else:
                    bridge.run_with_cache(ids, names_filter=lambda name: name in names)
            else:
                bridge.run_with_hooks(ids, fwd_hooks=[(cast(list[str], names)[0], replace)])  # patch names one site

    return run


def hook_costs(
    model, *, layer: int, batch: int, seq_len: int, warmup: int, runs: int, device: str
) -> tuple[list[dict], list[str]]:
    """Rows of (site, ours capture/patch extra ms, TL capture/patch extra ms), plus the all-sites row."""
    ids = random_batches(1, batch, seq_len, model.config.vocab_size, device)[0]
    tokens = ids.numel()
    bridge = transformer_lens_bridge(model)
    notes = [] if bridge is not None else ["TransformerLens not installed: its columns are empty"]
    peers: dict[str, tuple[Callable[[], None], int]] = {"ours:none": (_ours(model, ids, "none", []), tokens)}
    if bridge is not None:
        peers["tl:none"] = (_tl(bridge, ids, "none", None), tokens)
    for suffix in SITE_TYPES:
        name = f"blocks.{layer}.{suffix}"
        peers[f"ours:capture:{suffix}"] = (_ours(model, ids, "capture", [name]), tokens)
        peers[f"ours:patch:{suffix}"] = (_ours(model, ids, "patch", [name]), tokens)
        if bridge is not None:
            peers[f"tl:capture:{suffix}"] = (_tl(bridge, ids, "capture", [name]), tokens)
            peers[f"tl:patch:{suffix}"] = (_tl(bridge, ids, "patch", [name]), tokens)
    everything = list_sites(model)
    peers["ours:capture:all"] = (_ours(model, ids, "capture", everything), tokens)
    if bridge is not None:
        peers["tl:capture:all"] = (_tl(bridge, ids, "capture", None), tokens)
    timings: dict[str, Timing] = interleaved(peers, warmup=warmup, runs=runs, device=device)

    def extra(key: str, base: str) -> dict | None:
        if key not in timings:
            return None
        t, b = timings[key], timings[base]
        return dict(
            ms=round(1000 * t.median, 2),
            extra_ms=round(1000 * (t.median - b.median), 2),
            ratio=round(t.median / b.median, 3),
            min_ms=round(1000 * min(t.seconds), 2),
            max_ms=round(1000 * max(t.seconds), 2),
            peak_mb=t.peak_mb,
        )

    rows: list[dict[str, Any]] = []
    for suffix in (*SITE_TYPES, "all"):
        row = dict(
            site=suffix if suffix != "all" else f"all {len(everything)} sites (ours) / every TL hook point",
            ours_capture=extra(f"ours:capture:{suffix}", "ours:none"),
            tl_capture=extra(f"tl:capture:{suffix}", "tl:none") if bridge is not None else None,
        )
        if suffix != "all":
            row["ours_patch"] = extra(f"ours:patch:{suffix}", "ours:none")
            row["tl_patch"] = extra(f"tl:patch:{suffix}", "tl:none") if bridge is not None else None
        rows.append(row)
    baseline = {"hf_forward_ms": round(1000 * timings["ours:none"].median, 2)}
    if bridge is not None:
        baseline["tl_forward_ms"] = round(1000 * timings["tl:none"].median, 2)
    rows.insert(0, dict(site="(unhooked forward)", **baseline))
    return rows, notes
