"""Scaling out: data-parallel throughput over torchrun ranks, the merge's cost, and truncated loading's memory.

    python -m benchmarks.scaling                          # CPU: 1 and 2 gloo processes, 1 thread each, `small` shape
    python -m benchmarks.scaling --device cuda --nproc 1 2 4 8 --shape gemma-2-2b-shape --dtype bfloat16
                                                          # one node with several GPUs: nccl, one GPU per rank
    python -m benchmarks.scaling --device cuda --nproc 1 --device-map auto --shape gemma-2-2b-shape --dtype bfloat16
                                                          # one model spread over the node's GPUs

Every configuration runs the real command (``torchrun ... -m patchscope profile``) on the same corpus
(CPython's ``pydoc_data.topics`` prose) and a random-weight Gemma-2 of the named shape saved to a
temporary folder with a BPE tokenizer trained on that corpus. Runs are interleaved (1, 2, 1, 2, ...)
and the median is reported. Tokens/s counts the profiling loop of the slowest rank (model loading
excluded); the merge time is the all-gather and merge of the ranks' atlases.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from .common import SHAPES, build_model

ROOT = Path(__file__).resolve().parents[1]


def corpus(path: Path, n_docs: int) -> Path:
    """Paragraphs of CPython's own docs (ships with Python), one JSON record per document."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 200]
    path.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs[:n_docs]) + "\n")
    return path


def model_folder(directory: Path, shape: str, layers: int | None, texts: list[str]) -> Path:
    """A random-weight Gemma-2 of ``shape`` plus a BPE tokenizer trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    vocab = min(8000, SHAPES[shape]["vocab_size"])
    tokenizer.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    )
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(directory)
    build_model(shape, layers=layers, dtype=torch.float32, device="cpu").save_pretrained(directory)
    return directory


def profile_run(model: Path, data: Path, out: Path, nproc: int, args: argparse.Namespace) -> dict:
    """One ``torchrun -m patchscope profile`` run; returns the merged atlas's run figures."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "patchscope",
        "profile",
    ]
    command += ["--model", str(model), "--dtype", args.dtype, "--device", args.device, "--dataset", str(data), "--split", ""]
    command += ["--layer", str(args.layer), "--max-length", str(args.max_length), "--batch-tokens", str(args.batch_tokens)]
    command += ["--sort-buffer", str(args.sort_buffer), "--checkpoint-every", "0", "--out", str(out)]
    command += ["--device-map", args.device_map] if args.device_map else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    meta = json.loads((out / "atlas.json").read_text())
    extra = meta["provenance"]
    return {
        "wall_s": time.perf_counter() - started,
        "tokens": extra["tokens_this_run"],
        "profile_s": extra["seconds"],
        "tokens_per_s": extra["tokens_this_run"] / extra["seconds"],
        "merge_s": extra.get("merge_seconds") or 0.0,
    }


