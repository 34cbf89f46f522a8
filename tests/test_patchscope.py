import json

import pytest
import torch
import torch.nn.functional as F
from factories import FIXTURE_CORPUS

from patchscope import (
    PatchscopeConfig,
    PlaceholderError,
    ReproductionError,
    Row,
    extract,
    find_placeholder,
    inject,
    patch,
    plan_prompt,
)
from patchscope.atlas.config import ProfileConfig
from patchscope.atlas.run import profile

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
    assert observed.generated_tokens == uncached[0, ids.shape[1] :].tolist()[: len(observed.generated_tokens)]


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
    batched = inject(model, tokenizer, rows, plan, target_site=SITE, observe_site=NEURON_SITE, max_new_tokens=6)
    for row, together in zip(rows, batched):
        (alone,) = inject(model, tokenizer, [row], plan, target_site=SITE, observe_site=NEURON_SITE, max_new_tokens=6)
        assert together.at_placeholder == pytest.approx(alone.at_placeholder, abs=1e-4)
        torch.testing.assert_close(
            torch.tensor(together.prompt_activations), torch.tensor(alone.prompt_activations), rtol=1e-4, atol=1e-4
        )
        assert together.generated_tokens == alone.generated_tokens
        torch.testing.assert_close(
            torch.tensor(together.generated_activations), torch.tensor(alone.generated_activations), rtol=1e-3, atol=1e-3
        )


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
