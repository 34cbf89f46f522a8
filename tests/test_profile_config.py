"""ProfileConfig checks: bad numbers, top-k lists longer than the corpus, atlases that cannot fit."""

import dataclasses
import warnings

import pytest
import torch

from patchscope.atlas.profile_config import ATLAS_BYTES_PER_SLOT, HISTOGRAM_BYTES_PER_NEURON, ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import SourceConfig
from patchscope.cli.main import main
from patchscope.kernels.histogram import N_BINS


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sort_buffer": 0}, "`sort_buffer` must be at least 1"),
        ({"sort_buffer": -3}, "`sort_buffer` must be at least 1"),
        ({"checkpoint_every": -1}, "`checkpoint_every` must be 0"),
    ],
)
def test_bad_numbers_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ProfileConfig(**changes).validate()


def test_an_unknown_reduction_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"`reduction` must be one of auto, one_pass, separate, triton, inductor; got 'fast'"):
        ProfileConfig(reduction="fast").validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "argv, flag", [(["--sort-buffer", "0"], "--sort-buffer"), (["--checkpoint-every", "-1"], "--checkpoint-every")]
)
def test_cli_names_the_flag_before_loading_anything(tmp_path, capsys, argv, flag):
    data = tmp_path / "corpus.txt"
    data.write_text("hello\n")
    assert (
        main(
            [
                "profile",
                "--model",
                str(tmp_path / "nowhere"),
                "--dataset",
                str(data),
                "--split",
                "",
                "--out",
                str(tmp_path / "o"),
                *argv,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{flag} must be" in err and "Traceback" not in err


def test_top_k_is_capped_at_the_tokens_the_corpus_can_hold(gemma, tmp_path):
    model, tokenizer = gemma
    data = tmp_path / "corpus.txt"
    data.write_text("one two three four five six\nseven eight\nnine\n")
    config = ProfileConfig(layer=1, top_k=100_000, max_length=8)
    with pytest.warns(RuntimeWarning, match="`top_k` 100000 is more than the at most 24 tokens"):
        atlas = profile(model, tokenizer, SourceConfig(dataset=str(data), split=""), config, progress=False)
    assert atlas.meta.top_k == 24 and atlas["blocks.1.mlp.hook_post"].top.values.shape[0] == 24
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = profile(model, tokenizer, ["a b c", "d e"], ProfileConfig(layer=1, top_k=3, max_length=8), progress=False)
    assert small.meta.top_k == 3


def test_an_atlas_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    config = ProfileConfig(top_k=100_000, bottom_k=0, histogram=False)
    widths = {"blocks.0.mlp.hook_post": 9216, "blocks.1.mlp.hook_post": 9216}
    assert config.atlas_bytes(widths) == ATLAS_BYTES_PER_SLOT * 100_000 * 2 * 9216
    monkeypatch.setattr("patchscope.atlas.profile_config._memory_bytes", lambda device: 16 * 2**30)
    with pytest.raises(ValueError, match=r"18432 neurons \(`top_k` 100000, `bottom_k` 0\) needs about 96.1 GiB.*lower `top_k`"):
        config.check_atlas_size(widths, torch.device("cpu"))
    ProfileConfig(top_k=20).check_atlas_size(widths, torch.device("cpu"))


def test_the_state_counts_bottom_k_and_histograms_and_the_cpu_workspace(monkeypatch):
    """The default statistics at gemma-2-2b width: bottom-k doubles the slots, the histogram adds its
    bins, and the CPU pass holds 12 bytes per entry of the largest batch (about 450 MB at 4,096 tokens)."""
    widths = {"blocks.12.mlp.hook_post": 9216}
    config = ProfileConfig()
    assert HISTOGRAM_BYTES_PER_NEURON == 8 * N_BINS
    assert config.atlas_bytes(widths) == (ATLAS_BYTES_PER_SLOT * 40 + 8 * N_BINS) * 9216
    assert config.workspace_bytes(widths, "cpu") == 12 * 4096 * 9216  # 453 MB
    assert (
        config.workspace_bytes(widths, "meta") == 0
        and dataclasses.replace(config, reduction="separate").workspace_bytes(widths) == 0
    )
    monkeypatch.setattr(
        "patchscope.atlas.profile_config._memory_bytes", lambda device: 3 * 2**28
    )  # 768 MiB: half of it is less than the workspace
    with pytest.raises(ValueError, match=r"the batch workspace 0.4 GiB.*or `batch_tokens`"):
        config.check_atlas_size(widths, torch.device("cpu"))
    dataclasses.replace(config, batch_tokens=512).check_atlas_size(widths, torch.device("cpu"))
