import subprocess
import sys

from patchscope import __version__
from patchscope.cli import main


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
    result = subprocess.run([sys.executable, "-m", "patchscope.cli", "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and __version__ in result.stdout
