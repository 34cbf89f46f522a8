"""A `JumpReLUSAE` as a feature site of the profiler (`patchscope.atlas.feature_site`)."""

from __future__ import annotations

import hashlib

import torch

from patchscope.atlas.feature_site import FeatureSite
from patchscope.sae.jumprelu import JumpReLUSAE, SAEError


def feature_site(sae: JumpReLUSAE, *, site: str | None = None, label: str | None = None) -> FeatureSite:
    """Profile ``sae``'s features at the site it was trained on (or ``site``, which must be that tensor).

    Encoding is the SAE's own float32 `JumpReLUSAE.encode`, on the device of the activations it reads:
    the SAE moves there at its first chunk (once; a site under a device map may live on another GPU
    than the inputs).
    """
    from patchscope.sae.jumprelu import check_site

    reads = site or sae.info.site
    if reads is None:
        raise SAEError(f"{sae.info.source}: the SAE records no site; name the site it reads")
    check_site(sae, reads)  # refuses an unreadable site (attn_out's o_proj input) and a mismatch
    return FeatureSite(
        reads=reads,
        label=label or sae.info.width or str(sae.d_sae),
        d_in=sae.d_model,
        d_sae=sae.d_sae,
        encode=lambda x: sae.to(x.device).encode(x),  # [tokens, d_in] -> [tokens, d_sae] float32, on x's device
        identity=f"{sae.info.source}#{_digest(sae)}",
        neuronpedia=sae.info.neuronpedia,
    )


def _digest(sae: JumpReLUSAE) -> str:
    """A short content digest of the SAE's tensors, so that a changed file is another SAE."""
    digest = hashlib.sha256()
    for name in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        tensor: torch.Tensor = getattr(sae, name)
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_feature_sites(specs: list[str], *, d_model: int, device: str | torch.device = "cpu") -> list[FeatureSite]:
    """``--sae SPEC`` (repeatable): each SAE loaded (`patchscope.sae.loaders.load_sae`) onto ``device`` as a feature site.

    Two SAEs of one width at one site are told apart by their position on the command line.
    """
    from patchscope.sae.loaders import load_sae

    sites: list[FeatureSite] = []
    for spec in specs:
        sae = load_sae(spec, d_model=d_model, device=device)
        site = feature_site(sae)
        if any(s.name == site.name for s in sites):
            site = feature_site(sae, label=f"{site.label}-{len(sites)}")
        sites.append(site)
    return sites
