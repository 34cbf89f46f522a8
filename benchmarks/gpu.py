"""The GPU check: correctness on CUDA, speed at the gemma-2-2b shape, the whole-model atlas, in one command.

    python -m benchmarks.gpu --out gpu-check           # one CUDA GPU; a few minutes on an H100/H200
    python -m benchmarks.gpu --dry-run --out /tmp/gc   # the same code paths on the CPU at a tiny shape (CI runs it)

It needs torch, transformers, safetensors and tokenizers, and triton for the Triton rows; not
`datasets` or `gguf` (the random models get a word-level tokenizer built in memory). Every section
is written to ``OUT/gpu.json`` (every row, with the conditions) and ``OUT/gpu.md`` (one table) as
soon as it ends, so a run cut short keeps what it measured. A section that raises is recorded as a
failed row and the next one runs. The exit status is 1 when a correctness row failed, else 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from patchscope.util.storage import atomic_write, write_json

from .gpu_plan import Plan, Row


@dataclass
class Report:
    conditions: dict[str, str | None]
    rows: list[Row] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def conditions(plan: Plan) -> dict[str, str | None]:
    import transformers

    cuda = plan.device.startswith("cuda") and torch.cuda.is_available()
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(plan.device) if cuda else f"CPU {platform.machine()}, {os.cpu_count()} cores",
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "dry_run": str(plan.dry_run),
        "shape": plan.shape,
        "batches": f"{plan.n_batches} x {plan.batch} x {plan.seq_len} tokens, {plan.warmup} warm-up, {plan.runs} timed runs",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def sections(plan: Plan) -> list[tuple[str, Callable[[Plan], list[Row]]]]:
    from . import gpu_checks, gpu_speed

    out: list[tuple[str, Callable[[Plan], list[Row]]]] = [
        ("hook parity", gpu_checks.hook_parity),
        ("triton pass", gpu_checks.triton_pass),
        ("profile parity", gpu_checks.profile_parity),
        ("cached patch", gpu_checks.cached_patch),
        ("speed", gpu_speed.single_site),
        ("whole model", gpu_speed.whole_model),
        ("gpu paths", gpu_speed.gpu_paths),
    ]
    return out


def render(report: Report) -> str:
    lines = ["# GPU check (`python -m benchmarks.gpu`)", ""]
    lines += [f"- {key}: {value}" for key, value in report.conditions.items() if value is not None]
    lines += ["", "| section | check | value | unit | result | note |", "|---|---|---:|---|---|---|"]
    for row in report.rows:
        value = "" if row.value is None else f"{row.value:,.4g}"
        result = {True: "pass", False: "**FAIL**", None: ""}[row.ok]
        lines.append(f"| {row.section} | {row.name} | {value} | {row.unit} | {result} | {row.note} |")
    lines += ["", "Section times, s: " + "; ".join(f"{k}: {v:.1f}" for k, v in report.seconds.items()), ""]
    return "\n".join(lines)


def save(report: Report, out: Path) -> None:
    write_json(
        out / "gpu.json", {"conditions": report.conditions, "rows": [asdict(r) for r in report.rows], "seconds": report.seconds}
    )
    text = render(report)
    atomic_write(out / "gpu.md", lambda tmp: tmp.write_text(text))


def run_sections(plan: Plan, out: Path) -> Report:
    report = Report(conditions(plan))
    for name, section in sections(plan):
        started = time.perf_counter()
        try:
            rows = section(plan)
        except Exception as error:  # noqa: BLE001 - recorded as a failed row; the next section still runs
            traceback.print_exc()
            rows = [Row(name, "section raised", ok=False, note=f"{type(error).__name__}: {error}"[:300])]
        report.rows += rows
        report.seconds[name] = time.perf_counter() - started
        for row in rows:
            print(f"[{row.section}] {row.name}: {row.value if row.value is not None else ''} {row.unit} "
                  f"{'' if row.ok is None else ('pass' if row.ok else 'FAIL')} {row.note}".rstrip(), flush=True)  # fmt: skip
        save(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for gpu.json and gpu.md (created)")
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU at a tiny shape")
    parser.add_argument("--device", default="cuda", help="the CUDA device to check (default: cuda)")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else args.device
    if not args.dry_run and not torch.cuda.is_available():
        print("python -m benchmarks.gpu: no CUDA device is visible; on a CPU run it with --dry-run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run_sections(Plan.of(device, args.dry_run), out)
    failed = [row for row in report.rows if row.ok is False]
    print(f"\n{len(report.rows)} rows, {len(failed)} failed; wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
