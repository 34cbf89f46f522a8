"""Tiny seeded HF models and a trained tokenizer, saved to disk like real checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

FIXTURE_CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A detailed description of x is that it is a letter of the alphabet.",
    "In 1994 the committee met 3 times to review the budget of 12 million dollars.",
    "Proteins fold into shapes that determine their function in the cell.",
    "The next train to the city leaves at 7 and arrives before 9 in the morning.",
    "def add(a, b): return a + b  # a small python function",
    "Rain fell on the mountains while the valley stayed dry and warm.",
    "She wrote three letters, read two books and walked the dog twice.",
    "Markets rallied after the central bank held interest rates steady.",
    "The museum shows paintings, sculptures and maps from the old empire.",
    "Gradient descent updates the weights in the direction that lowers the loss.",
    "x",
    "",
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: company, x",
    "Children played football in the park until the sun went down behind the hills and the lights came on.",
]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def train_tokenizer(directory: Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the fixture corpus that prepends <bos> like Gemma's."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator([t for t in FIXTURE_CORPUS if t] * 4, trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return fast


def _seeded(model: torch.nn.Module, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def tiny_gemma2_config(vocab_size: int = 400, **overrides) -> Gemma2Config:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return Gemma2Config(**settings)


def tiny_gemma2(directory: Path, seed: int = 0, **overrides) -> Path:
    """A seeded random Gemma-2, saved with its tokenizer; returns the directory."""
    tokenizer = train_tokenizer(directory)
    config = tiny_gemma2_config(vocab_size=len(tokenizer), **overrides)
    model = Gemma2ForCausalLM(config)
    _seeded(model, seed, scale=0.15)
    model.save_pretrained(directory)
    return directory


def tiny_llama(directory: Path, seed: int = 1, **overrides) -> Path:
    tokenizer = train_tokenizer(directory)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    settings.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    _seeded(model, seed, scale=0.15)
    model.save_pretrained(directory)
    return directory


def tiny_gemma3_config(vocab_size: int = 400, **overrides):
    """Gemma 3's text decoder: Gemma-2's four norms plus q/k norms, local and global layers."""
    from transformers import Gemma3TextConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=8,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return Gemma3TextConfig(**settings)


def tiny_gemma3(directory: Path, seed: int = 2, **overrides) -> Path:
    """A seeded random Gemma 3 (text only, ``gemma3_text``), saved with its tokenizer."""
    from transformers import Gemma3ForCausalLM

    tokenizer = train_tokenizer(directory)
    model = Gemma3ForCausalLM(tiny_gemma3_config(vocab_size=len(tokenizer), **overrides))
    _seeded(model, seed, scale=0.15)
    model.save_pretrained(directory)
    return directory


def tiny_from_config(directory: Path, make_config, seed: int = 3, scale: float = 0.15) -> Path:
    """Any causal-LM family: ``make_config(vocab_size)`` -> config; built, seeded, saved with the tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(directory)
    config = make_config(len(tokenizer))
    model = AutoModelForCausalLM.from_config(config)
    _seeded(model, seed, scale)
    model.save_pretrained(directory)
    return directory
