"""An inference-only JumpReLU SAE (Gemma Scope), its site rule, and feature read-outs.

Gemma Scope's residual SAE for layer L reads the *output* of block L, ``blocks.L.hook_resid_post``,
which is the same tensor as ``blocks.(L+1).hook_resid_pre``. A vector taken at
``blocks.12.hook_resid_pre`` therefore belongs to the ``layer_11`` SAE.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from patchscope.model.sites import parse_site


class SAEError(ValueError):
    """An SAE file or spec cannot be used as asked; the message says what to fix."""


class SAESiteWarning(UserWarning):
    """An SAE was applied to a vector from a site it was not trained on."""


@dataclass(frozen=True)
class SAEInfo:
    """Where an SAE comes from and what it reads."""

    site: str | None = None
    """The hook site the SAE was trained on, e.g. ``blocks.11.hook_resid_post``; None if unknown."""
    model: str | None = None
    """The model it was trained on."""
    layer: int | None = None
    width: str | None = None
    """Dictionary size as Gemma Scope names it (``16k``)."""
    l0: float | None = None
    """Average L0 reported for the SAE."""
    source: str = ""
    """File or hub location it was loaded from."""
    neuronpedia: str | None = None
    """Neuronpedia prefix ``{model}/{source}``, e.g. ``gemma-2-2b/11-gemmascope-res-16k``, if the SAE is on Neuronpedia."""
    hook_point: str | None = None
    """The HF hook point the file declares (Gemma Scope 2's ``hf_hook_point_in``), e.g. ``model.layers.5.output``."""
    site_out: str | None = None
    """For a transcoder: the site it predicts (e.g. ``blocks.5.hook_mlp_out``)."""
    unreadable: str = ""
    """Why patchscope cannot capture `site` (empty when it can), e.g. an ``attn_out`` SAE reading o_proj's input."""


class JumpReLUSAE(nn.Module):
    """JumpReLU SAE: ``acts = relu(pre) * (pre > threshold)`` with ``pre = x @ W_enc + b_enc``.

    Everything is computed in float32, whatever the input dtype (Gemma Scope's convention).
    """

    W_enc: Tensor  # buffers, declared for type checkers
    b_enc: Tensor
    threshold: Tensor
    W_dec: Tensor
    b_dec: Tensor

    def __init__(
        self,
        W_enc: Tensor,
        b_enc: Tensor,
        threshold: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        info: SAEInfo = SAEInfo(),
        *,
        apply_b_dec_to_input: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("W_enc", W_enc.float())  # [d_model, d_sae]
        self.register_buffer("b_enc", b_enc.float())  # [d_sae]
        self.register_buffer("threshold", threshold.float())  # [d_sae]
        self.register_buffer("W_dec", W_dec.float())  # [d_sae, d_model]
        self.register_buffer("b_dec", b_dec.float())  # [d_model]
        self.info = info
        self.apply_b_dec_to_input = apply_b_dec_to_input
        """Some SAELens conversions subtract b_dec before encoding; Gemma Scope does not."""

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``[..., d_model]`` -> feature activations ``[..., d_sae]`` (float32 unless ``dtype``)."""
        x = x.to(self.W_enc.device, torch.float32)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        # 1. pre-activations
        pre = x @ self.W_enc + self.b_enc
        # 2. the jump: a feature fires only strictly above its threshold
        fired = pre > self.threshold
        # 3. JumpReLU
        acts = torch.relu(pre) * fired
        return acts if dtype is None else acts.to(dtype)

    def decode(self, acts: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``[..., d_sae]`` -> reconstruction ``[..., d_model]``."""
        recon = acts.to(self.W_dec.device, torch.float32) @ self.W_dec + self.b_dec
        return recon if dtype is None else recon.to(dtype)

    def forward(self, x: Tensor, *, keep_dtype: bool = False) -> Tensor:
        """Reconstruction of ``x``; in ``x``'s dtype when ``keep_dtype``."""
        return self.decode(self.encode(x), dtype=x.dtype if keep_dtype else None)

    def feature_url(self, feature: int) -> str | None:
        prefix = self.info.neuronpedia
        return f"https://www.neuronpedia.org/{prefix}/{feature}" if prefix else None


# -- the site rule


def sae_layer_for_site(site: str) -> int:
    """The Gemma Scope residual SAE layer that reads ``site``: L for resid_post L, L-1 for resid_pre L."""
    layer, suffix = parse_site(site)
    if suffix == "hook_resid_post":
        return layer
    if suffix == "hook_resid_pre" and layer >= 1:
        return layer - 1
    raise SAEError(
        f"no Gemma Scope residual SAE reads {site!r}: they read blocks.L.hook_resid_post "
        "(= blocks.L+1.hook_resid_pre); pass `sae` explicitly for other sites"
    )


def same_tensor(a: str, b: str) -> bool:
    """Whether two site names denote the same tensor (resid_post L is resid_pre L+1)."""

    def canonical(name: str) -> tuple[int, str]:
        layer, suffix = parse_site(name)
        return (layer - 1, "hook_resid_post") if suffix == "hook_resid_pre" and layer >= 1 else (layer, suffix)

    return canonical(a) == canonical(b)


def check_site(sae: JumpReLUSAE, site: str, *, allow_site_mismatch: bool = False) -> None:
    """Refuse (or, with ``allow_site_mismatch``, loudly allow) reading a vector from another site."""
    trained = sae.info.site
    if sae.info.unreadable:
        raise SAEError(
            f"{sae.info.source}: {sae.info.unreadable}. patchscope has no such site, so it cannot read this SAE "
            "at any of its sites; use a resid_post or mlp_out SAE"
        )
    if trained is None or same_tensor(trained, site):
        return
    message = f"the SAE was trained on {trained}, but the vector comes from {site}"
    if not allow_site_mismatch:
        raise SAEError(
            f"{message}. For a vector at blocks.L.hook_resid_pre use the layer L-1 residual SAE; "
            "set `allow_site_mismatch` to read it anyway"
        )
    warnings.warn(f"{message}; its features may mean nothing here", SAESiteWarning, stacklevel=2)


def check_for_model(sae: JumpReLUSAE, d_model: int) -> None:
    if sae.d_model != d_model:
        raise SAEError(
            f"SAE width mismatch: it reads d_model={sae.d_model} vectors but the model's d_model is {d_model}; "
            "pick an SAE trained on this model"
        )


# -- read-outs


@dataclass(frozen=True)
class FeatureHit:
    index: int
    activation: float
    url: str | None


@dataclass
class SAEReadout:
    """What an SAE says about one vector."""

    features: list[FeatureHit]
    """The top features by activation, strongest first."""
    l0: int
    """Number of active features."""
    relative_error: float
    """``|x - recon| / |x|``."""
    cosine: float
    """Cosine between the vector and its reconstruction."""
    warnings: list[str] = field(default_factory=list)


def top_features(sae: JumpReLUSAE, vector: Tensor, k: int = 10, *, position: int | None = None) -> SAEReadout:
    """Read one ``[d_model]`` vector: top-k features, reconstruction quality, L0."""
    x = vector.detach().reshape(-1).float().to(sae.W_enc.device)
    if x.shape[0] != sae.d_model:
        raise SAEError(f"vector has {x.shape[0]} entries but the SAE reads d_model={sae.d_model}")
    acts = sae.encode(x)  # [d_sae]
    recon = sae.decode(acts)  # [d_model]
    count = min(k, int((acts > 0).sum()))
    values, indices = acts.topk(count) if count else (acts[:0], acts[:0].long())
    notes = []
    if position == 0:
        notes.append("position 0 is BOS: Gemma Scope SAEs were not trained on it, so this read-out is meaningless")
    return SAEReadout(
        features=[FeatureHit(int(i), float(v), sae.feature_url(int(i))) for v, i in zip(values.tolist(), indices.tolist())],
        l0=int((acts > 0).sum()),
        relative_error=float((x - recon).norm() / x.norm().clamp(min=1e-12)),
        cosine=float(torch.nn.functional.cosine_similarity(x, recon, dim=0)),
        warnings=notes,
    )
