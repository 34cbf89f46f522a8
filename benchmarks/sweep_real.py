"""Token-identity Patchscope sweep on the two offline real models, over python-docs paragraphs.

    python -m benchmarks.sweep_real --model gemma-3-270m          # writes benchmarks/sweep/gemma-3-270m/
    python -m benchmarks.sweep_real --model smollm2-135m --sources 100

For each of N source tokens (one per `pydoc_data.topics` paragraph, at a seeded position), the
residual at blocks.s.hook_resid_pre of every source layer s is written into the paper's identity
prompt at ``?``, entering target layer t, and the next token there is scored against the source
model's own next token (precision@1, surprisal), with the random-vector, corpus-mean and
unpatched controls. Outputs: sweep.json, sweep.parquet, heatmaps, and conditions.json.

The models come as GGUF files in pip packages (see /work/shared/FACTS.md): `patchscope.load_model`
takes their preset names and converts each once to a plain float32 folder (`patchscope.model.gguf`).
"""

from __future__ import annotations

import os
from pathlib import Path


def paragraphs(minimum_chars: int = 200) -> list[str]:
    """The python-docs corpus: prose paragraphs of CPython's `pydoc_data.topics`, topics in name order."""
    from pydoc_data.topics import topics

    found = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            if block.startswith(" ") or len(block.strip()) < minimum_chars:  # indented blocks are code or grammar
                continue
            found.append(" ".join(block.split()))
    return found


def pick_sources(tokenizer, texts: list[str], count: int, *, max_tokens: int = 64, seed: int = 0):
    """One source token per paragraph (seeded), with at least 8 tokens of context before it."""
    import random

    from patchscope.scope.sweep import Source

    rng = random.Random(seed)
    chosen = rng.sample(range(len(texts)), k=min(count, len(texts)))
    sources = []
    for index in chosen:
        ids = tokenizer(texts[index]).input_ids[:max_tokens]
        if len(ids) < 12:
            continue
        position = rng.randrange(8, len(ids))
        sources.append(Source(ids, position, label=f"paragraph {index} pos {position}"))
    return sources[:count]


def corpus_means(model, tokenizer, texts: list[str], layers: list[int], *, max_tokens: int = 32, batch: int = 16) -> dict:
    """Mean residual at blocks.s.hook_resid_pre per layer, over the paragraphs' first tokens (position 0 left out)."""
    import torch

    from patchscope import run_with_cache

    sites = [f"blocks.{s}.hook_resid_pre" for s in layers]
    totals = {s: torch.zeros(model.config.hidden_size, dtype=torch.float64) for s in layers}
    count = 0
    for start in range(0, len(texts), batch):
        encoded = [tokenizer(t).input_ids[:max_tokens] for t in texts[start : start + batch]]
        width = min(len(ids) for ids in encoded)  # a rectangle without padding
        ids = torch.tensor([e[:width] for e in encoded])
        with torch.no_grad():
            _, cache = run_with_cache(model, ids, sites)
        for s, site in zip(layers, sites):
            totals[s] += cache[site][:, 1:].double().sum(dim=(0, 1)).cpu()
        count += ids.shape[0] * (width - 1)
    return {s: (total / count).float() for s, total in totals.items()}


def main() -> None:
    import argparse
    import json
    import platform
    import time

    import torch
    import transformers

    from patchscope.model.loading import PRESETS, load_model
    from patchscope.scope.config import PatchscopeConfig
    from patchscope.scope.placeholder import plan_prompt
    from patchscope.scope.prompts import PROMPTS
    from patchscope.scope.sweep import SweepConfig, summary_lines, sweep
    from patchscope.scope.sweep_files import save_sweep
    from patchscope.util.storage import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    offline = sorted(name for name, preset in PRESETS.items() if preset.gguf is not None)  # the pip-packaged GGUF models
    parser.add_argument("--model", choices=offline, default="gemma-3-270m")
    parser.add_argument("--sources", type=int, default=200, help="source tokens, one per paragraph")
    parser.add_argument("--target-every", type=int, default=3, help="target layers 0, k, 2k, ... (all source layers are read)")
    parser.add_argument("--pairs", default="lower", choices=["lower", "all", "same"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="default: benchmarks/sweep/<model>")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or Path(__file__).parent / "sweep" / args.model)

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    loaded = time.perf_counter() - started
    layers = model.config.num_hidden_layers
    texts = paragraphs()
    sources = pick_sources(tokenizer, texts, args.sources)
    preset = PROMPTS["identity"]
    prompt = plan_prompt(tokenizer, PatchscopeConfig(prompt=preset.text, placeholder=preset.placeholder))
    config = SweepConfig(
        prompt="identity", target_layers=tuple(range(0, layers, args.target_every)), pairs=args.pairs, batch_size=args.batch_size
    )
    started = time.perf_counter()
    means = corpus_means(model, tokenizer, texts[:64], list(range(layers)))
    mean_seconds = time.perf_counter() - started
    result = sweep(model, tokenizer, sources, prompt, config, means=means)
    result.timings.update(load_model=round(loaded, 3), corpus_means=round(mean_seconds, 3))
    result.notes.append(
        f"model {args.model} ({args.dtype}, CPU, {args.threads} thread(s)); {len(sources)} source tokens from python-docs"
    )
    save_sweep(result, out, title=f"{args.model}, identity prompt, {len(sources)} python-docs tokens")
    conditions = {
        "model": args.model,
        "dtype": args.dtype,
        "device": "cpu",
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sources": len(sources),
        "pairs": len(result.pairs),
        "rows": result.timings["rows"],
        "timings_s": result.timings,
    }
    write_json(out / "conditions.json", conditions)
    print(json.dumps(conditions))
    print("\n".join(summary_lines(result)))


if __name__ == "__main__":
    main()
