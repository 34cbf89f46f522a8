"""Where a short `patchscope.profile` call spends the time that the steady state does not.

    python -m benchmarks.whole_call_parts             # CPU, `small` shape, layer 4, 8 batches of 8 x 128

`benchmarks.floor` times the whole call beside the steady state (one `Profiler` folding the same batches
again and again, its state long full). This script splits the difference, in one process, round-robin:

- **inside the calls:** the time in the reductions (`Profiler._reduce`, the site hook's work), in the
  merges (`Profiler.flush`), and in the forward without its reductions; and the process's minor page
  faults per call (`getrusage`);
- **per batch,** each `Profiler.fold` of a fresh state (what a call starts from) against the full one: the
  time of its reductions (`cpu_pass`) and of the merges after it.

Results go to ``benchmarks/whole_call_parts.json``; `render` writes the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from patchscope.atlas.engine import Profiler
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.util.storage import write_json

from .common import Conditions, build_model, random_batches
from .floor import profiler_run, whole_call
from .profiling import _segments
from .sections import write_section

HERE = Path(__file__).parent
PARTS = ("reductions", "merges", "forward without reductions")


@contextmanager
def timing_parts(spent: dict[str, float]) -> Iterator[None]:
    """Add the seconds of `Profiler._reduce`, `Profiler.flush` and `Profiler._forward` to ``spent``."""
    names = {"_reduce": "reductions", "flush": "merges", "_forward": "forward"}
    originals = {name: getattr(Profiler, name) for name in names}

    def timed(name: str) -> Callable:
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[names[name]] += time.perf_counter() - started

        return call

    for name in names:
        setattr(Profiler, name, timed(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(Profiler, name, original)


def inside_the_calls(model, batches, layer: int, runs: int) -> dict[str, dict[str, float]]:
    """Medians per call of each part, the call's time and its minor page faults: whole call and steady state."""
    peers = {"whole call": whole_call(model, batches, layer), "steady state": profiler_run(model, batches, layer)}
    for run in peers.values():
        run()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in peers}
    order, shuffler = list(peers), random.Random(0)
    for _ in range(runs):
        shuffler.shuffle(order)
        for name in order:
            spent = dict.fromkeys(("reductions", "merges", "forward"), 0.0)
            faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            with timing_parts(spent):
                peers[name]()
            spent["call"] = time.perf_counter() - started
            spent["minor page faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            spent["forward without reductions"] = spent.pop("forward") - spent["reductions"]
            samples[name].append(spent)
    return {name: {part: statistics.median(s[part] for s in rows) for part in rows[0]} for name, rows in samples.items()}


def per_batch(model, batches, layer: int, runs: int) -> dict[str, dict[str, list[float]]]:
    """Milliseconds of each batch's reductions and of the merges after it, fresh state against full state.

    Each batch goes through `Profiler.fold` itself (forward, reductions, the engine's own merge rule); only the
    reductions and the merges are read off its clock. The full state is one profiler folding the batches again.
    """
    config = ProfileConfig(layer=layer, checkpoint_every=0)
    planned = _segments(batches)
    full = Profiler(model, config)
    _fold_timed(full, planned)
    times: dict[str, list[list[tuple[float, float]]]] = {"fresh state": [], "full state": []}
    for _ in range(runs):
        times["fresh state"].append(_fold_timed(Profiler(model, config), planned))
        times["full state"].append(_fold_timed(full, planned))
    return {
        name: {
            "reductions ms": [1e3 * statistics.median(run[i][0] for run in rows) for i in range(len(planned))],
            "merges ms": [1e3 * statistics.median(run[i][1] for run in rows) for i in range(len(planned) + 1)],
        }
        for name, rows in times.items()
    }


def _fold_timed(profiler: Profiler, planned: list) -> list[tuple[float, float]]:
    """(reduction, merge) seconds of each `Profiler.fold`, then of the final `flush`."""
    spent = []
    for rows in planned:
        parts = dict.fromkeys(("reductions", "merges", "forward"), 0.0)
        with timing_parts(parts):
            profiler.fold(rows, pad_id=0)
        spent.append((parts["reductions"], parts["merges"]))
    parts = dict.fromkeys(("reductions", "merges", "forward"), 0.0)
    with timing_parts(parts):
        profiler.flush()
    return [*spent, (0.0, parts["merges"])]


def render(results: dict) -> str:
    lines = [
        "## Where a short whole call spends its time (`python -m benchmarks.whole_call_parts`)",
        "",
        "The whole call against the steady state (one `Profiler` folding the same batches again, its state full), "
        "split inside the calls, medians per call; then per batch, each fold's reductions and the merges after it.",
        "",
    ]
    for key, r in results.items():
        lines += [f"### {key}", "", f"_Conditions: {r['conditions']}._", ""]
        if r.get("note"):
            lines += [r["note"], ""]
        lines += ["| per call | whole call | steady state | difference |", "|---|---:|---:|---:|"]
        whole, steady = r["inside"]["whole call"], r["inside"]["steady state"]
        for part in ("call", *PARTS):
            lines.append(f"| {part}, s | {whole[part]:.3f} | {steady[part]:.3f} | {whole[part] - steady[part]:+.3f} |")
        part = "minor page faults"
        lines.append(f"| {part} | {whole[part]:,.0f} | {steady[part]:,.0f} | {whole[part] - steady[part]:+,.0f} |")
        lines += ["", "| per batch, ms | " + " | ".join(str(i) for i in range(1, 9)) + " | final merge |", "|---|" + "---:|" * 9]
        for state, rows in r["per_batch"].items():
            reductions = " | ".join(f"{v:.1f}" for v in rows["reductions ms"]) + " | "
            merges = " | ".join(f"{v:.1f}" for v in rows["merges ms"])
            lines += [f"| {state}: reductions | {reductions}|", f"| {state}: merges after it | {merges} |"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.whole_call_parts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--note", default="", help="a line printed under the conditions (what else ran on the machine)")
    parser.add_argument("--json", default=str(HERE / "whole_call_parts.json"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose section is rewritten")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    store = Path(args.json)
    results = json.loads(store.read_text()) if store.exists() else {}
    if not args.render:
        layer, batch, seq_len, n_batches = 4, 8, 128, 8
        model = build_model("small", layers=None, dtype=getattr(torch, args.dtype), device="cpu")
        batches = random_batches(n_batches, batch, seq_len, model.config.vocab_size, "cpu")
        c = model.config
        conditions = Conditions(
            device="cpu", dtype=args.dtype, shape="small", d_model=c.hidden_size, d_mlp=c.intermediate_size,
            n_layers=c.num_hidden_layers, vocab=c.vocab_size, layer=layer, batch=batch, seq_len=seq_len, warmup=1, runs=args.runs,
        )  # fmt: skip
        print(conditions.line(), flush=True)
        results[f"cpu/{args.dtype}/small"] = {
            "conditions": conditions.line() + f"; {n_batches} batches a call; wall clock",
            "note": args.note,
            "inside": inside_the_calls(model, batches, layer, args.runs),
            "per_batch": per_batch(model, batches, layer, args.runs),
        }
        write_json(store, results)
    write_section(Path(args.results), "whole-call-parts", render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
