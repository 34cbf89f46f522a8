"""What a Patchscope row is compared against, and what its neuron read can show.

One owner for each answer that the experiment and the sweep both need:

- `Condition`: the patched row and its controls (``unpatched``, ``random_same_norm``, ``corpus_mean``);
- `Case`: where the vector is written relative to the neuron's layer, and so whether its
  reactivation is evidence (FACTS.md, "Patchscopes": writing at ``blocks.L.hook_resid_pre`` and
  reading layer L's MLP re-fires the neuron almost by construction);
- `reactivation_ratio`, `context_window` and `random_same_norm`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from patchscope.atlas.atlas import CONTEXT_TOKENS


class Condition(str, Enum):
    """What was written at the placeholder: the source vector, or one of its controls."""

    PATCHED = "patched"
    UNPATCHED = "unpatched"
    """Nothing: the target prompt as it is."""
    RANDOM_SAME_NORM = "random_same_norm"
    """A random direction scaled to the vector's norm."""
    CORPUS_MEAN = "corpus_mean"
    """The mean of the source site over the corpus."""


CONTROLS: tuple[str, ...] = tuple(c.value for c in Condition if c is not Condition.PATCHED)
"""The controls, by name, in the order they are run and reported."""


def check_controls(names: Sequence[str]) -> None:
    unknown = set(names) - set(CONTROLS)
    if unknown:
        raise ValueError(f"unknown `controls` {sorted(unknown)}; choose from {', '.join(CONTROLS)}")


class Case(str, Enum):
    """Where the vector is written, relative to the layer whose MLP neuron is read."""

    SAME_LAYER = "same_layer"
    EARLIER_TARGET_LAYER = "earlier_target_layer"
    LATER_TARGET_LAYER = "later_target_layer"

    @property
    def description(self) -> str:
        """What a reactivation in this case can show, in words (the sweep's ``case`` column)."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Case.SAME_LAYER: "same layer: reactivation by construction, not evidence",
    Case.EARLIER_TARGET_LAYER: "earlier target layer: reactivation is evidence when above the controls",
    Case.LATER_TARGET_LAYER: "after the neuron: not read",
}
NO_NEURON = "no neuron"
"""The sweep's ``case`` for a source without a neuron."""


def case_of(target_layer: int, neuron_layer: int) -> Case:
    """The case of writing before layer ``target_layer`` and reading layer ``neuron_layer``'s MLP."""
    if target_layer == neuron_layer:
        return Case.SAME_LAYER
    return Case.EARLIER_TARGET_LAYER if target_layer < neuron_layer else Case.LATER_TARGET_LAYER


def reactivation_ratio(activation: float, source_activation: float | None) -> float | None:
    """The neuron at the placeholder over its activation at the source token; None without one."""
    return activation / source_activation if source_activation else None


def context_window(ids: Sequence[int], position: int) -> list[int]:
    """The token at ``position`` and `CONTEXT_TOKENS` tokens either side (fewer at the edges)."""
    return list(ids[max(0, position - CONTEXT_TOKENS) : position + CONTEXT_TOKENS + 1])


def derive_seed(seed: int, *key: int) -> int:
    """A generator seed for one (neuron, source) of a run: a hash of ``seed`` and ``key``.

    A hash rather than ``seed + index``, so that neighbouring keys and neighbouring run seeds never
    share a direction; blake2b of the decimal text, so the seed is the same on every platform.
    """
    text = ",".join(str(int(part)) for part in (seed, *key))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def random_same_norm(vector: Tensor, seed: int, *key: int) -> Tensor:
    """A random direction with ``vector``'s norm, float32 on the CPU, drawn for ``(seed, *key)``.

    Each neuron and source gets its own direction: the key names them (see `derive_seed`).
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, *key))
    direction = torch.randn(vector.shape[-1], generator=generator)  # [d_model]
    return direction / direction.norm() * vector.detach().float().norm().cpu()
