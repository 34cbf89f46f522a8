"""An adversarial reliability run: kills at every kind of moment, corrupted atlas files, bad inputs.

    python -m benchmarks.reliability [--kills 12] [--flips 300]

Not a speed benchmark: it counts. Every kill is followed by the same command (with --resume when a
checkpoint was left), and the final atlas must equal an uninterrupted run's bit for bit. Every
corrupted file must raise AtlasError. Every bad input must exit 2 with a one-line message, no
traceback, and no output folder. Uses the tiny seeded Gemma-2 of tests/factories.py on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import child_runs  # noqa: E402
from factories import FIXTURE_CORPUS, tiny_gemma2  # noqa: E402

from patchscope.atlas.atlas import AtlasError  # noqa: E402
from patchscope.atlas.store import load_atlas  # noqa: E402
from patchscope.cli.main import main  # noqa: E402


def argv_for(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "profile",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--dataset",
        str(data),
        "--split",
        "",
        "--layer",
        "2",
        "--top-k",
        "4",
        "--max-length",
        "16",
        "--batch-tokens",
        "48",
        "--checkpoint-every",
        "1",
        "--sort-buffer",
        "7",
        "--out",
        str(out),
    ]


def rerun(argv: list[str], out: Path) -> int:
    resume = ["--resume"] if (out / "checkpoint.safetensors").exists() else []
    env_threads = (
        "import torch; torch.set_num_threads(1); from patchscope.cli.main import main; import sys; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run([sys.executable, "-c", env_threads, *argv, *resume], capture_output=True, text=True).returncode


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kills(work: Path, model: Path, data: Path, reference: dict, n: int) -> tuple[int, int, list[str]]:
    plans = [("after_checkpoint", k, signal.SIGKILL) for k in range(1, n // 3 + 1)]
    plans += [("mid_checkpoint", k, signal.SIGKILL) for k in range(1, n // 3 + 1)]
    plans += [("before_commit", 1, signal.SIGKILL)]
    plans += [("before_batch", k, s) for k, s in ((2, signal.SIGINT), (4, signal.SIGTERM), (6, signal.SIGINT))]
    survived, failures, sent = 0, [], 0
    for index, (point, at, signum) in enumerate(plans):
        out = work / f"kill{index}"
        argv = argv_for(model, data, out)
        child = child_runs.start(point, at, argv)
        child.send_signal(signum)
        sent += 1
        if signum == signal.SIGKILL:
            child.wait()
        else:
            child_runs.go_on(child)
        if point == "after_checkpoint" and at % 2 == 0:  # a second kill during the resumed run
            child = child_runs.start("mid_checkpoint", at + 2, argv + ["--resume"])
            child.kill()
            child.wait()
            sent += 1
        code = rerun(argv, out)
        ok = (
            code == 0
            and same(load_atlas(out).tensors(), reference)
            and not list(out.glob("*.tmp"))
            and not list(out.glob(".tmp*"))
        )
        survived += ok
        if not ok:
            failures.append(f"{point}@{at} {signal.Signals(signum).name}: exit {code}")
    print(
        f"signals sent: {sent} ({sum(1 for p in plans if p[2] == signal.SIGKILL)} runs SIGKILLed, some twice; the rest SIGINT/SIGTERM)"
    )
    return survived, len(plans), failures


def corruptions(atlas_file: Path, work: Path, flips: int, seed: int = 0) -> tuple[int, int, list[str]]:
    rng = random.Random(seed)
    raw = atlas_file.read_bytes()
    detected, missed = 0, []
    cases = [("flip", rng.randrange(len(raw)), rng.randrange(8)) for _ in range(flips)]
    cases += [("truncate", rng.randrange(len(raw)), 0) for _ in range(flips // 10)]
    target = work / "corrupt" / "atlas.safetensors"
    target.parent.mkdir()
    for kind, where, bit in cases:
        data = bytearray(raw)
        if kind == "flip":
            data[where] ^= 1 << bit
        else:
            data = data[:where]
        target.write_bytes(bytes(data))
        try:
            load_atlas(target.parent)
            missed.append(f"{kind} at byte {where} bit {bit}")
        except AtlasError:
            detected += 1
    return detected, len(cases), missed


def bad_inputs(work: Path, model: Path, data: Path) -> tuple[int, int, list[str]]:
    bad = work / "bad"
    bad.mkdir()
    (bad / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in FIXTURE_CORPUS))
    (bad / "trunc").mkdir()
    (bad / "trunc" / "checkpoint.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    base = ["--model", str(model), "--device", "cpu", "--split", "", "--layer", "2", "--max-length", "16"]
    cases = {
        "missing data file": ["profile", *base, "--dataset", str(bad / "nope.jsonl"), "--out", str(bad / "o1")],
        "bad split": [
            "profile",
            *base[:-4],
            "--split",
            "train[9:3]",
            "--layer",
            "2",
            "--dataset",
            str(bad / "c.jsonl"),
            "--out",
            str(bad / "o2"),
        ],
        "empty selection": [
            "profile",
            *base[:-4],
            "--split",
            "[900:]",
            "--layer",
            "2",
            "--dataset",
            str(bad / "c.jsonl"),
            "--out",
            str(bad / "o3"),
        ],
        "missing column": [
            "profile",
            *base,
            "--dataset",
            str(bad / "c.jsonl"),
            "--text-column",
            "body",
            "--out",
            str(bad / "o4"),
        ],
        "layer out of range": [
            "profile",
            *base[:-4],
            "--layer",
            "9",
            "--dataset",
            str(bad / "c.jsonl"),
            "--out",
            str(bad / "o5"),
        ],
        "unknown site": [
            "profile",
            *base,
            "--site",
            "blocks.1.hook_resid_middle",
            "--dataset",
            str(bad / "c.jsonl"),
            "--out",
            str(bad / "o6"),
        ],
        "top-k 0": ["profile", *base, "--top-k", "0", "--dataset", str(bad / "c.jsonl"), "--out", str(bad / "o7")],
        "truncated checkpoint": ["profile", *base, "--dataset", str(bad / "c.jsonl"), "--out", str(bad / "trunc"), "--resume"],
        "out is a file": ["profile", *base, "--dataset", str(bad / "c.jsonl"), "--out", str(bad / "c.jsonl" / "o")],
        "run: missing column": [
            "run",
            *base,
            "--sae",
            "none",
            "--dataset",
            str(bad / "c.jsonl"),
            "--text-column",
            "body",
            "--out",
            str(bad / "o8"),
        ],
        "run: bad neuron": [
            "run",
            *base,
            "--sae",
            "none",
            "--neuron",
            "999",
            "--dataset",
            str(bad / "c.jsonl"),
            "--out",
            str(bad / "o9"),
        ],
        "export: no atlas": ["export", str(bad / "o10")],
    }
    clean, failures = 0, []
    for name, argv in cases.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        lines = [line for line in err.getvalue().splitlines() if line.startswith("patchscope")]
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        created = out is not None and out.exists() and out.name != "trunc"
        ok = code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue() and not created
        clean += ok
        if not ok:
            failures.append(f"{name}: exit {code}, {lines}, folder created: {created}")
        else:
            print(f"  {name}: {lines[0][:160]}")
    return clean, len(cases), failures


def run(arguments: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__)
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs at checkpoints (half durable, half mid-write)")
    parser.add_argument("--flips", type=int, default=300, help="random single-bit flips of an atlas file")
    args = parser.parse_args(arguments)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="patchscope-reliability-"))
    try:
        model = tiny_gemma2(work / "model")
        data = work / "corpus.txt"
        data.write_text("\n".join([t for t in FIXTURE_CORPUS if t] * 4))
        assert main(argv_for(model, data, work / "reference")) == 0
        reference = load_atlas(work / "reference").tensors()
        print("bad inputs:")
        rows = [("bad inputs refused cleanly", *bad_inputs(work, model, data))]
        rows.append(("corruptions detected", *corruptions(work / "reference" / "atlas.safetensors", work, args.flips)))
        rows.append(("kills survived (same atlas bit for bit)", *kills(work, model, data, reference, args.kills)))
        print(f"\nconditions: CPU, torch {torch.__version__}, 1 thread, tiny Gemma-2 (4 layers, d_mlp 128), shared machine")
        for name, good, total, failures in rows:
            print(f"{name}: {good}/{total}")
            for failure in failures[:10]:
                print(f"  FAILED {failure}")
        return 0 if all(good == total for _, good, total, _ in rows) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run())
