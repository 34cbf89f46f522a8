import re
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
    argv = [
        "profile",
        "--model",
        str(gemma_dir),
        "--device",
        "cpu",
        "--dataset",
        str(data),
        "--split",
        "[2:12]",
        "--text-column",
        "body",
        "--layer",
        "1",
        "--top-k",
        "3",
        "--max-length",
        "16",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "blocks.1.mlp.hook_post: top neurons" in printed
    atlas = load_atlas(out)
    mapping = json.loads((out / "gemma2_neuron_mapping_layer_1.json").read_text())
    assert len(mapping) == 128 and all(2 <= v["text_index"] < 12 for v in mapping.values())
    assert (out / "top_examples_blocks.1.mlp.hook_post.parquet").exists()
    assert atlas.meta.dataset == str(data) and atlas.meta.split == "[2:12]"


def test_profile_command_rejects_bad_layer_before_loading(gemma_dir, tmp_path, capsys):
    assert (
        main(["profile", "--model", str(gemma_dir), "--layer", "7", "--dataset", "x.txt", "--split", "", "--out", str(tmp_path)])
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("hello")
    assert (
        main(
            [
                "profile",
                "--model",
                str(gemma_dir),
                "--layer",
                "7",
                "--dataset",
                str(tmp_path / "x.txt"),
                "--split",
                "",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "layer 7 is out of range" in capsys.readouterr().err


def test_sae_command(gemma_dir, tmp_path, capsys):
    from sae_files import sae_params, write_npz

    sae = write_npz(tmp_path / "layer_1/width_16k/average_l0_30/params.npz", sae_params())
    argv = [
        "sae",
        "--sae",
        str(sae),
        "--model",
        str(gemma_dir),
        "--device",
        "cpu",
        "--text",
        "The quick brown fox",
        "--position",
        "2",
        "--k",
        "3",
        "--neuron",
        "4",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained on blocks.1.hook_resid_post" in out and "relative error" in out
    assert "features that drive neuron 4 of blocks.2.mlp.hook_post" in out
    bad = write_npz(tmp_path / "wide.npz", sae_params(d_model=32))
    assert (
        main(
            [
                "sae",
                "--sae",
                str(bad),
                "--model",
                str(gemma_dir),
                "--text",
                "x",
                "--position",
                "0",
                "--site",
                "blocks.1.hook_resid_post",
            ]
        )
        == 2
    )
    assert "width mismatch" in capsys.readouterr().err
    assert (
        main(
            [
                "sae",
                "--sae",
                str(sae),
                "--model",
                str(gemma_dir),
                "--text",
                "x",
                "--position",
                "1",
                "--site",
                "blocks.1.hook_resid_pre",
            ]
        )
        == 2
    )
    assert "allow-site-mismatch" in capsys.readouterr().err


def test_sae_command_checks_position_and_neuron_before_the_model_loads(gemma_dir, tmp_path, capsys, monkeypatch):
    from sae_files import sae_params, write_npz

    sae = write_npz(tmp_path / "layer_1/width_16k/average_l0_30/params.npz", sae_params())
    monkeypatch.setattr("patchscope.model.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["sae", "--sae", str(sae), "--model", str(gemma_dir), "--text", "The quick brown fox"]
    assert main([*argv, "--position", "40"]) == 2
    assert "--position 40 is outside the text's" in capsys.readouterr().err
    assert main([*argv, "--position", "2", "--neuron", "100000"]) == 2
    assert "--neuron 100000 is out of range" in capsys.readouterr().err


def test_library_messages_name_parameters_and_the_cli_names_flags(tmp_path, capsys):
    from patchscope.atlas.profile_config import ProfileConfig

    with pytest.raises(ValueError, match="`top_k` must be at least 1"):
        ProfileConfig(top_k=0).validate()
    data = tmp_path / "corpus.txt"
    data.write_text("hello\n")
    argv = ["profile", "--model", str(tmp_path), "--dataset", str(data), "--top-k", "0", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag):
    code = (
        "import sys\nfrom patchscope.cli.main import main\n"
        f"try:\n    main([{flag!r}])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_top_level_help_describes_commands_with_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "The ``patchscope`` command" not in out and "examples:" in out
    assert all(f'"{name}"' in out for name in ("sites", "profile", "sae", "run"))


def _option_help(parser):
    """{flag: help} for every option of a built subcommand parser."""
    return {action.option_strings[-1]: action.help for action in parser._actions if action.option_strings}


@pytest.mark.parametrize("command", ["sites", "profile", "sae", "run"])
def test_every_flag_has_one_clean_help_line(command, capsys):
    from patchscope.cli.main import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    helps = _option_help(sub)
    assert all(text for text in helps.values()), [flag for flag, text in helps.items() if not text]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "`" not in out
    assert "(default: None)" not in out and "(default: ())" not in out
    flat = " ".join(out.split())
    assert not re.search(r"\(default: [^)]*\)[.]? \(default:", flat)
    device = next(a for a in sub._actions if "--device" in a.option_strings)
    assert list(device.choices) == ["auto", "cpu", "cuda"]
    model = next(a for a in sub._actions if "--model" in a.option_strings)
    assert "gemma-2-2b" in model.help


def test_config_fields_carry_their_help_in_metadata():
    import dataclasses

    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.sources import SourceConfig
    from patchscope.experiment import ExperimentConfig
    from patchscope.scope.config import PatchscopeConfig

    for cls in (ProfileConfig, SourceConfig, PatchscopeConfig, ExperimentConfig):
        for spec in dataclasses.fields(cls):
            if spec.name in ("source", "profile", "patchscope"):
                continue
            assert spec.metadata.get("help"), f"{cls.__name__}.{spec.name} has no metadata help"
    import patchscope.cli.args as args

    assert "inspect" not in vars(args) and "ast" not in vars(args)