def compare(a: Path, b: Path) -> str:
    """Bit-identical, or which tensors differ; differing documents are checked for exact value ties."""
    from patchscope.atlas.store import load_atlas

    first, second = load_atlas(a), load_atlas(b)
    ta, tb = first.tensors(), second.tensors()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    if not differ:
        return "bit-identical"
    notes = []
    for name in differ:
        count = int((ta[name] != tb[name]).sum())
        if name.endswith("/doc"):
            site = name.rsplit("/", 1)[0]
            top = first[site].top
            rows, cols = (ta[name] != tb[name]).nonzero(as_tuple=True)
            # an exact tie: the same value is held by another document among this neuron's recorded examples
            tied = sum(int((top.values[:, c] == top.values[r, c]).sum()) > 1 for r, c in zip(rows.tolist(), cols.tolist()))
            notes.append(f"{name}: {count} of {ta[name].numel()} entries, {tied} of them exact value ties")
        else:
            notes.append(f"{name}: {count} of {ta[name].numel()} entries")
    return "differs: " + "; ".join(notes)


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from benchmarks.common import PeakMemory
    from patchscope.model.loading import load_model, load_model_until
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.profiling import profile
    torch.set_num_threads(1)
    folder, layer, truncated, texts = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", json.loads(sys.argv[4])
    with PeakMemory("cpu") as peak:
        if truncated:
            model, tokenizer = load_model_until(folder, layer, dtype="bfloat16", device="cpu")
        else:
            model, tokenizer = load_model(folder, dtype="bfloat16", device="cpu")
        resident = PeakMemory._rss() - peak._base
        profile(model, tokenizer, texts, ProfileConfig(layer=layer, max_length=128, batch_tokens=1024), progress=False)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"resident_mb": resident / 2**20, "peak_mb": peak.peak_bytes / 2**20, "params": params}))
    """
)


def memory(model: Path, layer: int, texts: list[str]) -> dict[str, dict]:
    """Peak RSS growth (load, and load + a short profile) with the full model and with the truncated load."""
    rows = {}
    for name, flag in (("full model", "0"), (f"truncated after layer {layer}", "1")):
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(model), str(layer), flag, json.dumps(texts[:16])],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
        rows[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return rows


def on_paper(shape: str, layer: int, bytes_per_param: int = 2) -> str:
    """Parameter counts by part, from the architecture alone (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_model(shape, layers=None, dtype=torch.float32, device="meta")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    per_layer = count(model.model.layers[0])
    embedding = count(model.model.embed_tokens)
    n_layers = len(model.model.layers)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    head = 0 if tied else count(model.lm_head)
    total = embedding + n_layers * per_layer + count(model.model.norm) + head
    kept = embedding + (layer + 1) * per_layer + count(model.model.norm)
    gib = lambda n: n * bytes_per_param / 2**30  # noqa: E731
    return "\n".join(
        [
            f"| {shape}: part | parameters | bf16 GiB |",
            "|---|---:|---:|",
            f"| embedding (LM head {'tied to it' if tied else 'separate'}) | {embedding:,} | {gib(embedding):.2f} |",
            f"| one decoder layer | {per_layer:,} | {gib(per_layer):.3f} |",
            f"| whole model ({n_layers} layers) | {total:,} | {gib(total):.2f} |",
            f"| truncated load for layer {layer} (layers 0..{layer}) | {kept:,} | {gib(kept):.2f} |",
            f"| saved | {total - kept:,} ({100 * (total - kept) / total:.1f}%) | {gib(total - kept):.2f} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="scale the shape down to this many layers")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device-map", help="e.g. auto, with --nproc 1: one model over all GPUs of the node")
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--sort-buffer", type=int, default=16, help="blocks of documents shared out to ranks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paper", default="gemma-2-2b-shape", help="shape whose truncated-load saving is computed on paper")
    parser.add_argument("--paper-layer", type=int, default=12)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="patchscope-scaling-"))
    data = corpus(work / "corpus.jsonl", args.docs)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    model = model_folder(work / "model", args.shape, args.layers, texts)
    print(
        f"conditions: {args.device}, {args.dtype}, shape {args.shape} ({args.layers or SHAPES[args.shape]['num_hidden_layers']} layers), "
        f"layer {args.layer}, {len(texts)} docs of python-docs, max_length {args.max_length}, batch_tokens {args.batch_tokens}, "
        f"sort_buffer {args.sort_buffer}, {args.threads} thread(s) per process, torch {torch.__version__}, {os.cpu_count()} cores, "
        f"{args.repeats} interleaved repeats (median)",
        flush=True,
    )
    runs: dict[int, list[dict]] = {n: [] for n in args.nproc}
    for repeat in range(args.repeats):
        for n in args.nproc:
            runs[n].append(profile_run(model, data, work / f"atlas-{n}-{repeat}", n, args))
            print(f"  repeat {repeat}, {n} process(es): {runs[n][-1]}", flush=True)
    comparisons = {n: compare(work / f"atlas-{args.nproc[0]}-0", work / f"atlas-{n}-0") for n in args.nproc[1:]}
    base = statistics.median(r["tokens_per_s"] for r in runs[args.nproc[0]])
    lines = [
        "| processes | tokens | tokens/s (median) | speed-up | merge s | merge share of profiling | wall s (with start-up) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, rows in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in rows)
        merge = statistics.median(r["merge_s"] for r in rows)
        seconds = statistics.median(r["profile_s"] for r in rows)
        wall = statistics.median(r["wall_s"] for r in rows)
        lines.append(
            f"| {n} | {rows[0]['tokens']} | {tps:,.0f} | {tps / base:.2f}x | {merge:.3f} | {100 * merge / seconds:.1f}% | {wall:.1f} |"
        )
    lines += [f"\nAtlas of {n} processes against {args.nproc[0]}: {text}" for n, text in comparisons.items()]
    print("\n".join(lines))
    if args.device == "cpu":
        memory_rows = memory(model, args.layer, texts)
        print(
            f"\n| {args.shape}, bf16 (converted from the fp32 checkpoint, so every kept weight is resident), layer {args.layer} "
            "| parameters | RSS growth after load (MiB) | peak RSS growth, load + profile 16 docs (MiB) |"
        )
        print("|---|---:|---:|---:|")
        for name, row in memory_rows.items():
            print(f"| {name} | {row['params']:,} | {row['resident_mb']:.0f} | {row['peak_mb']:.0f} |")
    print()
    print(on_paper(args.paper, args.paper_layer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
