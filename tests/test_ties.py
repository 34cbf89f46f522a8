"""The ranking rule across batches: value descending, then document, then position, ties exact.

The profiler's batches are length-sorted, so equal values normally arrive in an order other than the
document order: a longer, later document is folded before a shorter, earlier one. Two references:

- ``blocks.0.hook_resid_pre`` is the scaled embedding, an elementwise function of the token, so its
  value is bit-identical wherever a token occurs, in any batch. One document at a time gives the
  same values, and every repeated token is an exact tie across batches, at the running k-th value.
- An MLP site's values depend on the batch's shape in the last bit (a matrix product over another
  number of rows rounds differently), so there the reference replays the profiler's own batches
  through the HF model and ranks what they computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random

import numpy as np
import pytest
import torch
from run_inputs import TEXTS, ctrl_c_at_batch, profile_argv, torchrun, write_corpus

from patchscope import load_model
from patchscope.atlas.batching import collate
from patchscope.atlas.folder import CHECKPOINT
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import Document, SourceConfig
from patchscope.atlas.store import load_atlas
from patchscope.cli.main import main

EMBED = "blocks.0.hook_resid_pre"
MLP = "blocks.2.mlp.hook_post"
K = 6


def tie_corpus() -> list[str]:
    """Identical documents spread over the corpus, and short earlier documents repeating the words
    of long later ones: ties cross batches in every order."""
    rng = random.Random(7)
    words = " ".join(TEXTS).split()
    copy = " ".join(words[:5])
    docs = [copy]
    for index in range(1, 160):
        if index % 6 == 0:
            docs.append(copy)
        else:
            docs.append(" ".join(rng.choice(words[:40]) for _ in range(rng.randint(2, 30))))
    return docs


CORPUS = tie_corpus()
CONFIG = ProfileConfig(sites=(EMBED, MLP), top_k=K, bottom_k=K, max_length=24, batch_tokens=480, sort_buffer=64)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, gemma_dir):
    return load_model(str(gemma_dir), dtype=request.param, device="cpu")


class Capture:
    """Plain HF hooks (not ours): the input of layer 0 (the scaled embedding) and of layer 2's down_proj."""

    def __init__(self, model) -> None:
        self.model = model
        self.seen: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Capture:
        def keep(site):
            return lambda module, args, kwargs: self.seen.__setitem__(site, kwargs.get("hidden_states", *args[:1]))

        layers = self.model.model.layers
        self.handles = [
            layers[0].register_forward_pre_hook(keep(EMBED), with_kwargs=True),
            layers[2].mlp.down_proj.register_forward_pre_hook(keep(MLP), with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@dataclasses.dataclass
class Rows:
    """Every counted token of one site, in the order the profiler folds them."""

    values: torch.Tensor  # [rows, n] float32
    doc: torch.Tensor
    pos: torch.Tensor


def replayed(model, tokenizer, texts, config: ProfileConfig) -> dict[str, Rows]:
    """Both sites as computed in the profiler's own batches (its plan, its padding, its order)."""
    parts: dict[str, list[tuple[torch.Tensor, ...]]] = {EMBED: [], MLP: []}
    documents = (Document(i, t) for i, t in enumerate(texts))
    batches = config.plan(documents, tokenizer)
    with Capture(model) as hooks, torch.inference_mode():
        for rows in batches:
            batch = collate(rows, tokenizer.pad_token_id)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            counted = batch.counted.reshape(-1)
            for site, seen in hooks.seen.items():
                flat = seen.float().reshape(-1, seen.shape[-1])[counted]
                parts[site].append((flat, batch.doc.reshape(-1)[counted], batch.position.reshape(-1)[counted]))
    return {site: Rows(*(torch.cat(p) for p in zip(*got))) for site, got in parts.items()}


class Stop(Exception):
    pass


def one_at_a_time(model, tokenizer, texts, config: ProfileConfig) -> Rows:
    """The embedding site one document per forward (stopped by a plain hook), rows in document order."""
    values, docs, positions = [], [], []
    first = 1 if config.exclude_bos else 0

    def keep_and_stop(module, args, kwargs):
        seen = kwargs.get("hidden_states", *args[:1])[0, first:].float()
        values.append(seen)
        docs.extend([len(values) - 1] * len(seen))
        positions.extend(range(first, first + len(seen)))
        raise Stop

    handle = model.model.layers[0].register_forward_pre_hook(keep_and_stop, with_kwargs=True)
    try:
        with torch.inference_mode():
            for text in texts:
                with contextlib.suppress(Stop):
                    model(torch.tensor([tokenizer(text).input_ids[: config.max_length]]), use_cache=False)
    finally:
        handle.remove()
    return Rows(torch.cat(values), torch.tensor(docs), torch.tensor(positions))


def ranked(rows: Rows, k: int, largest: bool) -> list[list[tuple[int, int]]]:
    """Per neuron, the (doc, pos) of the best k by the rule, written apart from our kernels: NumPy's
    lexsort on (value, doc, pos), the value negated for the top."""
    values = rows.values.numpy()
    doc, pos = rows.doc.numpy(), rows.pos.numpy()
    out = []
    for neuron in range(values.shape[1]):
        order = np.lexsort((pos, doc, -values[:, neuron] if largest else values[:, neuron]))[:k]
        out.append(list(zip(doc[order].tolist(), pos[order].tolist())))
    return out


def ties_decided_out_of_order(rows: Rows, k: int) -> int:
    """Neurons whose k-th value is shared by rows inside and outside the top k, and where the profiler
    folds a later document of that tie before an earlier one: the cases this file is about. Counted
    so that data without them fails the test instead of passing it."""
    count = 0
    for neuron in range(rows.values.shape[1]):
        column = rows.values[:, neuron]
        kth = column.sort(descending=True).values[k - 1]
        above, tied = int((column > kth).sum()), (column == kth).nonzero().flatten()
        docs = rows.doc[tied]  # in folding order
        if above + len(tied) > k and bool((docs[1:] < docs[:-1]).any()):
            count += 1
    return count


def atlas_order(stats) -> list[list[tuple[int, int]]]:
    return [list(zip(stats.doc[:, n].tolist(), stats.pos[:, n].tolist())) for n in range(stats.doc.shape[1])]


def assert_follows_the_rule(atlas, model, tokenizer, texts, config: ProfileConfig) -> None:
    sites = replayed(model, tokenizer, texts, config)
    embedding = sites[EMBED]
    # the embedding site's values do not depend on the batch: the replay equals one document at a time
    order = (embedding.doc * 1_000 + embedding.pos).argsort()
    assert torch.equal(embedding.values[order], one_at_a_time(model, tokenizer, texts, config).values)
    for site, rows in sites.items():
        assert atlas_order(atlas[site].top) == ranked(rows, config.top_k, largest=True), site
        assert atlas_order(atlas[site].bottom) == ranked(rows, config.bottom_k, largest=False), site
    assert ties_decided_out_of_order(embedding, config.top_k) > 0, "no tie at the k-th value arrives out of order"


@pytest.mark.parametrize("reduction", ["auto", "separate"])
def test_ties_across_batches_follow_the_rule(model, reduction):
    net, tokenizer = model
    config = dataclasses.replace(CONFIG, reduction=reduction)
    atlas = profile(net, tokenizer, CORPUS, config, progress=False)
    assert_follows_the_rule(atlas, net, tokenizer, CORPUS, config)


# -- the same rule through resume, data-parallel ranks and `patchscope merge`: the embedding site,
# whose values no batching, thread count or process can change

EMBED_FLAGS = ["--site", EMBED, "--top-k", str(K), "--bottom-k", str(K), "--max-length", "24", "--batch-tokens", "480"]


@pytest.fixture(scope="module")
def tie_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("ties") / "ties.jsonl", CORPUS)


def assert_embedding_follows_the_rule(atlas, model, tokenizer) -> None:
    rows = one_at_a_time(model, tokenizer, CORPUS, dataclasses.replace(CONFIG, sites=(EMBED,)))
    assert atlas_order(atlas[EMBED].top) == ranked(rows, K, largest=True)
    assert atlas_order(atlas[EMBED].bottom) == ranked(rows, K, largest=False)


def test_ties_survive_an_interrupted_and_resumed_run(gemma, gemma_dir, tie_file, tmp_path):
    argv = profile_argv(gemma_dir, tie_file, tmp_path / "o", *EMBED_FLAGS, "--sort-buffer", "32", "--checkpoint-every", "1")
    with ctrl_c_at_batch(3):
        assert main(argv) == 130  # stopped, with a checkpoint of 2 batches
    assert (tmp_path / "o" / CHECKPOINT).exists()
    assert main([*argv, "--resume"]) == 0
    assert_embedding_follows_the_rule(load_atlas(tmp_path / "o"), *gemma)


def test_ties_survive_merging_slices(gemma, tie_file, tmp_path):
    model, tokenizer = gemma
    config = ProfileConfig(sites=(EMBED,), top_k=K, bottom_k=K, max_length=24, batch_tokens=480)
    for split in ("[100:]", "[0:37]", "[37:100]"):  # the later slice first: its ties arrive before earlier documents'
        profile(model, tokenizer, SourceConfig(dataset=str(tie_file), split=split), config, out=tmp_path / split, progress=False)
    assert main(["merge", str(tmp_path / "m"), *(str(tmp_path / s) for s in ("[100:]", "[37:100]", "[0:37]"))]) == 0
    assert_embedding_follows_the_rule(load_atlas(tmp_path / "m"), model, tokenizer)


def test_ties_survive_two_ranks(gemma, gemma_dir, tie_file, tmp_path):
    argv = profile_argv(gemma_dir, tie_file, tmp_path / "o", *EMBED_FLAGS, "--sort-buffer", "16", "--dtype", "float32")
    result = torchrun(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    atlas = load_atlas(tmp_path / "o")
    assert atlas.meta.provenance.world_size == 2
    assert_embedding_follows_the_rule(atlas, *gemma)
