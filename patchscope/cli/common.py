"""Flags and checks shared by the subcommands."""

from __future__ import annotations

import argparse


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype`` and ``--device``, with the same help and choices as `ExperimentConfig`."""
    from patchscope.cli.args import add_dataclass_arguments
    from patchscope.experiment import ExperimentConfig

    add_dataclass_arguments(parser, ExperimentConfig, only=("model", "dtype", "device"))


def layer_count(model_name: str) -> int:
    """The model's number of blocks, from its config alone."""
    from patchscope.model.loading import load_config

    return load_config(model_name).get_text_config().num_hidden_layers


def check_layers(model_name: str, layers: list[int]) -> None:
    """Layer numbers against the model's config, before its weights load."""
    count = layer_count(model_name)
    for layer in layers:
        if not 0 <= layer < count:
            raise ValueError(f"layer {layer} is out of range: {model_name} has layers 0..{count - 1}")
