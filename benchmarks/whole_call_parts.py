"""Where a short `patchscope.profile` call spends the time that the steady state does not.

    python -m benchmarks.whole_call_parts             # CPU, `small` shape, layer 4, 8 batches of 8 x 128

`benchmarks.floor` times the whole call beside the steady state (one `Profiler` folding the same batches
again and again, its state long full). This script splits the difference, in one process, round-robin:

- **inside the calls:** the time in the reductions (`Profiler._reduce`, the site hook's work), in the
  merges (`Profiler.flush`), and in the forward without its reductions; and the process's minor page
  faults per call (`getrusage`);
- **per batch, the reductions alone,** on activations captured once at the site: a fresh state (what a
  call starts from) against the full one, each batch's `cpu_pass` and the merges after it.

Results go to ``benchmarks/whole_call_parts.json``; `render` writes the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from patchscope.atlas.engine import MERGE_EVERY, Profiler
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.stats import TokenFields
from patchscope.model.hooks import run_with_cache
from patchscope.util.storage import write_json

from .common import Conditions, build_model, random_batches
from .floor import profiler_run, whole_call
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
    """Milliseconds of each batch's reductions and of the merges after it, fresh state against full state."""
    site = f"blocks.{layer}.mlp.hook_post"
    acts = []
    with torch.inference_mode():
        for ids in batches:
            _, capture = run_with_cache(model, {"input_ids": ids}, [site])
            acts.append(capture[site].reshape(-1, capture[site].shape[-1]).clone())  # [tokens, d_mlp]
    batch, seq_len = batches[0].shape
    pos = torch.arange(seq_len).repeat(batch)
    fields = [
        TokenFields((torch.arange(batch) + i * batch).repeat_interleave(seq_len), pos, ids.reshape(-1), pos > 0)
        for i, ids in enumerate(batches)
    ]
    config = ProfileConfig(layer=layer, checkpoint_every=0)
    full = Profiler(model, config)
    _fold_captured(full, site, acts, fields)
    times: dict[str, list[list[tuple[float, float]]]] = {"fresh state": [], "full state": []}
    for _ in range(runs):
        times["fresh state"].append(_fold_captured(Profiler(model, config), site, acts, fields))
        times["full state"].append(_fold_captured(full, site, acts, fields))
    return {
        name: {
            "reductions ms": [1e3 * statistics.median(run[i][0] for run in rows) for i in range(len(acts))],
            "merges ms": [1e3 * statistics.median(run[i][1] for run in rows) for i in range(len(acts) + 1)],
        }
        for name, rows in times.items()
    }


def _fold_captured(profiler: Profiler, site: str, acts: list, fields: list) -> list[tuple[float, float]]:
    """`Profiler.fold`'s bookkeeping on captured activations: (reduction, merge) seconds per batch, then the final merge."""
    spent = []
    for values, batch_fields in zip(acts, fields, strict=True):
        started = time.perf_counter()
        profiler._fields = batch_fields
        pieces = profiler._reduce(site, values)
        reduced = time.perf_counter()
        state = profiler.state[site].add(pieces.moments)
        if pieces.histogram is not None and state.histogram is not None:
            state = dataclasses.replace(state, histogram=state.histogram + pieces.histogram)
        profiler.state[site] = state
        profiler._unmerged[site].append(pieces.top)
        if pieces.bottom is not None:
            profiler._unmerged_bottom[site].append(pieces.bottom)
        if bool(torch.isneginf(state.top.values[-1]).any()) or len(profiler._unmerged[site]) >= MERGE_EVERY:
            profiler.flush(site)
        spent.append((reduced - started, time.perf_counter() - reduced))
    started = time.perf_counter()
    profiler.flush()
    return [*spent, (0.0, time.perf_counter() - started)]


def render(results: dict) -> str:
    lines = [
        "## Where a short whole call spends its time (`python -m benchmarks.whole_call_parts`)",
        "",
        "The whole call against the steady state (one `Profiler` folding the same batches again, its state full), "
        "split inside the calls, medians per call; then the reductions alone per batch, on activations captured once.",
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
