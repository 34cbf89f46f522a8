import json
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F
from factories import FIXTURE_CORPUS

from patchscope import (
    PatchscopeConfig,
    PlaceholderError,
    ReproductionError,
    Row,
    capture,
    extract,
    find_placeholder,
    inject,
    patch,
    plan_prompt,
)
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile

LAYER = 2
SITE = f"blocks.{LAYER}.hook_resid_pre"
NEURON_SITE = f"blocks.{LAYER}.mlp.hook_post"
PROMPT = "A detailed description of x is that"


def test_placeholder_by_offsets(gemma):
    _, tokenizer = gemma
    position = find_placeholder(tokenizer, PROMPT)
    assert tokenizer.convert_ids_to_tokens(tokenizer(PROMPT).input_ids)[position] == "Ġx" and position == 7
    # 'next' contains an x but is not the placeholder; the real one comes later
    assert find_placeholder(tokenizer, "The next x is") == len(tokenizer("The next x").input_ids) - 1
    assert find_placeholder(tokenizer, "The dog of x", placeholder="dog") == 2


@pytest.mark.parametrize(
    "prompt, placeholder, message",
    [
        ("The next train", "x", "only appears inside other words"),
        ("A description of y", "x", "not a word of the prompt"),
        ("x and x again", "x", "appears 2 times"),
        ("A description of zqxvw is", "zqxvw", "split across"),
    ],
)
def test_placeholder_errors(gemma, prompt, placeholder, message):
    with pytest.raises(PlaceholderError, match=message):
        find_placeholder(gemma[1], prompt, placeholder)


def test_explicit_position_overrides(gemma):
    plan = plan_prompt(gemma[1], PatchscopeConfig(prompt="no placeholder here", position=2))
    assert plan.position == 2
    with pytest.raises(PlaceholderError, match="outside"):
        plan_prompt(gemma[1], PatchscopeConfig(prompt="short", position=50))


def manual_neuron(model, ids, vector, position):
    """Layer by layer by hand, the residual entering layer LAYER overwritten at `position`."""
    base = model.model
    hidden = model(ids, output_hidden_states=True).hidden_states[0]  # the scaled embedding, in any transformers version
    length = ids.shape[1]
    embeddings = base.rotary_emb(hidden, torch.arange(length)[None])
    mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    for layer in base.layers[:LAYER]:
        hidden = layer(hidden, position_embeddings=embeddings, attention_mask=mask)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    hidden = hidden.clone()
    hidden[0, position] = vector
    block = base.layers[LAYER]
    attn = block.self_attn(block.input_layernorm(hidden), position_embeddings=embeddings, attention_mask=mask)[0]
    hidden = hidden + block.post_attention_layernorm(attn)
    x = block.pre_feedforward_layernorm(hidden)
    return F.gelu(block.mlp.gate_proj(x), approximate="tanh") * block.mlp.up_proj(x)  # [1, pos, d_mlp]


def test_patched_activation_equals_manual_forward(gemma):
    model, tokenizer = gemma
    plan = plan_prompt(tokenizer, PatchscopeConfig())
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 5
    rows = [Row("patched", 17, vector), Row("unpatched", 17, None)]
    patched, unpatched = inject(model, tokenizer, rows, plan, target_site=SITE, observe_site=NEURON_SITE, max_new_tokens=4)
    with torch.no_grad():
        expected = manual_neuron(model, torch.tensor([plan.input_ids]), vector, plan.position)[0, :, 17]
        clean = manual_neuron(
            model,
            torch.tensor([plan.input_ids]),
            model(torch.tensor([plan.input_ids]), output_hidden_states=True).hidden_states[LAYER][0, plan.position],
            plan.position,
        )[0, :, 17]
    torch.testing.assert_close(torch.tensor(patched.prompt_activations), expected, rtol=1e-4, atol=1e-5)
    assert patched.at_placeholder == pytest.approx(float(expected[plan.position]), abs=1e-5)
    torch.testing.assert_close(torch.tensor(unpatched.prompt_activations), clean, rtol=1e-4, atol=1e-5)
    assert len(patched.generated_tokens) == 4 and len(patched.generated_activations) == 3


def test_injected_generation_matches_uncached(gemma):
    model, tokenizer = gemma
    plan = plan_prompt(tokenizer, PatchscopeConfig())
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 8
    (observed,) = inject(
        model, tokenizer, [Row("p", 3, vector)], plan, target_site=SITE, observe_site=NEURON_SITE, max_new_tokens=10
    )
    ids = torch.tensor([plan.input_ids])
    with patch(model, SITE, vector, positions=[plan.position]):
        uncached = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    expected = uncached[0, ids.shape[1] :].tolist()
    assert len(expected) > 0 and observed.generated_tokens == expected  # every token and the length, not a prefix


