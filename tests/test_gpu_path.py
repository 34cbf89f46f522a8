"""The profiler's GPU path, checked without a GPU: host syncs, launches and device placement.

No test here runs CUDA. The model and the running state sit on PyTorch's ``meta`` device, which is not
the CPU (so every non-CPU branch runs) and holds no data: any read back to the host (``.item()``,
``bool(tensor)``, ``nonzero``) raises there, as it would stall a GPU. `DeviceCounter` counts the aten
ops of a region (about one kernel launch each on a GPU) and records ops that mix devices. The Triton
kernel itself cannot run on ``meta``: its stand-in is the same pass in plain torch (`fused.block_pass`),
and the kernel is held to the references under ``TRITON_INTERPRET=1`` in ``tests/test_kernels.py``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from factories import FIXTURE_CORPUS
from torch.utils._python_dispatch import TorchDispatchMode

from patchscope.atlas.batching import plan
from patchscope.atlas.engine import Profiler
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.sources import Document
from patchscope.kernels import fused

SITES = ["blocks.1.mlp.hook_post", "blocks.2.hook_resid_post"]
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default", "aten.equal.default"}


class DeviceCounter(TorchDispatchMode):
    """Counts the aten ops run inside it; records host reads of device tensors (a CPU tensor's read is
    no sync) and ops whose tensors sit on several devices."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.mixed: list[str] = []
        self.host_reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor) and a.dim()]
        if len({t.device for t in tensors}) > 1:
            self.mixed.append(str(func))
        first = [a for a in args[:1] if isinstance(a, torch.Tensor)]  # `.item()` reads a 0-dim tensor
        if str(func) in HOST_READS and any(t.device.type != "cpu" for t in tensors + first):
            self.host_reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def meta_model(gemma_dir):
    """The tiny Gemma-2 on the meta device, where any host read raises."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # CI's second stage runs 4.57
        pytest.skip("transformers 4.x's Gemma-2 rotary embedding opens torch.autocast on the meta device, which has no backend")
    from patchscope import load_model

    model, tokenizer = load_model(str(gemma_dir), dtype="float32", device="cpu")
    return model.to("meta"), tokenizer


@pytest.fixture
def kernel_on_meta(monkeypatch):
    """The Triton pass, replaced by its plain-torch twin (same outputs, runs on ``meta``)."""
    real = fused.block_stats
    monkeypatch.setattr(
        fused, "block_stats", lambda acts, counted, low, backend="eager", **kw: real(acts, counted, low, "eager", **kw)
    )


def _profiler(model, reduction: str = "triton", **changes) -> Profiler:
    settings = dict(sites=SITES, top_k=3, bottom_k=2, histogram=True, max_length=16, batch_tokens=64)
    config = ProfileConfig(**{**settings, **changes})
    profiler = Profiler(model, config)
    profiler._reduction = reduction  # what `auto` picks on CUDA with Triton installed
    return profiler


def _batches(tokenizer, batch_tokens: int, copies: int = 3):
    texts = [t for t in FIXTURE_CORPUS if t] * copies
    documents = [Document(i, t) for i, t in enumerate(texts)]
    return list(plan(documents, tokenizer, max_length=16, overflow="truncate", exclude_bos=True, batch_tokens=batch_tokens))


def test_a_fold_on_the_gpu_path_reads_nothing_back(meta_model, kernel_on_meta):
    """Every batch, every site, and the merges: no host sync and no tensor on another device."""
    model, tokenizer = meta_model
    profiler = _profiler(model)
    with DeviceCounter() as counter:
        for rows in _batches(tokenizer, 64)[:6]:  # more than MERGE_EVERY: the merge runs inside
            profiler.fold(rows, tokenizer.pad_token_id)
        profiler.flush()
    assert counter.host_reads == [] and counter.mixed == []
    assert profiler.state[SITES[0]].top.values.device.type == "meta"


def test_the_separate_kernels_do_read_back(meta_model):
    """The check above can fail: the eager kernels' tie fallback reads the flagged neurons on the host."""
    model, tokenizer = meta_model
    profiler = _profiler(model, reduction="eager")
    with pytest.raises((RuntimeError, NotImplementedError), match="nonzero"):
        profiler.fold(_batches(tokenizer, 64)[0], tokenizer.pad_token_id)


def _reduce_ops(profiler: Profiler, tokenizer, batch_tokens: int) -> list[int]:
    """Aten ops of each site's reduction, per batch (the hook's work only, not the model's)."""
    counts: list[int] = []
    reduce = profiler._reduce

    def counted_reduce(site, acts):
        with DeviceCounter() as counter:
            pieces = reduce(site, acts)
        counts.append(sum(counter.ops.values()))
        return pieces

    profiler._reduce = counted_reduce  # type: ignore[method-assign]
    for rows in _batches(tokenizer, batch_tokens)[:2]:
        profiler.fold(rows, tokenizer.pad_token_id)
    return counts


