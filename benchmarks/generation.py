"""SAE encode throughput, and Patchscope generation with and without the patch."""

from __future__ import annotations

from typing import Any

import torch

from patchscope.sae.jumprelu import JumpReLUSAE
from patchscope.scope.inject import Row, inject
from patchscope.scope.placeholder import PromptPlan

from .common import interleaved


class _IdTokenizer:
    """Just what `inject` reads from a tokenizer; the random model has no real one."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def sae_encode(d_model: int, *, d_sae: int, n_vectors: int, warmup: int, runs: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    sae = JumpReLUSAE(
        torch.randn(d_model, d_sae, generator=generator) / d_model**0.5,
        torch.zeros(d_sae),
        torch.full((d_sae,), 0.5),
        torch.randn(d_sae, d_model, generator=generator) / d_sae**0.5,
        torch.zeros(d_model),
    ).to(device)
    x = torch.randn(n_vectors, d_model, generator=generator).to(device)

    def run() -> None:
        with torch.inference_mode():
            sae.encode(x)

    timing = interleaved({"encode": (run, n_vectors)}, warmup=warmup, runs=runs, device=device)["encode"]
    return dict(
        d_model=d_model,
        d_sae=d_sae,
        batch_vectors=n_vectors,
        vectors_per_s=round(n_vectors / timing.median, 1),
        **timing.as_dict(),
    )


def generation(
    model, *, layer: int, batches: tuple[int, ...], new_tokens: int, warmup: int, runs: int, device: str
) -> list[dict]:
    """Tokens/s of `inject` (HF generate with our hooks), patched and unpatched, against plain HF generate.

    `inject` also records the observed site at every step; the unpatched row keeps the patch hook
    installed but masked off, so it shows the cost of observing alone.
    """
    tokenizer: Any = _IdTokenizer()  # a duck-typed stand-in for a PreTrainedTokenizerBase
    generator = torch.Generator().manual_seed(3)
    prompt_ids = [2] + torch.randint(3, model.config.vocab_size, (15,), generator=generator).tolist()
    plan = PromptPlan(prompt_ids, 6)
    vector = torch.randn(model.config.hidden_size, generator=generator)
    site = f"blocks.{layer}.hook_resid_pre"
    observe = f"blocks.{layer}.mlp.hook_post"
    rows = []
    for batch in batches:

        def make(patched: bool, batch: int = batch):
            def run() -> None:
                inject(
                    model,
                    tokenizer,
                    [Row("r", 0, vector if patched else None) for _ in range(batch)],
                    plan,
                    target_site=site,
                    observe_site=observe,
                    max_new_tokens=new_tokens,
                )

            return run

        ids = torch.tensor([prompt_ids] * batch, device=device)

        def plain(ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        timings = interleaved(
            {
                "patched": (make(True), batch * new_tokens),
                "unpatched": (make(False), batch * new_tokens),
                "plain": (plain, batch * new_tokens),
            },
            warmup=warmup,
            runs=runs,
            device=device,
        )
        rows.append(
            dict(
                batch=batch,
                new_tokens=new_tokens,
                prompt_tokens=len(prompt_ids),
                patched=timings["patched"].as_dict(),
                unpatched=timings["unpatched"].as_dict(),
                plain=timings["plain"].as_dict(),
                ratio=timings["patched"].median / timings["plain"].median,
            )
        )
    return rows
