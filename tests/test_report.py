"""The dashboard and the run report, rendered in a real (headless) Chromium."""

import html
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from browser import Elements, render
from factories import FIXTURE_CORPUS

from patchscope.atlas.batching import adds_bos, locate, segments
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import Document, SourceConfig, TextSource
from patchscope.atlas.store import load_atlas
from patchscope.cli.main import main

SITE = "blocks.2.mlp.hook_post"
TEXTS = [t for t in FIXTURE_CORPUS if t] * 2
BEFORE, AFTER = 6, 3


@pytest.fixture(scope="module")
def site(gemma, gemma_dir, tmp_path_factory):
    """A profiled atlas (from a .jsonl file) and the dashboard `patchscope report` writes for it."""
    root = tmp_path_factory.mktemp("report")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    model, tokenizer = gemma
    config = ProfileConfig(layer=2, top_k=4, bottom_k=4, max_length=20, quantile_examples=2)
    profile(
        model,
        tokenizer,
        TextSource(SourceConfig(dataset=str(corpus), split="")),
        config,
        out=root / "atlas",
        model_name=str(gemma_dir),
        progress=False,
    )
    argv = ["report", str(root / "atlas"), "--out", str(root / "site"), "--top", "3", "--examples", "4"]
    argv += ["--before", str(BEFORE), "--after", str(AFTER), "--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 0
    return root, load_atlas(root / "atlas")


def test_neuron_page_shows_the_atlas_with_every_context_token_shaded(site, gemma):
    root, atlas = site
    _, tokenizer = gemma
    neuron = atlas.top_neurons(SITE, 1)[0]
    page = root / "site" / "neurons" / f"{SITE}-{neuron}.html"
    shot = root / "neuron.png"
    dom, requests = render(page.as_uri(), root, screenshot=None)
    assert requests == []
    elements = Elements(dom)
    examples = elements.having("div", "ex")
    assert examples, "no examples on the page"
    tokens = elements.having("span", "t")
    stats = atlas[SITE]
    top = [
        (float(v), int(d), int(p))
        for v, d, p in zip(stats.top.values[:, neuron], stats.top.doc[:, neuron], stats.top.pos[:, neuron])
    ]
    shown_top = [
        (float(a["data-act"]), int(a["data-doc"]), int(a["data-pos"]))
        for a, path in examples
        if any(p[1].get("id") == "top" for p in path)
    ]
    assert shown_top == top  # the recorded values, documents and positions, exactly
    bottom = [float(v) for v in stats.bottom.values[:, neuron]]
    assert [float(a["data-act"]) for a, path in examples if any(p[1].get("id") == "bottom" for p in path)] == bottom
    for attrs, _ in examples:
        mine = [a for a, path in tokens if any(p[1] is attrs for p in path)]
        doc, position = int(attrs["data-doc"]), int(attrs["data-pos"])
        parts = segments(tokenizer, Document(doc, TEXTS[doc]), 20, "truncate", True, adds_bos(tokenizer))
        segment, local = locate(parts, position)
        expected = min(len(segment.ids), local + AFTER + 1) - max(segment.first_counted, local - BEFORE)
        assert len(mine) == expected == int(attrs["data-ntokens"])  # one shaded span per context token
        assert all("background:" in a["style"] and "data-v" in a for a in mine)
        focus = [a for a in mine if "f" in a["class"].split()]
        assert len(focus) == 1
        assert math.isclose(
            float(focus[0]["data-v"]), float(attrs["data-act"]), rel_tol=1e-4, abs_tol=1e-4
        )  # the replay reproduces it
    assert float(elements.having("b")[0][0]["data-v"]) == float(stats.max[neuron])
    assert len(elements.having("rect", "hbar")) > 0
    render(page.as_uri(), root, screenshot=shot)
    assert shot.stat().st_size > 10_000
    keep = Path(str(root)).parent / "neuron-page.png"
    shutil.copy(shot, keep)
    print(f"screenshot of the neuron page: {keep}")


def _order(dom):
    return [int(a["data-n"]) for a, _ in Elements(dom).having("tr") if "data-n" in a]


def test_index_sorts_filters_and_makes_no_request(site):
    root, atlas = site
    index = (root / "site" / "index.html").as_uri()
    stats = atlas[SITE]
    dom, requests = render(index, root)
    assert requests == [] and _order(dom) == list(range(stats.n_neurons))
    expected_max_desc = torch.sort(stats.max, descending=True, stable=True).indices.tolist()
    dom, _ = render(index + "#click=max", root)  # a real click on the header, from a script hook
    assert _order(dom) == expected_max_desc
    dom, _ = render(index + "#sort=density", root)
    assert _order(dom) == torch.sort(stats.fire_rate, stable=True).indices.tolist()
    rows = {int(a["data-n"]): a for a, _ in Elements(dom).having("tr") if "data-n" in a}
    assert all(float(rows[n]["data-max"]) == float(stats.max[n]) for n in rows)
    dom, _ = render(index + "#q=7", root)  # the search box: neuron numbers starting with 7
    visible = [
        int(a["data-n"]) for a, _ in Elements(dom).having("tr") if "data-n" in a and "display: none" not in a.get("style", "")
    ]
    assert visible == [n for n in range(stats.n_neurons) if str(n).startswith("7")]
    assert not (root / "site" / "neurons" / "data").exists()  # every neuron's data only with --all-neurons


def test_pages_reference_nothing_outside_themselves(site):
    root, _ = site
    for path in (root / "site").rglob("*.html"):
        for tag, attrs, _ in Elements(path.read_text()).found:
            for key in ("src", "href"):
                value = attrs.get(key, "")
                assert not value.startswith(("http:", "https:", "//")) or (
                    tag == "a" and value.startswith("https://www.neuronpedia.org/")
                ), (path.name, tag, value)


def test_the_network_check_can_fail(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><img src='http://example.invalid/x.png'></body></html>")
    _, requests = render(page.as_uri(), tmp_path)
    assert requests == ["http://example.invalid/x.png"]


def test_run_report_shows_the_results(gemma, gemma_dir, tmp_path):
    from sae_files import sae_params, write_npz

    from patchscope.experiment import ExperimentConfig, run_experiment
    from patchscope.scope.config import PatchscopeConfig

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    sae = write_npz(tmp_path / "sae" / "layer_1/width_16k/average_l0_30/params.npz", sae_params(seed=7))
    config = ExperimentConfig(
        model=str(gemma_dir),
        device="cpu",
        out=str(tmp_path / "out"),
        sae=str(sae),
        source=SourceConfig(dataset=str(corpus), split=""),
        profile=ProfileConfig(layer=2, max_length=16, top_k=3),
        patchscope=PatchscopeConfig(max_new_tokens=4),
    )
    run_experiment(config, progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    dom, requests = render((tmp_path / "out" / "report.html").as_uri(), tmp_path, screenshot=None)
    assert requests == []
    elements = Elements(dom)
    (record,) = results["neurons"]
    bars = [float(a["data-v"]) for a, _ in elements.having("rect", "bar")]
    drivers = [f["contribution"] for f in record["sae"]["features_driving_neuron"]]
    controls = [record["patched"]["at_placeholder"], *(c["at_placeholder"] for c in record["controls"].values())]
    assert bars == drivers + controls and len(controls) == 4  # patched, unpatched, random, corpus mean
    contexts = [
        [a for a, path in elements.having("span", "t") if any(p[1] is ex for p in path)] for ex, _ in elements.having("div", "ex")
    ]
    trigger, along = contexts
    focus = [a for a in trigger if "f" in a["class"].split()]
    assert len(focus) == 1 and math.isclose(float(focus[0]["data-v"]), record["max_activation"], rel_tol=1e-4, abs_tol=1e-4)
    patched = record["patched"]
    assert len(along) == len(results["prompt"]["tokens"]) + len(patched["generated_tokens"])
    shown = [float(a["data-v"]) for a in along if "data-v" in a]
    assert shown == patched["prompt_activations"] + patched["generated_activations"]


def test_bad_report_input_fails_before_the_model_loads(site, monkeypatch, capsys):
    root, _ = site
    monkeypatch.setattr("patchscope.report.inputs.atlas_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["report", str(root / "atlas"), "--out", str(root / "x"), "--neurons", "99999"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["report", str(root / "nowhere"), "--out", str(root / "x")]) == 2
    assert "patchscope profile" in capsys.readouterr().err


@pytest.fixture(scope="module")
def layers_site(gemma, gemma_dir, tmp_path_factory):
    """A whole-model atlas (every layer's MLP neurons, and the residual stream after layers 1 and 2) and its dashboard."""
    root = tmp_path_factory.mktemp("layers-report")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    model, tokenizer = gemma
    config = ProfileConfig(layers="all", sites=("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"), top_k=3, max_length=20)
    source = TextSource(SourceConfig(dataset=str(corpus), split=""))
    profile(model, tokenizer, source, config, out=root / "atlas", model_name=str(gemma_dir), progress=False)
    argv = ["report", str(root / "atlas"), "--out", str(root / "site"), "--neurons", "5", "9", "--examples", "2", "--all-neurons"]
    assert main(argv + ["--dtype", "float32", "--device", "cpu"]) == 0
    return root, load_atlas(root / "atlas")


def test_index_across_layers_shows_the_chosen_layer_with_the_atlas_values_and_top_tokens(layers_site, gemma):
    from patchscope.atlas.exports import place_strings

    root, atlas = layers_site
    _, tokenizer = gemma
    index = (root / "site" / "index.html").as_uri()
    options = [a["value"] for a, _ in Elements((root / "site" / "index.html").read_text()).having("option")]
    assert options == list(atlas.sites) and len(options) == 6
    texts = atlas.texts()
    for site in ("blocks.0.mlp.hook_post", "blocks.3.mlp.hook_post"):
        dom, requests = render(f"{index}#site={site}&sort=max&desc=1", root)
        assert requests == []
        stats = atlas[site]
        shown = [a for a, path in Elements(dom).having("tr") if "data-n" in a]
        assert [int(a["data-n"]) for a in shown] == torch.sort(stats.max, descending=True, stable=True).indices.tolist()
        assert all(float(a["data-max"]) == float(stats.max[int(a["data-n"])]) for a in shown)
        strings = place_strings(atlas, [(int(stats.top.doc[0, n]), int(stats.top.pos[0, n])) for n in range(4)], texts, tokenizer)
        cells = _row_cells(dom)
        for n in range(4):
            assert cells[n][-2:] == [strings[n][0], strings[n][1]], (site, n)
        outside_templates = re.sub(r"<template.*?</template>", "", dom, flags=re.S)
        assert outside_templates.count("<circle") == stats.n_neurons  # only the shown site's plot is built
    assert 'data-ready-ms="' in dom


def _row_cells(dom: str) -> dict[int, list[str]]:
    """Each built row's cell texts, by neuron."""
    from html.parser import HTMLParser

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows: dict[int, list[str]] = {}
            self.current: list[str] | None = None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "tr" and "data-n" in attrs:
                self.current = self.rows.setdefault(int(attrs["data-n"]), [])
            elif tag == "td" and self.current is not None:
                self.current.append("")

        def handle_endtag(self, tag):
            if tag == "tr":
                self.current = None

        def handle_data(self, data):
            if self.current:
                self.current[-1] += data

    parser = Cells()
    parser.feed(dom)
    return parser.rows


def test_neuron_pages_at_two_layers_render_and_say_where_neighbours_mean_something(layers_site):
    root, atlas = layers_site
    for site in ("blocks.1.mlp.hook_post", "blocks.2.mlp.hook_post"):
        dom, requests = render((root / "site" / f"neurons/{site}-5.html").as_uri(), root)
        assert requests == []
        found = {a["data-stat"]: float(a["data-v"]) for a, _ in Elements(dom).having("b") if "data-stat" in a}
        assert found["max"] == float(atlas[site].max[5]) and found["mean"] == float(atlas[site].mean[5])
        assert "MLP neurons have no identity across layers" in dom and 'class="neighbour"' not in dom
    dom, _ = render((root / "site" / "neurons/blocks.1.hook_resid_post-9.html").as_uri(), root)
    links = [a["href"] for a, _ in Elements(dom).having("a") if a.get("class") == "neighbour"]
    assert links == ["../neurons/blocks.2.hook_resid_post-9.html"]
    assert (root / "site" / "neurons/blocks.2.hook_resid_post-9.html").exists()


def _view(root: Path, href: str) -> tuple[str, dict[str, float], dict[str, list[tuple[float, int, int]]], list[str]]:
    """Render a drawn page: its DOM, its statistics, its examples ``(value, doc, position)`` per section, its tokens."""
    dom, requests = render(f"{(root / 'site').as_uri()}/{href}", root)
    assert requests == []
    elements = Elements(dom)
    stats = {a["data-stat"]: float(a["data-v"]) for a, _ in elements.having("b") if "data-stat" in a}
    shown = {
        key: [
            (float(a["data-act"]), int(a["data-doc"]), int(a["data-pos"]))
            for a, path in elements.having("div", "ex")
            if any(p[1].get("id") == key for p in path)
        ]
        for key in ("top", "bottom")
    }
    main = dom[dom.index("<main>") : dom.index("</main>")]  # the drawn part, not the script's text
    tokens = [json.loads(html.unescape(t)) for t in re.findall(r'<span class="ctx tok"[^>]*>(.*?)</span>', main)]
    return dom, stats, shown, tokens


def _slots(slots, neuron: int, limit: int) -> list[tuple[float, int, int]]:
    found = zip(slots.values[:limit, neuron].tolist(), slots.doc[:limit, neuron].tolist(), slots.pos[:limit, neuron].tolist())
    return [(v, d, p) for v, d, p in found if d >= 0]


@pytest.mark.parametrize("site_name, neuron", [("blocks.0.mlp.hook_post", 17), ("blocks.3.mlp.hook_post", 100)])
def test_a_neuron_without_a_page_opens_one_drawn_from_the_atlas(layers_site, gemma, site_name, neuron):
    """A neuron outside `--neurons`, at two layers: its index row opens the drawn page, which shows the atlas's values."""
    root, atlas = layers_site
    _, tokenizer = gemma
    assert neuron not in (5, 9)  # the fixture's `--neurons`
    index = root / "site" / "index.html"
    dom, _ = render(f"{index.as_uri()}#site={site_name}", root)
    links = {int(next(t[1]["data-n"] for t in path if t[0] == "tr")): a["href"] for a, path in Elements(dom).having("a", "view")}
    pages = [a["href"] for a, _ in Elements(dom).having("a", "page")]
    assert pages == [f"neurons/{site_name}-5.html", f"neurons/{site_name}-9.html"]
    assert len(links) == atlas[site_name].n_neurons - 2  # every other row opens the drawn page
    assert "patchscopeShard" not in index.read_text()  # the index loads no shard
    assert links[neuron] == f"neurons/view.html#site={site_name}&n={neuron}"
    dom, stats, shown, tokens = _view(root, links[neuron])
    s = atlas[site_name]
    assert stats == {
        "max": float(s.max[neuron]),
        "min": float(s.min[neuron]),
        "mean": float(s.mean[neuron]),
        "std": float(s.std[neuron]),
        "density": float(s.fire_rate[neuron]),
    }
    assert shown["top"] == _slots(s.top, neuron, 2) and len(shown["top"]) == 2  # the fixture's `--examples 2`
    assert shown["bottom"] == _slots(s.bottom, neuron, 2) and len(shown["bottom"]) == 2
    texts = atlas.texts()
    for (_, doc, position), token in zip(shown["top"] + shown["bottom"], tokens, strict=True):
        ids = tokenizer(texts[doc]).input_ids[:20]  # the fixture's `max_length`, truncated
        assert token == tokenizer.decode([ids[position]])
    assert f"{site_name} · neuron {neuron}" in dom


def test_the_drawn_page_finds_neurons_across_shards_and_says_what_it_lacks(layers_site, gemma, tmp_path):
    from patchscope.report.neuron_view import shard_file, write_neuron_data

    root, atlas = layers_site
    _, tokenizer = gemma
    site = tmp_path / "site"
    count = write_neuron_data(atlas, site, texts=atlas.texts(), tokenizer=tokenizer, examples=3, shard_neurons=32)
    assert count == sum(-(-s.n_neurons // 32) for s in atlas.sites.values())
    assert (site / shard_file("blocks.2.mlp.hook_post", 3)).exists()
    for neuron in (0, 31, 32, 127):
        _, stats, shown, _ = _view(tmp_path, f"neurons/view.html#site=blocks.2.mlp.hook_post&n={neuron}")
        assert stats["max"] == float(atlas["blocks.2.mlp.hook_post"].max[neuron])
        assert shown["top"] == _slots(atlas["blocks.2.mlp.hook_post"].top, neuron, 3)
    dom, *_ = _view(tmp_path, "neurons/view.html#site=blocks.2.mlp.hook_post&n=128")
    assert "no data for blocks.2.mlp.hook_post neuron 128" in dom
    dom, *_ = _view(tmp_path, "neurons/view.html#site=blocks.1.hook_resid_post&n=63")
    assert float(Elements(dom).having("b")[0][0]["data-v"]) == float(atlas["blocks.1.hook_resid_post"].max[63])


class _SummaryRows(HTMLParser):
    """The run report's summary table: per ``tr[data-neuron]``, each cell's ``data-col`` -> (attrs, text)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, tuple[dict[str, str], str]]] = {}
        self.row: int | None = None
        self.cell: tuple[str, dict[str, str]] | None = None
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        found = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-neuron" in found:
            self.row = int(found["data-neuron"])
            self.rows[self.row] = {}
        elif tag == "td" and self.row is not None:
            self.cell, self.text = (found.get("data-col") or found.get("class", ""), found), []

    def handle_data(self, data):
        if self.cell is not None:
            self.text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None and self.row is not None:
            self.rows[self.row][self.cell[0]] = (self.cell[1], "".join(self.text))
            self.cell = None
        elif tag in ("tr", "table"):
            self.row = None


def test_run_report_summary_equals_results_json(gemma, gemma_dir, tmp_path, capsys):
    """`patchscope run` without an SAE: the summary table's rows are results.json's, each links to its card,
    the SAE's absence is said once, the page links results.json, and stdout names the report as a file URL."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    argv = ["run", "--model", str(gemma_dir), "--device", "cpu", "--dataset", str(corpus), "--layer", "2"]
    argv += ["--max-length", "16", "--top-neurons", "3", "--sae", "none", "--max-new-tokens", "4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"open {(out / 'report.html').resolve().as_uri()}" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["report_file"] == str(out / "report.html")
    dom, requests = render((out / "report.html").as_uri(), tmp_path)
    assert requests == []
    rows = _SummaryRows(dom).rows
    assert list(rows) == [n["neuron"] for n in results["neurons"]] and len(rows) == 3
    for n in results["neurons"]:
        row = rows[n["neuron"]]
        assert float(row["max_activation"][0]["data-v"]) == n["max_activation"]
        assert float(row["patched"][0]["data-v"]) == n["patched"]["at_placeholder"]
        assert [float(row[c][0]["data-v"]) for c in n["controls"]] == [c["at_placeholder"] for c in n["controls"].values()]
        assert row["token"][1] == repr(n["source"]["token"]) and row["context"][1] == n["source"]["context"]
        assert row["generated"][0]["data-full"] == n["patched"]["generated_text"]
        assert row["decode"][1] == {True: "decoded", False: "not decoded", None: "not measured"}[n["decode"]["decoded"]]
        assert f'href="#neuron-{n["neuron"]}"' in dom and f'id="neuron-{n["neuron"]}"' in dom
    elements = Elements(dom)
    verdicts = [a for a, _ in elements.having("p", "verdict")]
    assert len(verdicts) == 3 and dom.count("holds by construction") == 0  # the long sentence is not repeated per card
    assert dom.count("by construction") == 1 + 3  # the explanation once, plus one short headline per card
    assert len(elements.having("section", None)) and dom.count('id="sae-absent"') == 1 and "SAE features" not in dom
    assert [a["href"] for a, _ in elements.having("a") if a.get("id") == "results-link"] == ["results.json"]
    assert 'id="legend"' in dom and "symmetric log scale" in dom and results["versions"]["torch"] in dom
