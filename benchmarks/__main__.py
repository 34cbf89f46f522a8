"""Run the benchmark suite; write a RESULTS.md and a JSON of every number into a run directory.

    python -m benchmarks                     # CPU suite on the small shape, fp32 and bf16, a few minutes
    python -m benchmarks --device cuda       # GPU: gemma-2-2b-shape, fp16 and bf16
    python -m benchmarks --quick             # tiny shape, one run each: checks the suite works (~1-2 min on CPU)
    python -m benchmarks --record            # write into the recorded benchmarks/results.json + RESULTS.md

By default a run writes only to benchmarks/runs/<UTC time>/ (not tracked by git). With --record,
results from several runs (CPU and GPU) accumulate in benchmarks/results.json, keyed by device,
dtype and shape, and benchmarks/RESULTS.md is rewritten from all of them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from patchscope.util.storage import atomic_write, write_json

from .common import SHAPES, Conditions, build_model
from .generation import generation, sae_encode
from .hook_cost import hook_costs
from .profiling import padding, scaling, sweep, throughput
from .report import render

HERE = Path(__file__).parent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtypes", nargs="+", help="default: float32 bfloat16 on CPU, float16 bfloat16 on CUDA")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="default: small on CPU, gemma-2-2b-shape on CUDA")
    parser.add_argument(
        "--model",
        help="benchmark real weights instead (hub id or folder, e.g. google/gemma-2-2b), loaded with patchscope.load_model",
    )
    parser.add_argument("--layers", type=int, help="scale the shape down to this many layers")
    parser.add_argument("--layer", type=int, default=4, help="profiled layer (default 4; 12 for gemma-2-2b-shape)")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    parser.add_argument("--batches", type=int, default=2, help="batches per timed run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported (default 5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shape, one run of each benchmark: checks that the suite works (about 1-2 minutes on CPU); the numbers mean little",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="benchmarks to leave out",
        choices=["peers", "sweep", "padding", "scaling", "hooks", "sae", "generation"],
    )
    parser.add_argument(
        "--record", action="store_true", help="merge into the recorded benchmarks/results.json and rewrite benchmarks/RESULTS.md"
    )
    parser.add_argument(
        "--run-dir", help="folder for this run's RESULTS.md and results.json (default: benchmarks/runs/<UTC time>/)"
    )
    parser.add_argument(
        "--out", help="markdown report path (default: RESULTS.md in the run directory, or the recorded one with --record)"
    )
    parser.add_argument(
        "--json", help="JSON results path, merged into if it exists (default: results.json beside --out's default)"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the recorded RESULTS.md (or --out) from the recorded JSON (or --json)"
    )
    args = parser.parse_args(argv)
    if args.record or args.render:
        folder = HERE
    else:
        folder = Path(args.run_dir) if args.run_dir else HERE / "runs" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    args.out = args.out or str(folder / "RESULTS.md")
    args.json = args.json or str(folder / "results.json")
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.shape, args.layers, args.layer, args.batch, args.seq_len, args.batches, args.warmup, args.runs = (
            "tiny",
            3,
            1,
            2,
            16,
            1,
            0,
            1,
        )
    args.shape = args.shape or ("gemma-2-2b-shape" if cuda else "small")
    if args.shape == "gemma-2-2b-shape" and args.layer == 4 and not args.quick:
        args.layer = 12
    args.dtypes = args.dtypes or (["float16", "bfloat16"] if cuda else (["float32"] if args.quick else ["float32", "bfloat16"]))
    return args


def run_dtype(args: argparse.Namespace, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    if args.model:
        from patchscope import load_model

        model, _ = load_model(args.model, dtype=dtype, device=args.device)
        name = args.model
    else:
        model = build_model(args.shape, layers=args.layers, dtype=dtype, device=args.device)
        name = args.shape + (f" ({args.layers} layers)" if args.layers else "")
    config = model.config
    conditions = Conditions(
        device=args.device,
        dtype=dtype_name,
        shape=name,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
        n_layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        layer=args.layer,
        batch=args.batch,
        seq_len=args.seq_len,
        warmup=args.warmup,
        runs=args.runs,
    )
    print(f"[{dtype_name}] {conditions.line()}", flush=True)
    common = dict(warmup=args.warmup, runs=args.runs, device=args.device)
    out: dict = {"conditions": conditions.__dict__, "notes": []}
    started = time.perf_counter()
    if "peers" not in args.skip:
        timings, notes = throughput(
            model, layer=args.layer, batch=args.batch, seq_len=args.seq_len, n_batches=args.batches, **common
        )
        out["throughput"] = {name: t.as_dict() for name, t in timings.items()}
        out["notes"] += notes
        print("  throughput done", flush=True)
    if "sweep" not in args.skip:
        settings = [(b, args.seq_len) for b in (1, 4, args.batch, 2 * args.batch)] + [
            (args.batch, s) for s in (args.seq_len // 2, 2 * args.seq_len)
        ]
        out["sweep"] = sweep(model, layer=args.layer, settings=settings, n_batches=1, **common)
        print("  sweep done", flush=True)
    if "padding" not in args.skip:
        out["padding"] = padding(model, layer=args.layer, batch=args.batch, seq_len=args.seq_len, n_docs=8 * args.batch, **common)
        print("  padding done", flush=True)
    if "scaling" not in args.skip:
        out["scaling"] = scaling(model, layer=args.layer, batch=args.batch, seq_len=args.seq_len, sizes=[1, 2, 4, 8], **common)
        print("  scaling done", flush=True)
    if "hooks" not in args.skip:
        rows, notes = hook_costs(model, layer=args.layer, batch=args.batch, seq_len=args.seq_len, **common)
        out["hook_cost"] = rows
        out["notes"] += notes
        print("  hook cost done", flush=True)
    if "sae" not in args.skip:
        out["sae"] = sae_encode(
            config.hidden_size, d_sae=1024 if args.quick else 16384, n_vectors=256 if args.quick else 4096, **common
        )
    if "generation" not in args.skip:
        out["generation"] = generation(
            model, layer=args.layer, batches=(1, args.batch), new_tokens=4 if args.quick else 20, **common
        )
        print("  generation done", flush=True)
    out["suite_seconds"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    store = Path(args.json)
    store.parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(store.read_text()) if store.exists() else {}
    for dtype_name in [] if args.render else args.dtypes:
        key = f"{args.device}/{dtype_name}/{args.model or args.shape}" + (
            f"/{args.layers}L" if args.layers and not args.model else ""
        )
        results[key] = run_dtype(args, dtype_name)
        write_json(store, results)
    atomic_write(args.out, lambda tmp: tmp.write_text(render(results), encoding="utf-8"))
    print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
