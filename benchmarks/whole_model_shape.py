"""A whole model in one pass at gemma-2-2b's shape (random weights): the one pass against its floor.

    python -m benchmarks.whole_model_shape          # about 6 minutes on 2 CPU cores, 11 GB of memory

`benchmarks.whole_model` measures Gemma 3 270M, whose MLP is small beside its activations: 36,864 of them
per 0.2 GFLOP of forward. gemma-2-2b has 239,616 per 4.05 GFLOP, about 3 times fewer per unit of forward
(benchmarks/RESULTS.md, "gemma-2-2b on one GPU, on paper"), so the statistics should weigh about a third as
much. This measures it on the CPU: all 26 layers' ``mlp.hook_post`` (26 x 9,216 neurons) profiled in one
pass through the public API (`patchscope.profile`, default statistics, and top-k and moments only),
against the floor, the bare decoder over the very batches the profiler plans. Rounds are interleaved in
one process. The weights are random (`benchmarks.common.build_model`) and the texts are random words, so
this says what the statistics cost, not what the neurons mean; a short corpus keeps every site's state
filling (the expensive regime, see "The whole call a user pays").
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .common import SHAPES, build_model, interleaved, planned_batches, random_batches, word_texts, word_tokenizer
from .sections import record

HERE = Path(__file__).parent


def measure(args: argparse.Namespace) -> dict:
    from patchscope import profile
    from patchscope.atlas.profile_config import ProfileConfig

    started = time.perf_counter()
    model = build_model(args.shape, layers=None, dtype=torch.float32, device="cpu")
    built = time.perf_counter() - started
    vocab = model.config.vocab_size
    tokenizer = word_tokenizer(vocab)
    texts = word_texts(random_batches(args.docs, 1, args.seq_len, vocab, "cpu"))
    defaults = ProfileConfig(layers="all", batch_tokens=args.batch_tokens, max_length=args.seq_len)
    lean = ProfileConfig(layers="all", batch_tokens=args.batch_tokens, max_length=args.seq_len, bottom_k=0, histogram=False)
    batches = planned_batches(texts, tokenizer, defaults)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)

    def floor() -> None:
        with torch.inference_mode():
            for b in batches:
                model.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def one_pass(config: ProfileConfig) -> Callable[[], None]:
        def run() -> None:
            profile(model, tokenizer, texts, config, progress=False)

        return run

    peers = {
        "one pass": (one_pass(defaults), tokens),
        "one pass, top-k and moments only (bottom_k=0, histogram=False)": (one_pass(lean), tokens),
        "floor": (floor, tokens),
    }
    profile(model, tokenizer, texts[:2], defaults, progress=False)  # warm-up: a full extra run costs minutes here
    timings = interleaved(peers, warmup=0, runs=args.runs, device="cpu", memory=False)
    median = {name: t.median for name, t in timings.items()}
    return {
        "conditions": (
            f"CPU, {torch.get_num_threads()} torch threads; float32; torch {torch.__version__}; Gemma-2 of shape {args.shape}, "
            f"random weights ({model.config.num_hidden_layers} layers, d_model {model.config.hidden_size}, d_mlp "
            f"{model.config.intermediate_size}; built in {built:.0f} s); {args.docs} random-word "
            f"texts of {args.seq_len} tokens, {tokens} tokens in {len(batches)} batches of at most {args.batch_tokens}; "
            f"{args.runs} interleaved rounds (order shuffled, seeded) after a warm-up, medians; the floor runs after `profile` calls, so under "
            "`patchscope.util.heap.steady_heap`'s allocator settings too"
        ),
        "tokens": tokens,
        "seconds": {name: dict(median=t.median, min=min(t.seconds), max=max(t.seconds)) for name, t in timings.items()},
        "floor_over_one_pass": median["floor"] / median["one pass"],
        "floor_over_lean_one_pass": median["floor"] / median["one pass, top-k and moments only (bottom_k=0, histogram=False)"],
    }


def render(results: dict) -> str:
    lines = [
        "## A whole model in one pass at gemma-2-2b's shape (`python -m benchmarks.whole_model_shape`)",
        "",
        "Random weights: what the statistics cost beside a forward of the reference model's size, on this CPU. "
        "Ratios > 1 mean the one pass is faster than its floor.",
        "",
    ]
    for key, r in results.items():
        lines += [f"### {key}", "", f"_Conditions: {r['conditions']}._", ""]
        if r.get("note"):
            lines += [r["note"], ""]
        lines += ["| run | median s | min-max s | tokens/s |", "|---|---:|---:|---:|"]
        for name, t in r["seconds"].items():
            lines.append(f"| {name} | {t['median']:.1f} | {t['min']:.1f}-{t['max']:.1f} | {r['tokens'] / t['median']:,.1f} |")
        lines += [
            "",
            f"- floor / one pass: **{r['floor_over_one_pass']:.2f}x** (the target is >= 0.9); with top-k and moments "
            f"only: {r['floor_over_lean_one_pass']:.2f}x.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.whole_model_shape", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gemma-2-2b-shape", help="benchmarks.common.SHAPES")
    parser.add_argument("--docs", type=int, default=16, help="random-word texts")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="a line printed under the conditions (what else ran on the machine)")
    parser.add_argument("--json", default=str(HERE / "whole_model_shape.json"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose section is rewritten")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    new = (
        None
        if args.render
        else {f"cpu/float32/{args.shape}/{args.docs}x{args.seq_len}-b{args.batch_tokens}": dict(measure(args), note=args.note)}
    )
    print(record(Path(args.json), Path(args.results), "whole-model-shape", render, new))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
