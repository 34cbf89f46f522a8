"""Flags and checks shared by the subcommands."""

from __future__ import annotations

import argparse


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="google/gemma-2-2b", help="hub id, preset name or local directory")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def check_layers(model_name: str, layers: list[int]) -> None:
    """Layer numbers against the model's config, before its weights load."""
    from patchscope.model.loading import load_config

    count = load_config(model_name).num_hidden_layers
    for layer in layers:
        if not 0 <= layer < count:
            raise ValueError(f"layer {layer} is out of range: {model_name} has layers 0..{count - 1}")
