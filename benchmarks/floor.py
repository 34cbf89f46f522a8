"""How close the profiler gets to the bare forward, per reduction backend and with ``--compile``.

    python -m benchmarks.floor                      # CPU, `small` shape, float32 and bfloat16
    python -m benchmarks.floor --device cuda        # adds the Triton reduction; gemma-2-2b shape

Every variant sees the same batches and weights, and all are timed round-robin in one process
(`common.interleaved`), so load from other processes hits them alike. Compile time is measured
separately: the first call of each compiled variant, before the timed runs.
Results go to ``benchmarks/floor.json``; `render` turns them into the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch

from patchscope.atlas.engine import Profiler
from patchscope.atlas.profile_config import ProfileConfig, Reduction
from patchscope.atlas.profiling import profile
from patchscope.util.storage import write_json

from .common import Conditions, Timing, build_model, interleaved, random_batches, word_texts, word_tokenizer
from .profiling import _segments, bare_stop_at_site, bare_truncated
from .sections import write_section

HERE = Path(__file__).parent


def profiler_run(
    model, batches, layer: int, *, reduction: Reduction = "auto", compile: bool = False, extras: bool = True
) -> Callable[[], None]:
    """Our profiler's per-batch work (the default statistics unless ``extras`` is False) with a chosen
    `ProfileConfig.reduction`; ``auto`` is what users get. ``separate`` times the kernels that the CPU
    ran before `cpu_pass` (and that other devices run)."""
    config = ProfileConfig(
        layer=layer, checkpoint_every=0, compile=compile, bottom_k=20 if extras else 0, histogram=extras, reduction=reduction
    )
    profiler = Profiler(model, config)
    planned = _segments(batches)

    def run() -> None:
        for rows in planned:
            profiler.fold(rows, pad_id=0)

    return run


def whole_call(model, batches, layer: int, *, extras: bool = True) -> Callable[[], None]:
    """What a user pays: ``patchscope.profile(model, tokenizer, texts, config)`` on texts that tokenize to
    exactly ``batches`` (tokenization, batch planning, state set-up, every fold, the final merges and the
    atlas on the CPU), with the batch budget that reproduces the same batches."""
    batch, seq_len = batches[0].shape
    tokenizer, texts = word_tokenizer(model.config.vocab_size), word_texts(batches)
    config = ProfileConfig(
        layer=layer,
        max_length=seq_len,
        batch_tokens=batch * seq_len,
        checkpoint_every=0,
        bottom_k=20 if extras else 0,
        histogram=extras,
    )

    def run() -> None:
        profile(model, tokenizer, texts, config, progress=False)

    return run


def compiled_floor(model, batches, layer: int) -> Callable[[], None]:
    """The floor with its decoder layers under torch.compile: what compilation gives the bare forward."""
    layers = model.model.layers
    compiled = torch.nn.ModuleList([cast(torch.nn.Module, torch.compile(block)) for block in layers[: layer + 1]])

    def run() -> None:
        model.model.layers = compiled
        try:
            with torch.inference_mode():
                for ids in batches:
                    model.model(input_ids=ids, use_cache=False)
        finally:
            model.model.layers = layers

    return run


def first_call(fn: Callable[[], None], device: str) -> float:
    started = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def cpu_interleaved(peers: dict[str, tuple[Callable[[], None], int]], *, warmup: int, runs: int) -> dict[str, Timing]:
    """`common.interleaved` on the process's CPU time instead of the wall clock.

    On a CPU shared with other busy processes, wall time mostly measures the wait for a core; the
    CPU time this process spends is what the same work costs on a quiet machine. Only meaningful
    with one torch thread (several threads add their spin-waits).
    """
    for fn, _ in peers.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in peers}
    order, shuffler = list(peers), random.Random(0)
    for _ in range(runs):
        shuffler.shuffle(order)
        for name in order:
            started = time.process_time()
            peers[name][0]()
            samples[name].append(time.process_time() - started)
    return {name: Timing(name, samples[name], tokens) for name, (_, tokens) in peers.items()}


def variants(
    model,
    *,
    layer: int,
    batch: int,
    seq_len: int,
    n_batches: int,
    warmup: int,
    runs: int,
    device: str,
    compiled: bool,
    clock: str = "wall",
    only: tuple[str, ...] = (),
) -> dict:
    batches = random_batches(n_batches, batch, seq_len, model.config.vocab_size, device)
    tokens = n_batches * batch * seq_len
    site = f"blocks.{layer}.mlp.hook_post"
    table = {
        "floor: bare forward, decoder cut after the layer": bare_truncated(model, batches, layer),
        "bare forward stopped at mlp.hook_post (profiler's stop point)": bare_stop_at_site(model, batches, site),
        "profiler, defaults (top-k, moments, bottom-k, histogram)"
        + (" = the Triton fused pass" if device.startswith("cuda") else ""): profiler_run(model, batches, layer),
        "profiler, top-k and moments only (--bottom-k 0 --no-histogram)": profiler_run(model, batches, layer, extras=False),
        "profiler, defaults, separate kernels (the path before cpu_pass)": profiler_run(
            model, batches, layer, reduction="separate"
        ),
        "whole call: patchscope.profile(texts), defaults": whole_call(model, batches, layer),
        "whole call: patchscope.profile(texts), top-k and moments only": whole_call(model, batches, layer, extras=False),
    }
    if only:  # the floor stays: every ratio is to it
        table = {name: fn for name, fn in table.items() if name.startswith("floor:") or any(part in name for part in only)}
    # On CUDA the defaults row is the Triton pass (`auto`); a row of its own would time the same thing twice.
    compile_seconds = {}
    if compiled:
        extra = {
            "profiler, inductor fused reduction (eager forward)": profiler_run(model, batches, layer, reduction="inductor"),
            "profiler --compile (compiled layers; reduction as --compile picks)": profiler_run(
                model, batches, layer, compile=True
            ),
            "floor under torch.compile": compiled_floor(model, batches, layer),
        }
        for name, fn in extra.items():  # the first call compiles: its time is reported on its own
            compile_seconds[name] = round(first_call(fn, device), 2)
        table.update(extra)
    peers = {name: (fn, tokens) for name, fn in table.items()}
    timings = (
        cpu_interleaved(peers, warmup=warmup, runs=runs)
        if clock == "cpu"
        else interleaved(peers, warmup=warmup, runs=runs, device=device, memory=False)
    )
    floor = timings["floor: bare forward, decoder cut after the layer"].median
    return {
        "rows": {name: dict(t.as_dict(), vs_floor=floor / t.median) for name, t in timings.items()},
        "first_call_seconds": compile_seconds,
    }


def render(results: dict) -> str:
    lines = [
        "## Reaching the floor: reduction backends and `--compile`",
        "",
        "Written by `python -m benchmarks.floor` (then `python -m benchmarks.floor --render`). Ratios are tokens/s against the "
        "eager floor (the bare HF forward, decoder cut after the profiled layer) measured in the same round-robin; "
        "above 1.0 is faster than the floor. The compiled variants' first call (the compile) is timed apart from the runs.",
        "",
        "Backends: on the CPU a run gets `cpu_pass` (every statistic in one pass over reused buffers, reading only the blocks "
        "that reach each neuron's running k-th value); on CUDA the Triton kernel when Triton imports, else the separate eager "
        "kernels. `inductor` is the fused top-k/moments pass compiled by torch.compile, which `--compile` uses off the CPU "
        "together with compiled decoder layers (on the CPU `--compile` compiles the layers and keeps `cpu_pass`). The profiler "
        "rows compute the default statistics (top-k 20, moments, bottom-k 20, histogram) unless they say otherwise. All "
        "kernels are checked against the plain references in `tests/test_kernels.py` and `tests/test_cpu_pass.py`.",
        "",
    ]
    if not any(key.startswith("cuda") for key in results):
        lines += [
            "**No GPU was lent to this task**: the Triton kernel ran only under `TRITON_INTERPRET=1` (correctness, not speed). "
            "On a CUDA machine, `python -m benchmarks.floor --device cuda` adds the Triton and compiled rows here.",
            "",
        ]
    for key, section in results.items():
        if key.startswith("_"):
            continue
        lines += [f"### {key}", "", f"_Conditions: {section['conditions']}._", ""]
        if section.get("note"):
            lines += [section["note"], ""]
        lines += ["| variant | tokens/s | time per run, s | vs eager floor |", "|---|---:|---:|---:|"]
        for name, row in section["rows"].items():
            lines.append(
                f"| {name} | {row['tokens_per_s']:,.0f} | {row['median_s']:.3f} ({row['min_s']:.3f}-{row['max_s']:.3f}) | {row['vs_floor']:.3f} |"
            )
        if section["first_call_seconds"]:
            lines += [
                "",
                "First call (compile + one run), s: " + "; ".join(f"{k}: {v}" for k, v in section["first_call_seconds"].items()),
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.floor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+")
    parser.add_argument("--shape", help="default: small on CPU, gemma-2-2b-shape on CUDA")
    parser.add_argument("--layer", type=int)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: time the process's CPU time (use with --threads 1 on a shared machine)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--only", nargs="+", default=(), help="time only the rows whose name contains one of these (the floor always)"
    )
    parser.add_argument("--note", default="", help="a line printed under the conditions (e.g. 'machine shared with ...')")
    parser.add_argument("--json", default=str(HERE / "floor.json"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose section is rewritten")
    parser.add_argument("--render", action="store_true", help="print the markdown section from --json and exit")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Path(args.json)
    results = json.loads(store.read_text()) if store.exists() else {}
    if args.render:
        write_section(Path(args.results), "floor", render(results))
        print(render(results))
        return 0
    cuda = args.device.startswith("cuda")
    shape = args.shape or ("gemma-2-2b-shape" if cuda else "small")
    layer = args.layer if args.layer is not None else (12 if shape == "gemma-2-2b-shape" else 4)
    for dtype_name in args.dtypes or (["float16", "bfloat16"] if cuda else ["float32", "bfloat16"]):
        model = build_model(shape, layers=None, dtype=getattr(torch, dtype_name), device=args.device)
        c = model.config
        conditions = Conditions(
            device=args.device,
            dtype=dtype_name,
            shape=shape,
            d_model=c.hidden_size,
            d_mlp=c.intermediate_size,
            n_layers=c.num_hidden_layers,
            vocab=c.vocab_size,
            layer=layer,
            batch=args.batch,
            seq_len=args.seq_len,
            warmup=args.warmup,
            runs=args.runs,
        )
        print(f"[{dtype_name}] {conditions.line()}", flush=True)
        section = variants(
            model,
            layer=layer,
            batch=args.batch,
            seq_len=args.seq_len,
            n_batches=args.batches,
            warmup=args.warmup,
            runs=args.runs,
            device=args.device,
            compiled=not args.no_compile,
            clock=args.clock,
            only=tuple(args.only),
        )
        clock = "process CPU time" if args.clock == "cpu" else "wall clock"
        section.update(conditions=conditions.line() + f"; {args.batches} batches per run; {clock}", note=args.note)
        results[f"{args.device}/{dtype_name}/{shape}"] = section
        for name, row in section["rows"].items():
            print(f"  {row['vs_floor']:.3f}  {name}", flush=True)
        write_json(store, results)
    write_section(Path(args.results), "floor", render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
