"""The profiling progress bar: tokens/s always, an ETA whenever the run's size is known, rows read for streams.

What the bar counts depends on what is known before the run starts:

    known                         bar counts     ETA from
    a `max_tokens` budget         tokens         the budget
    the corpus size (documents)   documents      the documents left
    neither (a streamed source)   tokens         none; the postfix says how many rows were read

After the first few batches it writes one line with the measured tokens/s and, where the size is
known, the time the whole run will take.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

FIRST_BATCHES = 3
"""Batches after which the tokens/s estimate is written (the first batch includes warm-up)."""


class Progress:
    """One run's bar; `update` after each folded batch, `close` at the end."""

    def __init__(
        self,
        desc: str,
        *,
        n_documents: int | None,
        max_tokens: int | None,
        tokens_done: int = 0,
        documents_done: int = 0,
        enabled: bool = True,
    ) -> None:
        self.by_tokens = max_tokens is not None or n_documents is None
        self.max_tokens, self.n_documents = max_tokens, n_documents
        total = max_tokens if max_tokens is not None else n_documents
        initial = tokens_done if self.by_tokens else documents_done
        self.bar = tqdm(
            desc=desc,
            unit="tok" if self.by_tokens else "doc",
            unit_scale=True,
            total=total,
            initial=min(initial, total) if total else initial,
            disable=not enabled,
            dynamic_ncols=True,
        )
        self.enabled = enabled
        self.started = time.perf_counter()
        self.tokens = self.documents = self.batches = 0
        self.tokens_done, self.documents_done = tokens_done, documents_done

    def update(self, tokens: int, documents: int, rows_read: int) -> None:
        """One batch folded: ``tokens`` counted and ``documents`` begun in it; ``rows_read`` from the source so far."""
        self.tokens, self.documents, self.batches = self.tokens + tokens, self.documents + documents, self.batches + 1
        self.tokens_done += tokens
        self.documents_done += documents
        self.bar.update(tokens if self.by_tokens else documents)
        seconds = time.perf_counter() - self.started
        rate = self.tokens / seconds if seconds > 0 else 0.0
        postfix = {"tok/s": f"{rate:,.0f}"}
        if self.n_documents is None:
            postfix["rows read"] = f"{rows_read:,}"
        self.bar.set_postfix(postfix, refresh=False)
        if self.batches == FIRST_BATCHES and self.enabled:
            self.bar.write(self.estimate(rate), file=sys.stderr)  # stdout is the command's own output

    def estimate(self, rate: float) -> str:
        """The tokens/s of the first batches, and what the run will take at that rate where its size is known."""
        line = f"first {self.batches} batches: {rate:,.0f} tokens/s"
        if rate <= 0:
            return line
        if self.max_tokens is not None:
            left = max(self.max_tokens - self.tokens_done, 0) / rate
            return f"{line}; the {self.max_tokens:,}-token budget takes about {_duration(left)} more"
        if self.n_documents and self.documents:
            per_document = self.tokens / max(self.documents, 1)
            left = max(self.n_documents - self.documents_done, 0) * per_document / rate
            return f"{line}; the {self.n_documents:,} documents take about {_duration(left)} more"
        return line

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
