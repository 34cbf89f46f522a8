"""Cost of the richer atlas: bottom-k, histograms and the quantile pass, against the floor.

    python -m benchmarks.atlas_stats [--shape small] [--dtype float32] [--runs 7] [--out benchmarks/ATLAS_STATS.md]

Two tables, every peer interleaved in one process (a shared machine drifts; ratios measured
together survive that better than absolute numbers):
- end to end: the profiler with each statistic on or off, relative to the bare early-exit forward
  (the floor) and to the profiler with top-k and moments only;
- per batch: each reduction alone on one ``[batch * seq_len, d_mlp]`` activation tensor.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from patchscope.atlas.engine import Profiler
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.kernels.bottomk import bottomk_candidates
from patchscope.kernels.histogram import batch_histogram
from patchscope.kernels.quantiles import batch_quantiles
from patchscope.kernels.topk_merge_fast import batch_stats

from .common import SHAPES, Conditions, build_model, interleaved, random_batches
from .profiling import _segments, bare_stop_at_site

HERE = Path(__file__).parent


def profiler_run(model, batches, layer: int, **options) -> Callable[[], None]:
    config = ProfileConfig(layer=layer, top_k=20, checkpoint_every=0, **options)
    planned = _segments(batches)

    def run() -> None:
        profiler = Profiler(model, config)
        for rows in planned:
            profiler.fold(rows, pad_id=0)
        profiler.flush()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.atlas_stats", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", default=str(HERE / "ATLAS_STATS.md"))
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    model = build_model(args.shape, layers=args.layer + 2, dtype=dtype, device="cpu")
    shape = SHAPES[args.shape]
    batches = random_batches(args.batches, args.batch, args.seq_len, shape["vocab_size"], "cpu")
    tokens = args.batches * args.batch * args.seq_len
    site = f"blocks.{args.layer}.mlp.hook_post"
    conditions = Conditions(
        "cpu",
        args.dtype,
        args.shape,
        shape["hidden_size"],
        shape["intermediate_size"],
        args.layer + 2,
        shape["vocab_size"],
        args.layer,
        args.batch,
        args.seq_len,
        args.warmup,
        args.runs,
    )

    peers = {
        "floor: bare forward, stop after the site": (bare_stop_at_site(model, batches, site), tokens),
        "profiler: top-k + moments only": (profiler_run(model, batches, args.layer, bottom_k=0, histogram=False), tokens),
        "profiler: + bottom-k": (profiler_run(model, batches, args.layer, bottom_k=20, histogram=False), tokens),
        "profiler: + histogram": (profiler_run(model, batches, args.layer, bottom_k=0, histogram=True), tokens),
        "profiler: + bottom-k + histogram (default)": (profiler_run(model, batches, args.layer), tokens),
    }
    end_to_end = interleaved(peers, warmup=args.warmup, runs=args.runs, device="cpu")

    g = torch.Generator().manual_seed(0)
    n_tokens = args.batch * args.seq_len
    acts = torch.randn(n_tokens, shape["intermediate_size"], generator=g).to(dtype)
    values = acts.float()
    doc = torch.arange(n_tokens) // args.seq_len
    pos = torch.arange(n_tokens) % args.seq_len
    token = torch.randint(0, 1000, (n_tokens,), generator=g)
    counted = pos > 0
    upper = values.amax(0)
    kernels = {
        "top-k candidates + moments (existing)": (lambda: batch_stats(acts, doc, pos, token, counted, 20), n_tokens),
        "bottom-k candidates": (lambda: bottomk_candidates(values, doc, pos, token, counted, 20), n_tokens),
        "histogram (163 fixed bins)": (lambda: batch_histogram(values, counted), n_tokens),
        "quantile picks (second pass, 5 x 5)": (lambda: batch_quantiles(values, doc, pos, token, counted, upper, 5), n_tokens),
    }
    per_batch = interleaved(kernels, warmup=args.warmup, runs=args.runs, device="cpu", memory=False)

    floor = end_to_end["floor: bare forward, stop after the site"].median
    base = end_to_end["profiler: top-k + moments only"].median
    lines = [
        "# The richer atlas: cost of bottom-k, histograms and quantile examples",
        "",
        f"_Conditions: {conditions.line()}._",
        "",
        "_Measured on a 2-core machine shared with other jobs at the same time: absolute times are noisy; "
        "the peers ran interleaved in one process, so the ratios are the numbers to read._",
        "",
        "## End to end (the profiler's real per-batch work)",
        "",
        "| run | median s | tokens/s | vs floor | vs top-k + moments only | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in end_to_end.items():
        lines.append(
            f"| {name} | {t.median:.3f} | {t.tokens_per_s:,.0f} | {t.median / floor:.2f}x | {t.median / base:.2f}x | {t.peak_mb} |"
        )
    top = per_batch["top-k candidates + moments (existing)"].median
    lines += [
        "",
        f"## Per batch: one `[{n_tokens}, {shape['intermediate_size']}]` {args.dtype} activation tensor",
        "",
        "| reduction | median ms | vs top-k + moments |",
        "|---|---|---|",
    ]
    for name, t in per_batch.items():
        lines.append(f"| {name} | {1e3 * t.median:.2f} | {t.median / top:.2f}x |")
    lines += ["", "Reproduce: `python -m benchmarks.atlas_stats` (options: `--help`).", ""]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
