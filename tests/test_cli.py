import subprocess
import sys

import pytest

from patchscope import __version__
from patchscope.cli.main import main


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as exit:
        assert exit.code == 0
    assert __version__ in capsys.readouterr().out


def test_sites_command_lists_modules(gemma_dir, capsys):
    assert main(["sites", "--model", str(gemma_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "blocks.3.hook_mlp_out" in out and "model.layers.3.post_feedforward_layernorm" in out


def test_console_script_installed(tmp_path):
    result = subprocess.run([sys.executable, "-m", "patchscope", "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout


def test_profile_command_end_to_end(gemma_dir, tmp_path, capsys):
    import json

    from factories import FIXTURE_CORPUS

    from patchscope.atlas.store import load_atlas

    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"body": t}) for t in FIXTURE_CORPUS))
    out = tmp_path / "out"
    argv = ["profile", "--model", str(gemma_dir), "--device", "cpu", "--dataset", str(data), "--split", "[2:12]",
            "--text-column", "body", "--layer", "1", "--top-k", "3", "--max-length", "16", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "blocks.1.mlp.hook_post: top neurons" in printed
    atlas = load_atlas(out)
    mapping = json.loads((out / "gemma2_neuron_mapping_layer_1.json").read_text())
    assert len(mapping) == 128 and all(2 <= v["text_index"] < 12 for v in mapping.values())
    assert (out / "top_examples_blocks.1.mlp.hook_post.parquet").exists()
    assert atlas.meta.dataset == str(data) and atlas.meta.split == "[2:12]"


def test_profile_command_rejects_bad_layer_before_loading(gemma_dir, tmp_path, capsys):
    assert main(["profile", "--model", str(gemma_dir), "--layer", "7", "--dataset", "x.txt", "--split", "", "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("hello")
    assert main(["profile", "--model", str(gemma_dir), "--layer", "7", "--dataset", str(tmp_path / "x.txt"), "--split", "", "--out", str(tmp_path)]) == 2
    assert "layer 7 is out of range" in capsys.readouterr().err


def test_sae_command(gemma_dir, tmp_path, capsys):
    from sae_files import sae_params, write_npz

    sae = write_npz(tmp_path / "layer_1/width_16k/average_l0_30/params.npz", sae_params())
    argv = ["sae", "--sae", str(sae), "--model", str(gemma_dir), "--device", "cpu", "--text", "The quick brown fox", "--position", "2", "--k", "3", "--neuron", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained on blocks.1.hook_resid_post" in out and "relative error" in out
    assert "features that drive neuron 4 of blocks.2.mlp.hook_post" in out
    bad = write_npz(tmp_path / "wide.npz", sae_params(d_model=32))
    assert main(["sae", "--sae", str(bad), "--model", str(gemma_dir), "--text", "x", "--position", "0", "--site", "blocks.1.hook_resid_post"]) == 2
    assert "width mismatch" in capsys.readouterr().err
    assert main(["sae", "--sae", str(sae), "--model", str(gemma_dir), "--text", "x", "--position", "1", "--site", "blocks.1.hook_resid_pre"]) == 2
    assert "allow-site-mismatch" in capsys.readouterr().err


def test_library_messages_name_parameters_and_the_cli_names_flags(tmp_path, capsys):
    from patchscope.atlas.config import ProfileConfig

    with pytest.raises(ValueError, match="`top_k` must be at least 1"):
        ProfileConfig(top_k=0).validate()
    data = tmp_path / "corpus.txt"
    data.write_text("hello\n")
    argv = ["profile", "--model", str(tmp_path), "--dataset", str(data), "--top-k", "0", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err
