"""Profiling throughput: our profiler against the bare early-exit forward and against peers.

Every peer sees the same token batches and the same weights (peers that wrap modules get a copy).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from patchscope.atlas.batching import Segment
from patchscope.atlas.engine import Profiler
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.model.hooks import stop_after

from .common import Timing, clone, config_dir, interleaved, random_batches


def _segments(batches: list[torch.Tensor]) -> list[list[Segment]]:
    rows = []
    for b, ids in enumerate(batches):
        cpu = ids.cpu().tolist()
        rows.append([Segment(b * len(cpu) + i, 0, tuple(row), 1) for i, row in enumerate(cpu)])
    return rows


def ours(model, batches, layer: int, top_k: int = 20, extras: bool = True) -> Callable[[], None]:
    """The profiler's real per-batch work: collate, move, forward to mlp.hook_post, top-k + moments, merge.

    ``extras`` adds the default bottom-k and histogram reductions; without them it is the top-k and
    moments alone (``--bottom-k 0 --no-histogram``).
    """
    config = ProfileConfig(layer=layer, top_k=top_k, checkpoint_every=0, bottom_k=20 if extras else 0, histogram=extras)
    profiler = Profiler(model, config)
    planned = _segments(batches)

    def run() -> None:
        for rows in planned:
            profiler.fold(rows, pad_id=0)

    return run


def bare_truncated(model, batches, layer: int) -> Callable[[], None]:
    """The floor: the decoder stack cut after layer L, no hooks, no bookkeeping."""
    layers = model.model.layers

    def run() -> None:
        model.model.layers = layers[: layer + 1]
        try:
            with torch.inference_mode():
                for ids in batches:
                    model.model(input_ids=ids, use_cache=False)
        finally:
            model.model.layers = layers

    return run


def bare_stop_at_site(model, batches, site: str) -> Callable[[], None]:
    """Same stop point as the profiler (before down_proj of layer L), via one stop hook, no bookkeeping."""

    def run() -> None:
        with torch.inference_mode():
            for ids in batches:
                with stop_after(model, site):
                    model(input_ids=ids, use_cache=False)

    return run


def full_forward(model, batches) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids, use_cache=False)

    return run


def transformer_lens_bridge(model):
    """TransformerLens 4.x wraps an HF model (HookedTransformer is gone in 4.0); None if not installed."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy = clone(model)
        return TransformerBridge.boot_transformers(config_dir(model), hf_model=copy, device=str(copy.device), dtype=copy.dtype)


def tl_best(bridge, batches, layer: int, site: str) -> Callable[[], None]:
    """TL at its best: batched, names_filter, stop_at_layer, then a vectorised max per neuron."""

    def run() -> None:
        with torch.inference_mode():
            for ids in batches:
                _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name == site, stop_at_layer=layer + 1)
                cache[site].flatten(0, 1).amax(0)

    return run


def tl_original(bridge, texts: torch.Tensor, site: str) -> Callable[[], None]:
    """As the original profiled: one text at a time, the full cache of the full model, a Python max per neuron."""

    def run() -> None:
        with torch.inference_mode():
            for ids in texts:
                _, cache = bridge.run_with_cache(ids.unsqueeze(0))
                acts = cache[site][0]  # [pos, d_mlp]
                for neuron in range(acts.shape[-1]):
                    acts[:, neuron].max().item()

    return run


