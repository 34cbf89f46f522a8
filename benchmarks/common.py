"""Shared benchmark machinery: model shapes, a timer that interleaves peers, peak memory, conditions."""

from __future__ import annotations

import copy
import gc
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=1000,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=32000,
    ),
    # the real gemma-2-2b architecture, random weights
    "gemma-2-2b-shape": dict(
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        vocab_size=256000,
    ),
}


@dataclass
class Conditions:
    """Printed with every table."""

    device: str
    dtype: str
    shape: str
    d_model: int
    d_mlp: int
    n_layers: int
    vocab: int
    layer: int
    batch: int
    seq_len: int
    warmup: int
    runs: int
    cpu_threads: int = field(default_factory=torch.get_num_threads)
    torch_version: str = torch.__version__
    transformers: str = ""
    machine: str = field(default_factory=lambda: f"{platform.machine()}, {os.cpu_count()} cores")
    gpu: str | None = None
    cuda: str | None = None

    def __post_init__(self) -> None:
        import transformers

        self.transformers = transformers.__version__
        if self.device.startswith("cuda"):
            self.gpu = torch.cuda.get_device_name()
            self.cuda = torch.version.cuda

    def line(self) -> str:
        hw = f"GPU {self.gpu}, CUDA {self.cuda}" if self.gpu else f"CPU {self.machine}, {self.cpu_threads} torch threads"
        return (
            f"{hw}; {self.dtype}; torch {self.torch_version}, transformers {self.transformers}; model `{self.shape}` "
            f"(d_model {self.d_model}, d_mlp {self.d_mlp}, {self.n_layers} layers, vocab {self.vocab}); "
            f"layer {self.layer}; batch {self.batch} x {self.seq_len} tokens; {self.warmup} warm-up, {self.runs} timed runs (median, min-max)"
        )


def build_model(shape: str, *, layers: int | None, dtype: torch.dtype, device: str, seed: int = 0) -> Gemma2ForCausalLM:
    """A Gemma-2 of the named shape with seeded random weights (eager attention, as the project loads it).

    Off the CPU the weights are created on ``device`` in ``dtype``: at the gemma-2-2b shape, building in
    float32 on the CPU and casting costs minutes of a short GPU window (the same seed then gives other
    values; no benchmark compares weights across devices).
    """
    settings: dict[str, Any] = dict(SHAPES[shape])
    if layers is not None:
        settings["num_hidden_layers"] = layers
    config = Gemma2Config(  # type: ignore[call-arg]  # attn_implementation: taken by PretrainedConfig, not in the signature
        **settings, max_position_embeddings=4096, attn_implementation="eager", pad_token_id=0, bos_token_id=2, eos_token_id=1
    )
    torch.manual_seed(seed)
    if device != "cpu":  # built where it runs, in its dtype: no minutes of fp32 CPU init in a short GPU window
        with torch.device(device):
            built = Gemma2ForCausalLM._from_config(config, dtype=dtype)
        return cast(Gemma2ForCausalLM, cast(torch.nn.Module, built).eval().requires_grad_(False))
    model = Gemma2ForCausalLM(config)  # the CPU keeps its fp32 init then cast: the recorded CPU weights
    # PreTrainedModel.to is wrapped by functools.wraps, whose stub does not bind `self`
    return cast(Gemma2ForCausalLM, cast(torch.nn.Module, model).to(device=device, dtype=dtype).eval().requires_grad_(False))


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A real fast tokenizer for the random models: ``"w17 w4"`` -> ``[2, 17, 4]`` (id 2 is BOS, 0 pad, 1 EOS, 3 unknown).

    Whole library calls (`patchscope.profile` on texts) then pay for tokenization as a user does,
    and `word_texts` turns the benchmark's token batches back into texts with exactly those ids.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def word_texts(batches: list[torch.Tensor]) -> list[str]:
    """One text per row of the batches (BOS dropped: the tokenizer adds it); ids below 4 become ``w4``."""
    return [" ".join(f"w{max(int(i), 4)}" for i in row[1:].tolist()) for ids in batches for row in ids]


def config_dir(model: torch.nn.Module) -> str:
    """A folder with just config.json, for peers that boot from a name but take our weights."""
    directory = tempfile.mkdtemp(prefix="patchscope-bench-")
    cast(Any, model).config.save_pretrained(directory)
    return directory


def clone(model: torch.nn.Module) -> torch.nn.Module:
    """Peers that wrap modules get their own copy: identical weights, our model untouched."""
    return copy.deepcopy(model)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._base: int
        self._max: int  # both set in __enter__, before sampling starts

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._max = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._rss())
            self.peak_bytes = self._max - self._base


@dataclass
class Timing:
    name: str
    seconds: list[float]
    tokens: int
    """Tokens processed by one run."""
    peak_mb: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(median_s=self.median, min_s=min(self.seconds), max_s=max(self.seconds), tokens_per_s=self.tokens_per_s)
        return out


def interleaved(
    peers: dict[str, tuple[Callable[[], None], int]], *, warmup: int, runs: int, device: str, memory: bool = True
) -> dict[str, Timing]:
    """Time every peer ``runs`` times, round-robin so drift hits all alike; each value is one run.

    The order is shuffled every round (seeded): whichever peer runs first after another's big
    allocations pays for fresh memory pages, and that cost should not always land on the same one.
    ``peers`` maps a name to (function doing one run, tokens per run).
    """
    for fn, _ in peers.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in peers}
    order = list(peers)
    shuffler = random.Random(0)
    for _ in range(runs):
        shuffler.shuffle(order)
        for name in order:
            fn = peers[name][0]
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - started)
    timings = {name: Timing(name, samples[name], tokens) for name, (_, tokens) in peers.items()}
    if memory:
        for name, (fn, _) in peers.items():
            with PeakMemory(device) as peak:
                fn()
            timings[name].peak_mb = round(peak.peak_bytes / 2**20, 1)
    return timings


def random_batches(n_batches: int, batch: int, seq_len: int, vocab: int, device: str, seed: int = 1) -> list[torch.Tensor]:
    """Token ids ``[batch, seq_len]`` starting with BOS (id 2), the same for every peer."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(4, vocab, (batch, seq_len), generator=generator)  # 0-3: pad, EOS, BOS, unknown
        ids[:, 0] = 2
        out.append(ids.to(device))
    return out


def planned_batches(texts: list[str], tokenizer, config) -> list:
    """The batches `patchscope.profile(model, tokenizer, texts, config)` folds, collated (a floor runs over them)."""
    from patchscope.atlas.batching import collate
    from patchscope.atlas.sources import Document

    planned = config.plan([Document(i, t) for i, t in enumerate(texts)], tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [collate(rows, pad_id) for rows in planned]
