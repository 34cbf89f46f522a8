"""What a report needs besides the atlas: the model that made it (its texts come from `Atlas.texts`)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from torch import nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.store import load_atlas


def as_atlas(atlas: Atlas | str | Path) -> Atlas:
    return atlas if isinstance(atlas, Atlas) else load_atlas(atlas)


def atlas_model(
    atlas: Atlas, model: str | None = None, dtype: str = "auto", device: str = "auto"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model the atlas names (or ``model``), to replay examples and read output directions."""
    from patchscope.model.loading import DTypeName, load_model

    return load_model(model or atlas.meta.model, dtype=cast(DTypeName, dtype), device=device)  # checked by load_model