def test_extract_reproduces_atlas_and_catches_slice_offsets(gemma, tmp_path):
    from patchscope.atlas.sources import SourceConfig, TextSource

    model, tokenizer = gemma
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in FIXTURE_CORPUS * 2))
    source = SourceConfig(dataset=str(data), split="[3:20]")
    atlas = profile(model, tokenizer, source, ProfileConfig(layer=LAYER, top_k=2, max_length=16), progress=False)
    texts = TextSource(source).fetch(atlas.documents())
    rows = FIXTURE_CORPUS * 2
    for neuron in (0, 40, 77):
        entry = atlas.entry(NEURON_SITE, neuron)
        got = extract(model, tokenizer, texts[entry.doc], site=SITE, position=entry.position, entry=entry, max_length=16)
        assert got.activation == pytest.approx(entry.activation, abs=1e-5) and got.token_id == entry.token
        assert got.vector.shape == (64,) and got.token in got.context
    entry = atlas.entry(NEURON_SITE, 0)
    with pytest.raises(ReproductionError):  # the original's bug: an index relative to the slice
        extract(model, tokenizer, rows[entry.doc - 3], site=SITE, position=entry.position, entry=entry, max_length=16)


# -- the row engine and its controls


def test_engine_rows_equal_a_plain_patched_forward_and_generate(gemma):
    """Rows of different target sites in one batch, against one plain `patch` + forward / generate per row."""
    from patchscope.scope.rows import Generation, PatchRow, run_rows

    model, tokenizer = gemma
    plan = plan_prompt(tokenizer, PatchscopeConfig(prompt="Syria: Country in the Middle East, x"))
    gen = torch.Generator().manual_seed(3)
    sites = ["blocks.1.hook_resid_pre", None, "blocks.2.hook_resid_pre", "blocks.0.hook_resid_pre"]
    rows = [PatchRow(torch.randn(64, generator=gen) * 6 if s else None, s, plan, [5, 17]) for s in sites]
    scored = torch.tensor([4, 9, 30])
    readouts = run_rows(
        model, tokenizer, rows, neuron_site=NEURON_SITE, scored=scored, generation=Generation(max_new_tokens=4), batch_size=3
    )
    ids = torch.tensor([plan.input_ids])
    for row, out in zip(rows, readouts):
        with torch.no_grad(), ExitStack() as stack:
            if row.site is not None:
                stack.enter_context(patch(model, row.site, row.vector, positions=[plan.position]))
            with capture(model, NEURON_SITE) as seen:
                logits = model(ids).logits[0, plan.position]
            neurons = seen[NEURON_SITE][0, plan.position, [5, 17]]
            expected = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
        logprobs = logits.log_softmax(-1)
        assert out.top1 == int(logits.argmax())
        torch.testing.assert_close(out.logprobs, logprobs[scored], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.at_placeholder, neurons, rtol=1e-4, atol=1e-4)
        assert out.generated == expected[0, ids.shape[1] :].tolist() and len(out.generated) == 4


