"""SIGINT / SIGTERM (`patchscope/util/signals.py`): finish the batch, checkpoint, one line, exit 130 / 143."""

from __future__ import annotations

import signal

import child_runs
import pytest
from run_inputs import TEXTS, ctrl_c_at_batch, profile_argv

from patchscope.atlas.folder import CHECKPOINT
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.store import load_atlas
from patchscope.cli.main import main
from patchscope.util.signals import Interrupted

LAYER = 2


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_prints_one_line(gemma_dir, tmp_path, signum, code, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(TEXTS * 3))
    out = tmp_path / "out"
    argv = profile_argv(
        gemma_dir,
        data,
        out,
        "--dtype",
        "float32",
        "--layer",
        str(LAYER),
        "--top-k",
        "3",
        "--max-length",
        "16",
        "--batch-tokens",
        "48",
        "--checkpoint-every",
        "50",
    )
    child = child_runs.start("before_batch", 3, argv)  # two batches folded, the third about to start
    child.send_signal(signum)
    returncode, err = child_runs.go_on(child)
    lines = [line for line in err.splitlines() if line.startswith("patchscope")]  # besides the progress bars
    assert returncode == code, err
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"patchscope profile: interrupted ({name}) after 3 batches (")
    assert lines[0].endswith(f"checkpoint saved to {out / CHECKPOINT}; rerun the same command with --resume")
    documents = int(lines[0].split("batches (")[1].split()[0])
    assert main(argv + ["--resume"]) == 0
    assert f"resuming after 3 batches ({documents} documents)" in capsys.readouterr().err
    assert load_atlas(out).meta.provenance.resumed_after_batches == 3


def test_library_profile_raises_interrupted_after_checkpointing(gemma, tmp_path):
    model, tokenizer = gemma
    config = ProfileConfig(layer=LAYER, top_k=2, max_length=16, batch_tokens=48, checkpoint_every=0)
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN in a shell's background job
    with ctrl_c_at_batch(2), pytest.raises(Interrupted) as stopped:
        profile(model, tokenizer, TEXTS * 2, config, out=tmp_path / "o", progress=False)
    assert stopped.value.checkpoint == tmp_path / "o" / CHECKPOINT and stopped.value.checkpoint.exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
