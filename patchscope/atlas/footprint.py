"""What a profile will hold in memory, said before it starts: the atlas state per site and in all, and the workspace.

Per neuron the running state holds (`patchscope.atlas.stats`, `patchscope.atlas.exact`):

    top-k        top_k x (float32 value + int64 doc, position, token)     28 bytes a slot
    bottom-k     bottom_k slots, the same
    histogram    N_BINS int64 counts                                    (when `histogram`)
    moments      fire count, total, total of squares, non-finite count   4 x 8 bytes
    exact sums   (len(SHIFTS) + 1) x 2 float64 limbs

and per site one int64 token count. The workspace is one batch's activations at the widest site
(``batch_tokens`` x width, in the model's dtype): each site's are reduced inside its hook
(`patchscope.atlas.engine.Profiler`), so they are not all held at once. The model's own forward
temporaries come on top.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from patchscope.atlas.exact import SHIFTS
from patchscope.atlas.profile_config import ATLAS_BYTES_PER_SLOT, ProfileConfig
from patchscope.kernels.histogram import N_BINS


@dataclass(frozen=True)
class Footprint:
    """Bytes of a profile's running state per site, and of one batch's captured activations."""

    per_site: dict[str, int]
    workspace: int

    @property
    def state(self) -> int:
        return sum(self.per_site.values())

    def describe(self) -> str:
        """Two lines for people: the state per site (or its range over many sites) and in all, the workspace."""
        sizes = sorted(set(self.per_site.values()))
        each = _mib(sizes[0]) if len(sizes) == 1 else f"{_mib(sizes[0])}-{_mib(sizes[-1])}"
        return (
            f"atlas state: {each} per site x {len(self.per_site)} site{'s' if len(self.per_site) != 1 else ''} = "
            f"{_mib(self.state)}; workspace: {_mib(self.workspace)} of one site's activations per batch"
        )


def neuron_bytes(config: ProfileConfig) -> int:
    """Bytes of running state per neuron under ``config``."""
    slots = (config.top_k + config.bottom_k) * ATLAS_BYTES_PER_SLOT
    return slots + (N_BINS * 8 if config.histogram else 0) + 4 * 8 + (len(SHIFTS) + 1) * 2 * 8


def footprint(config: ProfileConfig, widths: Mapping[str, int], dtype_bytes: int = 4) -> Footprint:
    """The `Footprint` of profiling sites of these widths (``config.sites`` resolved, see `ProfileConfig.for_model`)."""
    per = neuron_bytes(config)
    return Footprint(
        per_site={site: per * width + 8 for site, width in widths.items()},
        workspace=config.batch_tokens * max(widths.values(), default=0) * dtype_bytes,
    )


def widths_from_config(sites: tuple[str, ...], d_model: int, d_mlp: int) -> dict[str, int]:
    """Site widths from a model's config alone: d_mlp for ``mlp.*`` sites, d_model for the others."""
    return {site: d_mlp if ".mlp." in site else d_model for site in sites}


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
