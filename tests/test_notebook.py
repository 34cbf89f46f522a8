"""Notebook views: an atlas neuron, an atlas entry and a sweep result show as HTML (``_repr_html_``), read in Chromium."""

from __future__ import annotations

import subprocess
import sys

import pytest
from browser import Elements, render
from factories import FIXTURE_CORPUS

from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.report import notebook
from patchscope.scope.sweep import SweepConfig, SweepResult
from patchscope.util import display

SITE = "blocks.2.mlp.hook_post"


@pytest.fixture(scope="module")
def atlas(gemma):
    model, tokenizer = gemma
    config = ProfileConfig(sites=(SITE,), top_k=4, max_length=12, batch_tokens=40)
    return profile(model, tokenizer, [t for t in FIXTURE_CORPUS if t], config, progress=False)


def _in_chromium(fragment: str, tmp_path) -> tuple[Elements, list[str]]:
    """The fragment as a notebook cell holds it: inside a page of its own; its DOM after load and its requests."""
    page = tmp_path / "cell.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset=utf-8></head><body>{fragment}</body></html>")
    dom, requests = render(page.as_uri(), tmp_path)
    return Elements(dom), requests


def test_an_atlas_neuron_shows_its_statistics_and_examples(atlas, tmp_path):
    n = atlas.top_neurons(SITE)[0]
    neuron = atlas.neuron(SITE, n)
    fragment = neuron._repr_html_()
    assert fragment == notebook.neuron_html(neuron)
    elements, requests = _in_chromium(fragment, tmp_path)
    assert requests == []
    bars = [float(a["data-v"]) for a, _ in elements.having("rect", "bar")]
    assert bars == [e.activation for e in neuron.entries] == atlas[SITE].top.values[:, n].tolist()
    assert len(elements.having("tr")) == 1 + len(neuron.entries)
    assert f"{SITE} neuron {n}" in fragment and neuron.max == bars[0]


def test_an_atlas_entry_shows_where_it_is(atlas, tmp_path):
    entry = atlas.entry(SITE, 3, rank=1)
    fragment = entry._repr_html_()
    elements, requests = _in_chromium(fragment, tmp_path)
    assert requests == [] and elements.having("section")
    for text in (f"{SITE} neuron 3, example 1", f"<b>{entry.doc}</b>", f"<b>{entry.position}</b>", f"<b>{entry.token}</b>"):
        assert text in fragment


def test_a_sweep_result_shows_a_heatmap_per_condition(tmp_path):
    table = {
        "source": [0, 0, 0, 0, 1, 1],
        "source_layer": [1, 1, 3, 3, 1, 1],
        "target_layer": [1, 2, 1, 2, 1, 1],
        "condition": ["patched", "patched", "patched", "patched", "patched", "zero"],
        "hit": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
    }
    result = SweepResult(SweepConfig(), {}, [{}, {}], [(1, 1), (1, 2), (3, 1), (3, 2)], table, notes=["two sources"])
    fragment = result._repr_html_()
    elements, requests = _in_chromium(fragment, tmp_path)
    assert requests == []
    maps = elements.having("table", "heatmap")
    assert len(maps) == 2  # patched and the zero control
    cells = [a["data-v"] for a, path in elements.having("td", "cell") if ("table", maps[0][0]) in path]
    assert [float(v) for v in cells] == [0.5, 0.0, 0.0, 1.0]  # s=1: mean of sources 0 and 1 at t=1; s=3 ...
    assert "two sources" in fragment


def test_without_a_registered_view_jupyter_falls_back_to_the_text_repr(atlas, monkeypatch):
    monkeypatch.setattr(display, "RENDERERS", {})
    assert atlas.entry(SITE, 0)._repr_html_() is None


@pytest.mark.parametrize("ipython, registered", [(True, 3), (False, 0)])
def test_importing_patchscope_under_ipython_registers_the_views(ipython, registered):
    fake = "import sys, types; sys.modules['IPython'] = types.ModuleType('IPython'); " if ipython else ""
    code = fake + "import patchscope; from patchscope.util.display import RENDERERS; print(len(RENDERERS))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == str(registered)