def test_experiment_rows_through_the_engine_equal_one_plain_generate_each(gemma):
    """`read_neurons` (the experiment's Patchscope phase): each row's read and tokens as a plain patched generate gives them."""
    from patchscope.scope.readout import NeuronTarget, read_neurons

    model, tokenizer = gemma
    config = PatchscopeConfig(prompt="Syria: Country in the Middle East, x", max_new_tokens=3)
    plan = plan_prompt(tokenizer, config)
    gen = torch.Generator().manual_seed(4)
    ids = tokenizer(FIXTURE_CORPUS[0]).input_ids
    targets = [NeuronTarget(n, 2.0, torch.randn(64, generator=gen) * 5, ids, 4, key=(0, 4)) for n in (3, 40)]
    mean = torch.randn(64, generator=gen)
    readouts = read_neurons(model, tokenizer, plan, targets, target_site=SITE, neuron_site=NEURON_SITE, config=config, mean=mean)
    prompt_ids = torch.tensor([plan.input_ids])
    for target, readout in zip(targets, readouts):
        assert list(readout.controls) == ["unpatched", "random_same_norm", "corpus_mean"]
        runs = {"patched": target.vector, "corpus_mean": mean, "unpatched": None}
        runs["random_same_norm"] = None  # its vector is checked through its norm below
        for label, observation in [("patched", readout.patched), *readout.controls.items()]:
            vector = runs[label]
            if label == "random_same_norm":
                assert observation.norm == pytest.approx(float(target.vector.norm()), rel=1e-5)
                continue
            with torch.no_grad(), capture(model, NEURON_SITE, keep_history=True) as seen:
                if vector is None:
                    out = model.generate(prompt_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
                else:
                    with patch(model, SITE, vector, positions=[plan.position]):
                        out = model.generate(prompt_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            assert observation.generated_tokens == out[0, prompt_ids.shape[1] :].tolist()
            expected = float(seen.history[NEURON_SITE][0][0, plan.position, target.neuron])
            assert observation.at_placeholder == pytest.approx(expected, abs=1e-5)
            assert observation.ratio == pytest.approx(expected / 2.0, abs=1e-5)
        assert readout.case.value == "same_layer" and "by construction" in readout.verdict


def test_random_control_is_drawn_per_neuron_and_source():
    from patchscope.scope.controls import derive_seed, random_same_norm
    from patchscope.scope.inject import control_rows

    vector = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 3
    a, b = (control_rows(vector, n, mean=None, seed=0, source=(2, 7))[0].vector for n in (1, 2))
    assert not torch.allclose(a, b)  # each neuron its own direction
    other_source = control_rows(vector, 1, mean=None, seed=0, source=(2, 8))[0].vector
    assert not torch.allclose(a, other_source)  # and each source token
    assert torch.equal(a, control_rows(vector, 1, mean=None, seed=0, source=(2, 7))[0].vector)  # deterministic
    assert not torch.allclose(a, control_rows(vector, 1, mean=None, seed=1, source=(2, 7))[0].vector)
    assert float(a.norm()) == pytest.approx(float(vector.norm()), rel=1e-5)
    assert derive_seed(0, 1, 2, 7) == derive_seed(0, 1, 2, 7) != derive_seed(0, 1, 27)
    torch.testing.assert_close(random_same_norm(vector, 0, 1, 2, 7), a)


def test_random_control_differs_across_neurons_of_one_sweep(gemma):
    """Two neuron sources on the same token: their random_same_norm rows are not the same run."""
    from patchscope.scope.sweep import Source, SweepConfig, sweep

    model, tokenizer = gemma
    ids = tokenizer(FIXTURE_CORPUS[0]).input_ids
    sources = [Source(ids, 4, "a", NEURON_SITE, 3, 1.0), Source(ids, 4, "b", NEURON_SITE, 40, 1.0)]
    config = SweepConfig(prompt=PROMPT, source_layers=(2,), target_layers=(1,), controls=("random_same_norm",))
    table = sweep(model, tokenizer, sources, None, config).table
    random = [s for c, s in zip(table["condition"], table["surprisal"]) if c == "random_same_norm"]
    assert len(random) == 2 and random[0] != pytest.approx(random[1])


def test_cases_and_conditions_are_one_enum_each():
    from patchscope.scope.controls import CONTROLS, Case, Condition, case_of

    assert {c.value for c in Condition} == {"patched", *CONTROLS}
    assert CONTROLS == ("unpatched", "random_same_norm", "corpus_mean")
    assert [case_of(t, 2) for t in (1, 2, 3)] == [Case.EARLIER_TARGET_LAYER, Case.SAME_LAYER, Case.LATER_TARGET_LAYER]
    assert {c.value for c in Case} == {"same_layer", "earlier_target_layer", "later_target_layer"}
    assert Case.SAME_LAYER.description.startswith("same layer") and "not evidence" in Case.SAME_LAYER.description


def test_inject_restores_every_generator_and_reseeds_no_gpu(gemma, monkeypatch):
    from patchscope import Row, inject, plan_prompt

    model, tokenizer = gemma
    reseeded = []
    monkeypatch.setattr(
        torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed)
    )  # would change a caller's GPU generator
    plan = plan_prompt(tokenizer, PatchscopeConfig())
    rows = [Row("p", 3, torch.randn(64))]
    torch.manual_seed(123)
    reseeded.clear()
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    reseeded.clear()
    first = inject(
        model,
        tokenizer,
        rows,
        plan,
        target_site="blocks.1.hook_resid_pre",
        observe_site=NEURON_SITE,
        max_new_tokens=4,
        temperature=1.0,
        seed=7,
    )
    assert torch.equal(torch.rand(3), expected_next)  # the caller's CPU stream goes on as if inject never ran
    second = inject(
        model,
        tokenizer,
        rows,
        plan,
        target_site="blocks.1.hook_resid_pre",
        observe_site=NEURON_SITE,
        max_new_tokens=4,
        temperature=1.0,
        seed=7,
    )
    assert first[0].generated_tokens == second[0].generated_tokens  # the seed decides the sample
    assert reseeded == []