def nnsight_stop(model, batches, layer: int) -> Callable[[], None] | None:
    """nnsight trace: save the down_proj input of layer L, then tracer.stop()."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    wrapped = NNsight(clone(model))

    def run() -> None:
        with torch.inference_mode():
            for ids in batches:
                with wrapped.trace(ids) as tracer:
                    acts = wrapped.model.layers[layer].mlp.down_proj.input.save()
                    tracer.stop()
                acts.flatten(0, 1).amax(0)

    return run


def throughput(
    model, *, layer: int, batch: int, seq_len: int, n_batches: int, warmup: int, runs: int, device: str, peers: bool = True
) -> tuple[dict[str, Timing], list[str]]:
    """Tokens/s of every peer on the same batches; returns timings and notes (skipped peers)."""
    site = f"blocks.{layer}.mlp.hook_post"
    batches = random_batches(n_batches, batch, seq_len, model.config.vocab_size, device)
    tokens = n_batches * batch * seq_len
    table: dict[str, tuple[Callable[[], None], int]] = {
        "patchscope profiler (top-k atlas update included)": (ours(model, batches, layer), tokens),
        "patchscope profiler, top-k + moments only (--bottom-k 0 --no-histogram)": (
            ours(model, batches, layer, extras=False),
            tokens,
        ),
        f"bare HF forward, decoder cut after layer {layer} (floor)": (bare_truncated(model, batches, layer), tokens),
        "bare HF forward, stopped at mlp.hook_post (profiler's stop point)": (bare_stop_at_site(model, batches, site), tokens),
    }
    notes: list[str] = []
    if peers:
        table["plain HF forward, all layers + LM head"] = (full_forward(model, batches), tokens)
        bridge = transformer_lens_bridge(model)
        if bridge is None:
            notes.append("TransformerLens not installed: its rows are skipped (pip install -e '.[compare]')")
        else:
            table["TransformerLens run_with_cache, names_filter + stop_at_layer, batched"] = (
                tl_best(bridge, batches, layer, site),
                tokens,
            )
            texts = batches[0]
            table["TransformerLens as the original: 1 text at a time, full cache, Python max"] = (
                tl_original(bridge, texts, site),
                texts.numel(),
            )
        nn_run = nnsight_stop(model, batches, layer)
        if nn_run is None:
            notes.append("nnsight not installed: its row is skipped (pip install -e '.[compare]')")
        else:
            table["nnsight trace + save + tracer.stop(), batched"] = (nn_run, tokens)
    return interleaved(table, warmup=warmup, runs=runs, device=device), notes


def sweep(
    model, *, layer: int, settings: list[tuple[int, int]], n_batches: int, warmup: int, runs: int, device: str
) -> list[dict]:
    """Ours against the floor for several (batch, seq_len)."""
    rows = []
    for batch, seq_len in settings:
        batches = random_batches(n_batches, batch, seq_len, model.config.vocab_size, device)
        tokens = n_batches * batch * seq_len
        timings = interleaved(
            {"ours": (ours(model, batches, layer), tokens), "floor": (bare_truncated(model, batches, layer), tokens)},
            warmup=warmup,
            runs=runs,
            device=device,
        )
        rows.append(
            dict(
                batch=batch,
                seq_len=seq_len,
                ours=timings["ours"].as_dict(),
                floor=timings["floor"].as_dict(),
                ratio=timings["ours"].tokens_per_s / timings["floor"].tokens_per_s,
            )
        )
    return rows


def scaling(model, *, layer: int, batch: int, seq_len: int, sizes: list[int], warmup: int, runs: int, device: str) -> list[dict]:
    """Our profiler over growing numbers of batches: time should grow linearly, memory stay flat."""
    rows = []
    for n_batches in sizes:
        batches = random_batches(n_batches, batch, seq_len, model.config.vocab_size, device)
        timing = interleaved(
            {"ours": (ours(model, batches, layer), n_batches * batch * seq_len)}, warmup=warmup, runs=runs, device=device
        )["ours"]
        rows.append(dict(batches=n_batches, **timing.as_dict()))
    return rows


def padding(model, *, layer: int, batch: int, seq_len: int, n_docs: int, warmup: int, runs: int, device: str) -> dict:
    """Documents of varied length: length-sorted packing (ours) against batches in arrival order.

    Reports the padding fraction of both plans and our profiler's tokens/s on each, beside the
    floor on the same padded batches.
    """
    from patchscope.atlas.batching import collate, pack_by_length

    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(seq_len // 8, seq_len + 1, (n_docs,), generator=generator).tolist()
    documents = [
        Segment(i, 0, (2, *torch.randint(3, model.config.vocab_size, (n - 1,), generator=generator).tolist()), 1)
        for i, n in enumerate(lengths)
    ]
    plans = {
        "length-sorted under a token budget (ours)": list(pack_by_length(documents, batch * seq_len)),
        "arrival order, fixed batch size": [documents[i : i + batch] for i in range(0, n_docs, batch)],
    }
    real = sum(lengths)
    out = {}
    for name, planned in plans.items():
        padded = sum(len(rows) * max(len(r.ids) for r in rows) for rows in planned)
        profiler = Profiler(model, ProfileConfig(layer=layer, checkpoint_every=0))
        tensors = [collate(rows, 0) for rows in planned]
        layers = model.model.layers

        def run_ours(planned=planned, profiler=profiler) -> None:
            for rows in planned:
                profiler.fold(rows, pad_id=0)

        def run_floor(tensors=tensors, layers=layers) -> None:
            model.model.layers = layers[: layer + 1]
            try:
                with torch.inference_mode():
                    for b in tensors:
                        model.model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
            finally:
                model.model.layers = layers

        timings = interleaved({"ours": (run_ours, real), "floor": (run_floor, real)}, warmup=warmup, runs=runs, device=device)
        out[name] = dict(
            batches=len(planned),
            padding_fraction=round(1 - real / padded, 4),
            ours=timings["ours"].as_dict(),
            floor=timings["floor"].as_dict(),
            ratio=timings["ours"].tokens_per_s / timings["floor"].tokens_per_s,
        )
    return dict(documents=n_docs, real_tokens=real, min_len=min(lengths), max_len=max(lengths), plans=out)
