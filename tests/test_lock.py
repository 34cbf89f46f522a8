"""One writer per output folder (`patchscope/util/lock.py`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from run_inputs import TEXTS, profile_argv, write_corpus

from patchscope.atlas.store import ATLAS_TENSORS
from patchscope.cli.main import main
from patchscope.util.lock import LOCK_FILE, OutputBusyError, output_lock

HOLDER = """
import sys
from patchscope.util.lock import output_lock
with output_lock(sys.argv[1]):
    print("READY", flush=True)
    sys.stdin.readline()
"""


def test_a_second_run_on_a_locked_folder_is_refused_and_the_lock_dies_with_its_process(gemma_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "READY"  # it holds the lock now
    with pytest.raises(OutputBusyError, match=rf"another patchscope run \(pid {holder.pid}\) is writing to"):
        with output_lock(out):
            pass
    data = write_corpus(tmp_path / "c.jsonl", TEXTS)
    argv = profile_argv(gemma_dir, data, out, "--layer", "1", "--max-length", "16")
    assert main(argv) == 2
    assert "another patchscope run" in capsys.readouterr().err and not (out / ATLAS_TENSORS).exists()
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.wait()
    with output_lock(out):
        assert (out / LOCK_FILE).exists()
    assert list(out.iterdir()) == []  # no lock file is left behind


def test_a_lock_taken_on_a_new_folder_removes_it_when_nothing_was_written(tmp_path):
    with output_lock(tmp_path / "new" / "out"):
        pass
    assert not (tmp_path / "new" / "out").exists()


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with output_lock(tmp_path / "o"), output_lock(tmp_path / "o"):
        (tmp_path / "o" / "kept").write_text("x")
    assert (tmp_path / "o" / "kept").exists() and not (tmp_path / "o" / LOCK_FILE).exists()
