"""RESULTS.md from the benchmark JSON: one section per (device, dtype, shape), conditions on every table."""

from __future__ import annotations

from typing import Any

FLOOR_PREFIX = "bare HF forward, decoder cut after layer"
OURS = "patchscope profiler (top-k atlas update included)"


def _conditions(c: dict[str, Any]) -> str:
    hw = f"GPU {c['gpu']}, CUDA {c['cuda']}" if c.get("gpu") else f"CPU {c['machine']}, {c['cpu_threads']} torch threads"
    return (
        f"_Conditions: {hw}; **{c['dtype']}**; torch {c['torch_version']}, transformers {c['transformers']}; model `{c['shape']}` "
        f"(d_model {c['d_model']}, d_mlp {c['d_mlp']}, {c['n_layers']} layers, vocab {c['vocab']}); profiled layer {c['layer']}; "
        f"batch {c['batch']} x {c['seq_len']} tokens; {c['warmup']} warm-up, {c['runs']} timed runs; median (min-max)._"
    )


def _fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _throughput(section: dict) -> list[str]:
    rows = section["throughput"]
    floor = next(v for k, v in rows.items() if k.startswith(FLOOR_PREFIX))
    ours = rows[OURS]
    lines = [
        "| peer | tokens/s | time per run, s | vs floor (tokens/s ratio) | ours is faster by | peak memory, MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in rows.items():
        lines.append(
            f"| {name} | {_fmt(t['tokens_per_s'])} | {t['median_s']:.3f} ({t['min_s']:.3f}-{t['max_s']:.3f}) | "
            f"{t['tokens_per_s'] / floor['tokens_per_s']:.3f} | {ours['tokens_per_s'] / t['tokens_per_s']:.2f}x | {t['peak_mb']} |"
        )
    return lines


def _sweep(section: dict) -> list[str]:
    lines = [
        "| batch | seq len | ours tokens/s | floor tokens/s | ours / floor | ours peak MiB | floor peak MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in section["sweep"]:
        lines.append(
            f"| {r['batch']} | {r['seq_len']} | {_fmt(r['ours']['tokens_per_s'])} | {_fmt(r['floor']['tokens_per_s'])} | {r['ratio']:.3f} | "
            f"{r['ours']['peak_mb']} | {r['floor']['peak_mb']} |"
        )
    return lines


def _scaling(section: dict) -> list[str]:
    lines = ["| batches | tokens | time, s | tokens/s | peak memory, MiB |", "|---:|---:|---:|---:|---:|"]
    for r in section["scaling"]:
        lines.append(
            f"| {r['batches']} | {r['tokens']} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {_fmt(r['tokens_per_s'])} | {r['peak_mb']} |"
        )
    return lines


def _padding(section: dict) -> list[str]:
    p = section["padding"]
    lines = [
        f"{p['documents']} documents of {p['min_len']}-{p['max_len']} tokens ({p['real_tokens']} real tokens); tokens/s count real tokens only.",
        "",
        "| batching | batches | padding fraction | ours tokens/s | floor tokens/s (same batches) | ours / floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in p["plans"].items():
        lines.append(
            f"| {name} | {r['batches']} | {r['padding_fraction']:.3f} | {_fmt(r['ours']['tokens_per_s'])} "
            f"| {_fmt(r['floor']['tokens_per_s'])} | {r['ratio']:.3f} |"
        )
    return lines


def _cell(v: dict | None) -> str:
    if not v:
        return "-"
    return f"{v['extra_ms']:+.1f} ms ({v['ratio']:.2f}x)"


def _hooks(section: dict) -> list[str]:
    base, *rows = section["hook_cost"]
    tl = f", TransformerLens forward {base['tl_forward_ms']} ms" if "tl_forward_ms" in base else ""
    lines = [
        f"Unhooked: HF forward {base['hf_forward_ms']} ms{tl}. Cells: extra time over the unhooked forward of the same framework (ratio).",
        "",
        "| site | ours: capture | ours: patch 1 position | TL: run_with_cache filter | TL: run_with_hooks patch |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['site']} | {_cell(r.get('ours_capture'))} | {_cell(r.get('ours_patch'))} | {_cell(r.get('tl_capture'))} | {_cell(r.get('tl_patch'))} |"
        )
    return lines


def _generation(section: dict) -> list[str]:
    lines = [
        "| batch | new tokens | plain HF generate, tok/s | inject unpatched (observing), tok/s | inject patched, tok/s | patched / plain time |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in section["generation"]:
        lines.append(
            f"| {r['batch']} | {r['new_tokens']} | {_fmt(r['plain']['tokens_per_s'], 1)} | {_fmt(r['unpatched']['tokens_per_s'], 1)} | "
            f"{_fmt(r['patched']['tokens_per_s'], 1)} | {r['ratio']:.2f} |"
        )
    return lines


def render(results: dict[str, dict]) -> str:
    out = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks --record` (see `benchmarks/__main__.py --help`). Every ratio compares runs made in the same",
        "process on identical weights; peers that wrap modules (TransformerLens, nnsight) get a deep copy. Random-weight models",
        "built from `Gemma2Config` give true throughput for their shape. CPU peak memory is the sampled RSS rise during one run",
        "(0 means the run fit in memory the process already held, so it shows only large new allocations such as full-vocabulary",
        "logits); CUDA peak memory is the allocator's peak above the level before the run.",
        "",
    ]
    if not any(key.startswith("cuda") for key in results):
        out += [
            "**No GPU results yet.** The machine these were recorded on has no GPU and none was lent to this task. On a CUDA",
            "machine, `python -m benchmarks --device cuda --record` runs the gemma-2-2b-shape model in fp16 and bf16 and adds its sections here.",
            "",
        ]
    for key, section in results.items():
        c = section["conditions"]
        out += [f"## {key}", "", _conditions(c), ""]
        if "throughput" in section:
            out += ["### Profiling throughput", "", *_throughput(section), ""]
        if "sweep" in section:
            out += ["### Batch size and sequence length", "", *_sweep(section), ""]
        if "padding" in section:
            out += ["### Documents of varied length: padding", "", *_padding(section), ""]
        if "scaling" in section:
            out += ["### Growing the dataset (our profiler)", "", *_scaling(section), ""]
        if "hook_cost" in section:
            out += [
                f"### Hook cost (one forward, layer {c['layer']}, batch {c['batch']} x {c['seq_len']})",
                "",
                *_hooks(section),
                "",
            ]
        if "sae" in section:
            s = section["sae"]
            out += [
                "### JumpReLU SAE encode",
                "",
                f"d_model {s['d_model']}, d_sae {s['d_sae']}, {s['batch_vectors']} vectors per call: **{_fmt(s['vectors_per_s'])} vectors/s** "
                f"({s['median_s'] * 1000:.1f} ms per call, {s['min_s'] * 1000:.1f}-{s['max_s'] * 1000:.1f})",
                "",
            ]
        if "generation" in section:
            out += ["### Patchscope generation (`inject`, greedy, KV cache)", "", *_generation(section), ""]
        for note in section.get("notes", []):
            out.append(f"- note: {note}")
        out += [f"_Suite time for this section: {section.get('suite_seconds')} s._", ""]
    return "\n".join(out)