def test_launches_per_site_do_not_grow_with_the_batch(meta_model, kernel_on_meta):
    model, tokenizer = meta_model
    small = _reduce_ops(_profiler(model), tokenizer, 32)
    large = _reduce_ops(_profiler(model, batch_tokens=256), tokenizer, 256)
    assert len(set(small + large)) == 1, (small, large)  # the same ops whatever the batch
    # A fixed list: 157 aten ops at two sites with bottom-k and histograms, 76 of them the plain-torch
    # stand-in of the one Triton launch (docs/gpu.md); view ops among them launch nothing.
    assert small[0] < 200, small


def test_without_bottom_k_and_histogram_the_pass_does_less(meta_model, kernel_on_meta):
    model, tokenizer = meta_model
    full = _reduce_ops(_profiler(model), tokenizer, 64)
    bare = _reduce_ops(_profiler(model, bottom_k=0, histogram=False), tokenizer, 64)
    assert bare[0] < full[0]


def test_the_merge_indexes_on_the_states_device():
    """A merge of fewer rows than k pads with an index on the state's device, not a CPU one."""
    from patchscope.atlas.stats import TopK
    from patchscope.kernels.topk_merge_fast import merge_topk_fast

    part = TopK.empty(2, 5, "meta")
    with DeviceCounter() as counter:
        merged = merge_topk_fast(
            dataclasses.replace(part, values=part.values[:1], doc=part.doc[:1], pos=part.pos[:1], token=part.token[:1])
        )
    assert merged.k == 1 and counter.mixed == [] and counter.host_reads == []


def test_the_triton_launch_runs_under_the_tensors_device():
    pytest.importorskip("triton", reason="pip install -e '.[triton]'")
    from contextlib import nullcontext

    from patchscope.kernels.triton_stats import launch_device

    launch = launch_device(torch.device("cuda:1"))
    assert isinstance(launch, torch.cuda.device) and launch.idx == 1  # entered only at the launch, on CUDA
    assert isinstance(launch_device(torch.device("cpu")), nullcontext)


def test_the_quantile_pass_picks_on_the_sites_device(meta_model, monkeypatch):
    """A site on another device than the inputs (a device_map): bounds and picks follow the activations."""
    from types import SimpleNamespace

    from patchscope.atlas import quantile_pass

    model, tokenizer = meta_model
    monkeypatch.setattr(quantile_pass, "model_device", lambda model: torch.device("cpu"))  # the inputs' device
    site = SITES[0]
    atlas = type("Atlas", (), {"sites": {site: None}, "__getitem__": lambda self, name: SimpleNamespace(max=torch.ones(128))})()
    documents = [Document(i, t) for i, t in enumerate(t for t in FIXTURE_CORPUS if t)]
    config = ProfileConfig(sites=[site], max_length=16, batch_tokens=64, quantile_examples=2)
    with DeviceCounter() as counter, pytest.raises(NotImplementedError, match="meta tensor"):  # the copy to the host:
        quantile_pass.quantile_examples(model, tokenizer, documents, atlas, config)  # meta holds no data
    assert set(counter.mixed) == {"aten.embedding.default"}  # only where the fake put the ids on the CPU
    assert counter.ops["aten.cumsum.default"] > 0  # the picks ran


def test_a_patch_at_positions_decides_on_the_host(meta_model):
    """`patch` with positions (the Patchscope's write, every generation step): no device read per call."""
    from patchscope.model.hooks import patch

    model, _ = meta_model
    ids = torch.zeros(2, 6, dtype=torch.long, device="meta")
    with DeviceCounter() as counter, patch(model, "blocks.1.hook_resid_pre", torch.ones(64, device="meta"), positions=[3]):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)  # without a mask HF reads one
    assert counter.host_reads == [] and counter.ops["aten.index_put_.default"] == 1


def test_a_feature_site_is_encoded_and_reduced_where_its_site_lives(meta_model, kernel_on_meta, monkeypatch):
    """Under a device_map the SAE's site may live on another device than the inputs and the state: the SAE
    follows the activations there, every chunk is reduced there, and only the small results travel back."""
    from sae_files import sae_params

    from patchscope.atlas import engine
    from patchscope.sae.features import feature_site
    from patchscope.sae.jumprelu import JumpReLUSAE

    model, tokenizer = meta_model
    monkeypatch.setattr(engine, "model_device", lambda model: torch.device("cpu"))  # the inputs' and the state's device
    params = sae_params(d_model=64, d_sae=40)
    sae = JumpReLUSAE(*(torch.from_numpy(params[k]) for k in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")))
    feature = dataclasses.replace(feature_site(sae, site="blocks.1.hook_resid_post", label="tiny"), encode_bytes=4 * 40 * 7)
    config = ProfileConfig(sites=(SITES[1],), top_k=3, bottom_k=2, max_length=16, batch_tokens=64)  # a later site
    profiler = Profiler(model, config, [feature])
    profiler._reduction = "triton"
    with DeviceCounter() as counter, pytest.raises(NotImplementedError, match="meta tensor"):  # the copy to the state:
        profiler.fold(_batches(tokenizer, 64)[0], tokenizer.pad_token_id)  # meta holds no data
    assert set(counter.mixed) == {"aten.embedding.default"}  # only where the fake put the ids on the CPU
    assert sae.W_enc.device.type == "meta"  # the SAE moved to the site's device to encode there
