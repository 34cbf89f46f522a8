"""What a Patchscope does: the target prompt, the sites, generation, controls."""

from __future__ import annotations

from dataclasses import dataclass, field

from patchscope.model.sites import parse_site

DEFAULT_PROMPT = "A detailed description of x is that"


@dataclass(frozen=True)
class PatchscopeConfig:
    """The target prompt, where to patch, what to observe and how to generate."""

    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "Target prompt holding the placeholder word."})
    placeholder: str = field(
        default="x", metadata={"help": "Word whose token receives the vector; matched by character offsets, as a whole token."}
    )
    position: int | None = field(
        default=None, metadata={"help": "Explicit target position (BOS = 0), instead of searching for the placeholder."}
    )
    source_site: str | None = field(
        default=None, metadata={"help": "Where the vector is taken (default: blocks.{layer}.hook_resid_pre)."}
    )
    target_site: str | None = field(
        default=None, metadata={"help": "Where it is written in the target prompt (default: the source site)."}
    )
    max_new_tokens: int = field(default=20, metadata={"help": "Tokens to generate after the prompt."})
    temperature: float = field(default=0.0, metadata={"help": "0 for greedy decoding; above 0 samples."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass when sampling."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling and for the random-vector control."})
    controls: bool = field(
        default=True, metadata={"help": "Also run the unpatched prompt, a random vector of the same norm, and the corpus mean."}
    )

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be 0 or more, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("`temperature` must be >= 0 and `top_p` in (0, 1]")
        for site in (self.source_site, self.target_site):
            if site is not None:
                parse_site(site)
