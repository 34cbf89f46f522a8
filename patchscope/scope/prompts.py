"""Named target prompts: the paper's, each with its placeholder and where it comes from.

The placeholder rule, for words (``x``) and for punctuation (``?``) alike, is the one
`patchscope.scope.placeholder.find_placeholder` applies on character offsets:

1. The placeholder must occur exactly once in the prompt as a *standalone* run of characters: no
   word character (letter, digit, ``_``) directly before or after it. The ``?`` of
   ``"hello -> hello\\n?"`` qualifies; the ``x`` of ``"next"`` does not.
2. Exactly one token may overlap it, and that token's text, once its leading whitespace is
   dropped, must be exactly the placeholder. So ``'?'``, ``'Ġx'`` (byte-level BPE), ``'▁x'``
   (SentencePiece) and a merged ``'\\n?'`` all count; a token that runs on past the placeholder
   (``'?\\n'``, ``'x.'``) or a placeholder split over two tokens is refused with a
   `PlaceholderError` that says so.

Every preset ends in its placeholder or follows it with a space, so nothing can merge after it.
Tests check the position on Gemma-2-, Gemma 3-, Llama- and SmolLM2-style tokenizers
(``tests/test_sweep.py``), and on the real Gemma 3 and SmolLM2 tokenizers when installed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetPrompt:
    """A target prompt and the placeholder whose position receives the vector."""

    text: str
    """The prompt."""
    placeholder: str
    """The standalone word or symbol that marks where the vector goes."""
    origin: str = "user"
    """Where the prompt comes from."""
    reads: str = ""
    """What decoding with it shows."""


PROMPTS: dict[str, TargetPrompt] = {
    "description": TargetPrompt(
        "A detailed description of x is that",
        "x",
        "the reference experiment this project reproduces (docs/reference-experiment.md)",
        "a free-text description of what the vector stands for",
    ),
    "identity": TargetPrompt(
        "cat -> cat\n1135 -> 1135\nhello -> hello\n?",
        "?",
        "Ghandeharioun et al. 2024 (Patchscopes), token-identity / next-token prompt",
        "the token the vector encodes: the model copies it after the few-shot identity pattern",
    ),
    "entity": TargetPrompt(
        "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
        "multinational major appliance and consumer electronics corporation, x",
        "x",
        "Ghandeharioun et al. 2024 (Patchscopes), entity-description few-shot prompt",
        "a short description of the entity the vector encodes",
    ),
}
"""The presets, by name."""


def target_prompt(prompt: str, placeholder: str | None = None) -> TargetPrompt:
    """A preset by name, or ``prompt`` itself as a custom prompt (placeholder default ``x``).

    A preset keeps its own placeholder; naming another one with it is an error.
    """
    preset = PROMPTS.get(prompt)
    if preset is None:
        return TargetPrompt(prompt, placeholder or "x")
    if placeholder is not None and placeholder != preset.placeholder:
        raise ValueError(
            f"the {prompt!r} prompt's placeholder is {preset.placeholder!r}, not {placeholder!r}; "
            "leave `placeholder` unset, or give the prompt text itself"
        )
    return preset
