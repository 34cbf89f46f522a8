"""How long the dashboard's index takes to open in headless Chromium, at 18 sites x 2,048 neurons (Gemma 3 270M's MLP).

    python -m benchmarks.dashboard_load

The atlas is synthetic (seeded random maxima, densities and moments; every neuron's top token and
context a short string), written by `patchscope.report.dashboard.index_page` exactly as `patchscope report`
writes it. Two figures per run, medians of several runs:

- ``ready``: what the page itself measures, ``performance.now()`` when its script has built the shown
  site's table and plot (the ``data-ready-ms`` attribute of ``<body>``);
- ``process``: the wall time of the whole ``chromium --headless --dump-dom`` call (browser start and the
  serialising of the whole DOM, templates included, into stdout); an empty page's call is timed beside it.

Then the same with another site picked through the URL hash, and the index's size on disk.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from patchscope.atlas.atlas import Atlas, AtlasMeta, SiteAtlas
from patchscope.atlas.stats import Moments, TopK
from patchscope.report.dashboard import index_page
from patchscope.util.storage import write_json

from .sections import write_section

HERE = Path(__file__).parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def synthetic_atlas(n_sites: int, width: int, top_k: int = 20, seed: int = 0) -> Atlas:
    generator = torch.Generator().manual_seed(seed)
    sites = {}
    for layer in range(n_sites):
        values = torch.rand(top_k, width, generator=generator).sort(dim=0, descending=True).values * 10
        index = torch.randint(0, 600, (top_k, width), generator=generator)
        moments = Moments.zeros(width)
        moments.n_tokens = torch.tensor(25_000)
        moments.fire_count = torch.randint(0, 25_000, (width,), generator=generator)
        moments.total = torch.randn(width, generator=generator, dtype=torch.float64) * 100
        moments.total_sq = moments.total.square() / 10 + 1000
        sites[f"blocks.{layer}.mlp.hook_post"] = SiteAtlas(TopK(values, index, index % 128, index), moments)
    return Atlas(AtlasMeta(model="synthetic", source=None, top_k=top_k), sites)


def open_once(url: str) -> tuple[float, float]:
    """``(ready ms, process s)`` of one headless Chromium load."""
    chromium = next(path for n in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(n)))
    started = time.perf_counter()
    done = subprocess.run([chromium, *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    found = re.search(r'data-ready-ms="(\d+)"', done.stdout)
    if found is None:
        raise RuntimeError(f"the page never said it was ready: {done.stderr[-500:]}")
    return float(found.group(1)), seconds


def measure(args: argparse.Namespace) -> dict:
    atlas = synthetic_atlas(args.sites, args.width)
    strings = {site: [(" tok", f"some context around tok {n}")] * args.width for n, site in enumerate(atlas.sites)}
    chosen = {site: atlas.top_neurons(site, 20) for site in atlas.sites}
    work = Path(tempfile.mkdtemp(prefix="patchscope-dashboard-"))
    started = time.perf_counter()
    index = work / "index.html"
    index.write_text(index_page(atlas, chosen, strings), encoding="utf-8")
    write_seconds = time.perf_counter() - started
    empty = work / "empty.html"
    empty.write_text(
        "<html><body><script>document.body.dataset.readyMs=String(Math.round(performance.now()))</script></body></html>"
    )
    runs: dict[str, list[tuple[float, float]]] = {
        "first site": [],
        "last site (#site=...)": [],
        "an empty page (browser start)": [],
    }
    last = f"#site={list(atlas.sites)[-1]}"
    open_once(index.as_uri())  # warm-up: the browser's own first start
    for _ in range(args.runs):
        runs["first site"].append(open_once(index.as_uri()))
        runs["last site (#site=...)"].append(open_once(index.as_uri() + last))
        runs["an empty page (browser start)"].append(open_once(empty.as_uri()))
    size = index.stat().st_size
    shutil.rmtree(work)
    return {
        "conditions": (
            f"headless Chromium on the CPU ({args.runs} runs each after one warm-up, medians), machine shared with other "
            f"work; synthetic atlas {args.sites} sites x {args.width} neurons, top-{atlas.meta.top_k}"
        ),
        "index_mib": round(size / 2**20, 2),
        "write_seconds": round(write_seconds, 2),
        "ready_ms": {k: statistics.median(r for r, _ in v) for k, v in runs.items()},
        "process_s": {k: round(statistics.median(s for _, s in v), 2) for k, v in runs.items()},
    }


def render(results: dict) -> str:
    lines = ["## Dashboard index load time across layers", "", "Written by `python -m benchmarks.dashboard_load`.", ""]
    for key, r in results.items():
        lines += [f"### {key}", "", f"_Conditions: {r['conditions']}._", ""]
        lines += [f"index.html: {r['index_mib']} MiB, written in {r['write_seconds']} s.", ""]
        lines += ["| shown | page ready (ms) | whole headless Chromium call (s) |", "|---|---:|---:|"]
        for name, ms in r["ready_ms"].items():
            lines.append(f"| {name} | {ms:.0f} | {r['process_s'][name]:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard_load", description=__doc__)
    parser.add_argument("--sites", type=int, default=18)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=str(HERE / "dashboard_load.json"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)
    store = Path(args.json)
    results = {f"{args.sites}x{args.width}": measure(args)}
    write_json(store, results)
    write_section(Path(args.results), "dashboard-load", render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
