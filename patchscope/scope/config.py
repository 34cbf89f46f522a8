"""What a Patchscope does: the target prompt, the sites, generation, controls.

`PromptSpec` is what a Patchscope run (`PatchscopeConfig`) and a sweep
(`patchscope.scope.sweep.SweepConfig`) share: the target prompt, its placeholder, how many tokens
to generate and the seed. Each config redeclares only the defaults and help that differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchscope.model.sites import parse_site
from patchscope.scope.controls import CONTROLS
from patchscope.scope.placeholder import POSITION_FALLBACK
from patchscope.scope.prompts import TargetPrompt
from patchscope.scope.rows import Generation

DEFAULT_PROMPT = "A detailed description of x is that"


@dataclass(frozen=True)
class PromptSpec:
    """The target prompt, its placeholder, generation length and seed."""

    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "Target prompt holding the placeholder word."})
    placeholder: str | None = field(
        default="x", metadata={"help": "Word whose token receives the vector; matched by character offsets, as a whole token."}
    )
    max_new_tokens: int = field(default=20, metadata={"help": "Tokens to generate after the prompt."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling and for the random-vector control."})

    def target(self) -> TargetPrompt:
        """The prompt text and its placeholder."""
        return TargetPrompt(self.prompt, self.placeholder or "x")

    def target_position(self) -> int | None:
        """An explicit patch position (BOS = 0) instead of the placeholder's; None searches for it."""
        return None

    def placeholder_fallback(self) -> str:
        """The way out a placeholder error offers: here a preset prompt (a sweep takes no explicit position)."""
        return "use a preset `prompt` (identity, entity, description), whose placeholders are known to work"

    def generation(self) -> Generation:
        return Generation(max_new_tokens=self.max_new_tokens, seed=self.seed)

    def chosen_controls(self) -> tuple[str, ...]:
        """The controls to run, by name (`patchscope.scope.controls.CONTROLS`)."""
        return CONTROLS

    def validate_prompt(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be 0 or more, got {self.max_new_tokens}")


@dataclass(frozen=True)
class PatchscopeConfig(PromptSpec):
    """The target prompt, where to patch, what to observe and how to generate."""

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
    temperature: float = field(default=0.0, metadata={"help": "0 for greedy decoding; above 0 samples."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass when sampling."})
    controls: bool = field(
        default=True, metadata={"help": "Also run the unpatched prompt, a random vector of the same norm, and the corpus mean."}
    )

    def target_position(self) -> int | None:
        return self.position

    def placeholder_fallback(self) -> str:
        return POSITION_FALLBACK

    def generation(self) -> Generation:
        return Generation(self.max_new_tokens, self.temperature, self.top_p, self.seed)

    def chosen_controls(self) -> tuple[str, ...]:
        return CONTROLS if self.controls else ()

    def validate(self) -> None:
        self.validate_prompt()
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("`temperature` must be >= 0 and `top_p` in (0, 1]")
        for site in (self.source_site, self.target_site):
            if site is not None:
                parse_site(site)
