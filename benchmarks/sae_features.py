"""Cost of profiling SAE features beside the neurons, as a ratio to profiling the neurons alone.

    python -m benchmarks.sae_features                 # CPU, float32, Gemma 3 270M widths, a 16k random SAE
    python -m benchmarks.sae_features --device cuda --dtype bfloat16

The model has Gemma 3 270M's widths (d_model 640, d_mlp 2048, 4 heads of 256, 1 KV head; sandwich
norms) with random weights, as a Gemma-2 module (the same block layout; Gemma 3 adds q/k norms).
The vocabulary is cut to 32,000: the profiled forward stops at the profiled layer, so the
vocabulary only sizes an embedding lookup. Both peers fold the same batches, interleaved in one process.
"""

from __future__ import annotations

import argparse

import torch

from patchscope.atlas.batching import Segment
from patchscope.atlas.engine import Profiler
from patchscope.atlas.feature_site import FeatureSite
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.sae.features import feature_site
from patchscope.sae.jumprelu import JumpReLUSAE, SAEInfo

from .common import SHAPES, Conditions, build_model, interleaved, random_batches

SHAPE = "gemma-3-270m-widths"
SHAPES.setdefault(
    SHAPE,
    dict(
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=32000,
    ),
)


def random_sae(d_model: int, d_sae: int, site: str, device: str, seed: int = 0) -> JumpReLUSAE:
    """Random JumpReLU weights, thresholds set so that about 1% of features fire (a realistic L0 for timing)."""
    generator = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_model, d_sae, generator=generator) / d_model**0.5
    return JumpReLUSAE(
        w_enc,
        torch.zeros(d_sae),
        torch.full((d_sae,), 2.3),  # ~1% of a unit normal pre-activation lies above 2.3
        torch.randn(d_sae, d_model, generator=generator) / d_sae**0.5,
        torch.zeros(d_model),
        SAEInfo(site=site, width=f"{d_sae // 1024}k", source="random"),
    ).to(device)


def _fold_all(model, config: ProfileConfig, batches: list[torch.Tensor], features: list[FeatureSite]):
    profiler = Profiler(model, config, features)
    planned = [
        [Segment(b * len(ids) + i, 0, tuple(row), 1) for i, row in enumerate(ids.cpu().tolist())] for b, ids in enumerate(batches)
    ]

    def run() -> None:
        for rows in planned:
            profiler.fold(rows, pad_id=0)
        profiler.flush()

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layer", type=int, default=6, help="profiled MLP layer; the SAE reads blocks.(L-1).hook_resid_post")
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = build_model(SHAPE, layers=args.layer + 1, dtype=dtype, device=args.device)
    batches = random_batches(args.batches, args.batch, args.seq_len, SHAPES[SHAPE]["vocab_size"], args.device)
    config = ProfileConfig(layer=args.layer, checkpoint_every=0, batch_tokens=args.batch * args.seq_len)
    sae = random_sae(SHAPES[SHAPE]["hidden_size"], args.d_sae, f"blocks.{args.layer - 1}.hook_resid_post", args.device)
    tokens = args.batches * args.batch * args.seq_len
    peers = {
        "neurons alone": (_fold_all(model, config, batches, []), tokens),
        "neurons + 16k features": (_fold_all(model, config, batches, [feature_site(sae)]), tokens),
    }
    timings = interleaved(peers, warmup=1, runs=args.runs, device=args.device)
    shape = SHAPES[SHAPE]
    conditions = Conditions(
        args.device, args.dtype, SHAPE, shape["hidden_size"], shape["intermediate_size"], args.layer + 1,
        shape["vocab_size"], args.layer, args.batch, args.seq_len, 1, args.runs,
    )  # fmt: skip
    print(conditions.line())
    print(
        f"SAE: random JumpReLU, d_sae {args.d_sae}, at blocks.{args.layer - 1}.hook_resid_post; neurons: blocks.{args.layer}.mlp.hook_post"
    )
    base = timings["neurons alone"].median
    print("| run | median s | min-max s | tokens/s | ratio to neurons alone | peak MB |")
    print("|---|---|---|---|---|---|")
    for name, t in timings.items():
        print(
            f"| {name} | {t.median:.3f} | {min(t.seconds):.3f}-{max(t.seconds):.3f} | {t.tokens_per_s:,.0f} | "
            f"{t.median / base:.2f}x | {t.peak_mb} |"
        )


if __name__ == "__main__":
    main()
