"""ProfileConfig checks: bad numbers, top-k lists longer than the corpus, atlases that cannot fit."""

import warnings

import pytest
import torch

from patchscope.atlas.profile_config import ATLAS_BYTES_PER_SLOT, ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import SourceConfig
from patchscope.cli.main import main


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
    config = ProfileConfig(top_k=100_000)
    widths = {"blocks.0.mlp.hook_post": 9216, "blocks.1.mlp.hook_post": 9216}
    assert config.atlas_bytes(widths) == ATLAS_BYTES_PER_SLOT * 100_000 * 2 * 9216
    monkeypatch.setattr("patchscope.atlas.profile_config._memory_bytes", lambda device: 16 * 2**30)
    with pytest.raises(ValueError, match=r"`top_k` 100000 over 18432 neurons needs about 96.1 GiB.*lower `top_k`"):
        config.check_atlas_size(widths, torch.device("cpu"))
    ProfileConfig(top_k=20).check_atlas_size(widths, torch.device("cpu"))
