"""Capture, patch and stop at named sites of a raw HF model.

Every install is a context manager that removes its handles in ``finally``. They compose:

    with capture(model, ["blocks.4.mlp.hook_post"]) as cache, stop_after(model, "blocks.4.mlp.hook_post"):
        model(input_ids)
    cache["blocks.4.mlp.hook_post"]  # [batch, pos, d_mlp]; layers 5.. never ran

A stop raises `StopForward` inside the model; `stop_after` swallows it when the block exits, so
the statements after the model call inside the block do not run (its `Cut` says so). `run_with_cache`
does capture and stop in one call:

    _, cache = run_with_cache(model, input_ids, "blocks.4.mlp.hook_post")
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from patchscope.model.sites import SiteError, SiteRef, base_model, resolve, stop_site


class HookFn(Protocol):
    """The one hook contract: see the site's tensor, optionally return a replacement."""

    def __call__(self, value: Tensor, step: Step, /) -> Tensor | None:
        """``value`` is ``[batch, pos, d]``. Return ``None`` to leave it, or a tensor of the same shape."""
        ...


class StopForward(Exception):
    """Raised inside the forward pass by `stop_after`; never escapes its context."""


@dataclass
class Step:
    """What a hook knows about the forward call it runs in."""

    site: str
    """The site being hooked."""
    _call: _CallTracker | None = field(default=None, repr=False)

    @property
    def offset(self) -> int:
        """Absolute token position of ``value[:, 0]``: 0 without a KV cache, the cached length with one."""
        return 0 if self._call is None else self._call.offset()


class _CallTracker:
    """Notes, as the decoder stack is called, how many tokens its KV cache already holds.

    Read at call time: by the time a hook in layer L runs, layers before it have grown the cache.
    """

    def __init__(self) -> None:
        self.cache_position: Tensor | None = None
        self.cached = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.cache_position = kwargs.get("cache_position")  # transformers 4.x passes it
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed to `cache` in 5.x
        self.cached = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0

    def offset(self) -> int:
        if self.cache_position is not None:
            return int(self.cache_position[0])
        return self.cached


def _split(output: Any) -> tuple[Tensor, Any]:
    """Decoder layers return a tensor (transformers 5.x) or a tuple (4.x); attention returns a tuple."""
    if isinstance(output, tuple):
        return output[0], output[1:]
    return output, None


def _join(tensor: Tensor, rest: Any) -> Any:
    return tensor if rest is None else (tensor, *rest)


# Modules with an active stop hook, so a hook installed later on the same module can be put before it.
_STOPS: weakref.WeakKeyDictionary[nn.Module, list[Any]] = weakref.WeakKeyDictionary()


def _first_input(args: tuple, kwargs: dict) -> str | None:
    """Where a module's first input is: None for ``args[0]``, else its keyword (``hidden_states`` in HF layers)."""
    if args:
        return None
    if "hidden_states" in kwargs:
        return "hidden_states"
    return next(key for key, value in kwargs.items() if isinstance(value, Tensor))


def _on_part(fn: HookFn, part: slice | None) -> HookFn:
    """``fn`` on a slice of the last dimension (a site inside a fused tensor); a replacement is written back."""
    if part is None:
        return fn

    def on_part(value: Tensor, step: Step) -> Tensor | None:
        new = fn(value[..., part], step)
        if new is None:
            return None
        whole = value.clone()
        whole[..., part] = new
        return whole

    return on_part


def _register(ref: SiteRef, fn: HookFn, tracker: _CallTracker) -> RemovableHandle:
    fn = _on_part(fn, ref.part)
    if ref.point == "input":

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            key = _first_input(args, kwargs)
            value = args[0] if key is None else kwargs[key]
            new = fn(value, Step(ref.name, tracker))
            if new is None:
                return None
            if key is not None:
                return args, {**kwargs, key: new}
            return (new, *args[1:]), kwargs

        handle = ref.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            value, rest = _split(output)
            if not isinstance(value, Tensor):
                raise SiteError(f"site {ref.name!r}: its module returns a {type(value).__name__}, not a tensor")
            new = fn(value, Step(ref.name, tracker))
            return None if new is None else _join(new, rest)

        handle = ref.module.register_forward_hook(hook)
    for stop in _STOPS.get(ref.module, []):
        stop.move_to_end(ref.module)
    return handle


def _call_site(model: nn.Module) -> nn.Module:
    """Where the tracker reads each call's cache: the decoder stack, or the model when no layer list is known."""
    try:
        return base_model(model)
    except SiteError:
        return model


@contextmanager
def add_hooks(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[None]:
    """Install ``{site: fn}`` for the duration of the block."""
    refs = {name: resolve(model, name) for name in fns}  # resolve all before installing any
    tracker = _CallTracker()
    handles: list[RemovableHandle] = []
    try:
        handles.append(_call_site(model).register_forward_pre_hook(tracker, with_kwargs=True))
        for name, fn in fns.items():
            handles.append(_register(refs[name], fn, tracker))
        yield
    finally:
        for handle in handles:
            handle.remove()


PositionSpec = int | Sequence[int] | Tensor | None
"""Absolute token positions: one int, a list, a ``[batch, n]`` tensor (per row), or None for all."""


def _position_index(positions: PositionSpec, batch: int, device: torch.device) -> Tensor | None:
    """Normalise to a ``[batch|1, n]`` LongTensor of absolute positions."""
    if positions is None:
        return None
    index = torch.as_tensor(positions, dtype=torch.long)
    if index.dim() == 0:
        index = index.view(1, 1)
    elif index.dim() == 1:
        index = index.view(1, -1)
    return index.to(device)


class Capture(dict):
    """``{site: tensor}`` from the latest forward call; ``history[site]`` keeps every call when asked.

    With ``positions``, ``positions[site]`` holds the absolute positions of the kept columns.
    Copies to the CPU are asynchronous; every read waits for them to finish first.
    """

    def __init__(self) -> None:
        super().__init__()
        self._history: dict[str, list[Tensor]] = {}
        self.positions: dict[str, Tensor] = {}
        self._pending: list[Any] = []  # CUDA events recorded after each non-blocking copy to the host

    def synchronize(self) -> None:
        """Wait until every copy to the CPU has landed (a no-op when none is in flight)."""
        while self._pending:
            self._pending.pop(0).synchronize()

    @property
    def history(self) -> dict[str, list[Tensor]]:
        self.synchronize()
        return self._history

    def __getitem__(self, name: str) -> Tensor:
        self.synchronize()
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:
        self.synchronize()
        return super().get(name, default)

    def values(self):
        self.synchronize()
        return super().values()

    def items(self):
        self.synchronize()
        return super().items()


def _columns_in_window(positions: PositionSpec, offset: int, seq_len: int) -> Tensor | None:
    """Local indices ``[batch|1, n_in]`` of the requested positions that this call covers, or None.

    The same contract as `patch`: positions are absolute, and a call covers ``offset .. offset +
    seq_len - 1`` (under a KV cache, decode steps cover only the new token). A column is kept when
    every row's position lies in the window. Computed on the CPU: no device sync per call.
    """
    index = cast(Tensor, _position_index(positions, 1, torch.device("cpu"))) - offset  # [batch|1, n]; positions is set
    inside = ((index >= 0) & (index < seq_len)).all(dim=0)  # [n]
    if not bool(inside.any()):
        return None
    return index[:, inside]


@contextmanager
def capture(
    model: nn.Module,
    names: str | Sequence[str],
    *,
    positions: PositionSpec = None,
    to_cpu: bool = False,
    keep_history: bool = False,
) -> Iterator[Capture]:
    """Context manager that records sites as ``[batch, pos, d]`` tensors during the forward passes inside it.

    With ``positions`` (as for `patch`: absolute, one int, a list, or a per-row ``[batch, n]`` tensor), only the
    columns at those positions are kept.

    Under generation with a KV cache a call records only the requested positions it covers, and a
    call that covers none records nothing: the prefill records the prompt positions, the decode step
    at position p records p. ``keep_history`` keeps every recording call's tensor, e.g. one per
    generation step. ``to_cpu`` copies without blocking; reading the result waits for the copies.

    Args:
        model: a HF causal LM of a supported family.
        names: one site name or several (``"blocks.3.hook_resid_post"``, see `list_sites`).
        positions: absolute token positions to keep (all positions when None).
        to_cpu: copy each recorded tensor to the CPU (reading it waits for the copy).
        keep_history: keep every forward call's tensor in ``store.history[site]``, e.g. one per
            generation step; otherwise each call replaces the last.

    Returns:
        A `Capture` dict ``{site: tensor}``, filled as the model runs; the hooks are removed when
        the block ends, also on an exception.

    Example:
        >>> with capture(model, "blocks.3.hook_resid_post") as cache:
        ...     model(input_ids)
        >>> cache["blocks.3.hook_resid_post"].shape  # [batch, pos, d_model]
    """
    names = [names] if isinstance(names, str) else list(names)
    store = Capture()
    try:
        with add_hooks(model, {name: _recorder(store, name, positions, to_cpu, keep_history) for name in names}):
            yield store
    finally:
        store.synchronize()


def _recorder(store: Capture, name: str, positions: PositionSpec, to_cpu: bool, keep_history: bool) -> HookFn:
    """The hook `capture` installs at ``name``: keeps the requested columns of each call in ``store``."""

    def record(value: Tensor, step: Step) -> None:
        kept = value.detach()
        if positions is not None:
            offset = step.offset
            local = _columns_in_window(positions, offset, kept.shape[1])
            if local is None:
                return None
            if local.shape[0] == 1:
                kept = kept[:, local[0].to(kept.device)]
            else:  # per-row positions: [batch, n_in]
                kept = kept.gather(1, local.to(kept.device).unsqueeze(-1).expand(-1, -1, kept.shape[-1]))
            store.positions[name] = local + offset
        if to_cpu and kept.device.type != "cpu":
            kept = kept.to("cpu", non_blocking=True)
            if value.device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(value.device))
                store._pending.append(event)
        dict.__setitem__(store, name, kept)
        if keep_history:
            store._history.setdefault(name, []).append(kept)

    return record


@contextmanager
def patch(
    model: nn.Module,
    name: str,
    value: Tensor,
    *,
    positions: PositionSpec = None,
    mode: Literal["replace", "add"] = "replace",
    rows: Tensor | None = None,
) -> Iterator[None]:
    """Context manager that writes ``value`` into site ``name`` during the forward passes inside it.

    Positions are absolute token indices, so under generation with a KV cache the patch lands in the
    prefill and is skipped at decode steps (which cover later positions); without a cache every step
    re-runs the prefix and is patched again.

    Args:
        model: a HF causal LM of a supported family.
        name: the site to write, e.g. ``"blocks.6.hook_resid_pre"``.
        value: ``[d]``, ``[n_positions, d]`` or ``[batch, n_positions, d]``; cast to the site's dtype.
        positions: absolute positions to write (every position when None).
        mode: ``"replace"`` the site's value, or ``"add"`` to it (steering).
        rows: ``[batch]`` bool mask limiting the patch to some batch rows.

    Returns:
        Nothing to bind; the hook is removed when the block ends, also on an exception.

    Example:
        >>> with patch(model, "blocks.6.hook_resid_pre", vector, positions=[7]):
        ...     out = model.generate(input_ids, max_new_tokens=10)
    """
    if mode not in ("replace", "add"):
        raise ValueError(f"patch mode must be 'replace' or 'add', not {mode!r}")
    with add_hooks(model, {name: _writer(value, positions, mode, rows)}):
        yield


def _writer(value: Tensor, positions: PositionSpec, mode: Literal["replace", "add"], rows: Tensor | None) -> HookFn:
    """The hook `patch` installs: writes ``value`` at the absolute ``positions`` this call covers."""

    def write(current: Tensor, step: Step) -> Tensor | None:
        batch, seq_len, _ = current.shape
        patch_value = value.to(device=current.device, dtype=current.dtype)
        if positions is None:
            target = torch.broadcast_to(patch_value, current.shape)
            new = target if mode == "replace" else current + target
            if rows is not None:
                new = torch.where(rows.to(current.device).view(-1, 1, 1), new, current)
            return new
        # Which positions this call covers is decided on the CPU: on a GPU, reading it back would sync per call
        index = cast(Tensor, _position_index(positions, batch, torch.device("cpu")))  # [batch|1, n]; positions is set
        index = index.expand(batch, -1) - step.offset
        inside = (index >= 0) & (index < seq_len)  # [batch, n]
        if rows is not None:
            inside &= rows.to("cpu").view(-1, 1)
        if not bool(inside.any()):
            return None
        if patch_value.dim() < 3:  # [d] or [n, d]: the same for every row
            patch_value = patch_value.view(1, -1, current.shape[-1])
        patch_value = torch.broadcast_to(patch_value, (batch, index.shape[1], current.shape[-1]))
        row_index, col_index = inside.nonzero(as_tuple=True)
        row_index, col_index, target = (i.to(current.device) for i in (row_index, col_index, index[row_index, col_index]))
        new = current.clone()
        written = patch_value[row_index, col_index]
        if mode == "add":
            written = written + current[row_index, target]
        new[row_index, target] = written
        return new

    return write


class _Stop:
    """A hook that raises `StopForward`; re-registers itself last when another hook joins its module."""

    def __init__(self, ref: SiteRef) -> None:
        self.ref = ref
        self.cut: Cut | None = None
        self.handle: RemovableHandle | None = None
        self.install()

    def install(self) -> None:
        if self.ref.point == "input":
            self.handle = self.ref.module.register_forward_pre_hook(self._raise_pre)
        else:
            self.handle = self.ref.module.register_forward_hook(self._raise_post)

    def move_to_end(self, module: nn.Module) -> None:
        self.remove()
        self.install()

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _raise_pre(self, module: nn.Module, args: tuple) -> None:
        self._stop()

    def _raise_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.cut is not None:
            self.cut.passes += 1
        raise StopForward(self.ref.name)


@dataclass
class Cut:
    """What `stop_after` cut, readable after its block: the contract of an early stop made visible."""

    site: str
    """The site after which forward passes stopped."""
    passes: int = 0
    """Forward passes that reached the site and stopped there (their later layers and LM head never ran)."""
    block_ended: bool = False
    """True when the stop also ended the ``with`` block: statements after the model call inside it did not run."""


@contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[Cut]:
    """Context manager that ends every forward pass inside it right after site ``name``; yields a `Cut`.

    Later layers and the LM head never run, and the model call returns no output: it raises
    `StopForward`, which ends the block, so **the statements after the model call inside the block
    do not run**; execution continues after the block, and ``cut.block_ended`` records that it
    happened. Put the model call last in the block, or use `run_with_cache`, which does it for you.
    Hooks at the same site, installed before or after this one, still run first.

    Args:
        model: a HF causal LM.
        name: the last site to compute.

    Example:
        >>> with capture(model, "blocks.2.mlp.hook_post") as cache, stop_after(model, "blocks.2.mlp.hook_post") as cut:
        ...     model(input_ids)
        >>> cache["blocks.2.mlp.hook_post"]  # [batch, pos, d_mlp]
        >>> cut.passes, cut.block_ended  # (1, True)
    """
    stop = _Stop(resolve(model, name))
    cut = Cut(name)
    stop.cut = cut
    _STOPS.setdefault(stop.ref.module, []).append(stop)
    try:
        yield cut
    except StopForward as signal:
        if signal.args != (name,):  # another stop's signal (an outer stop_after) is not ours to swallow
            raise
        cut.block_ended = True
    finally:
        stop.remove()
        _STOPS[stop.ref.module].remove(stop)


def run_until(model: nn.Module, name: str, **inputs: Any) -> None:
    """Run ``model(**inputs)`` and stop right after ``name``; use inside `capture` to read sites."""
    with stop_after(model, name):
        model(**inputs)


ModelInputs = Tensor | Mapping[str, Any]
"""Token ids ``[batch, pos]``, or the keyword arguments of the model call (a tokenizer's ``BatchEncoding``)."""


def run_with_cache(
    model: nn.Module,
    inputs: ModelInputs,
    names: str | Sequence[str],
    *,
    stop: bool = True,
    positions: PositionSpec = None,
    to_cpu: bool = False,
) -> tuple[Tensor | None, Capture]:
    """One forward pass that records ``names``: returns ``(logits or None, cache)``.

    With ``stop`` the pass ends right after the deepest of the sites (`stop_site` decides, also for raw
    sites), the LM head never runs, and the logits are None. A raw site outside the decoder layers
    (the final norm, the head) needs the whole pass, which then returns its logits. Runs under the
    caller's grad mode: wrap it in ``torch.no_grad()`` or ``torch.inference_mode()`` to save memory.

    Args:
        model: a HF causal LM.
        inputs: token ids ``[batch, pos]``, or the model call's keyword arguments (a ``BatchEncoding``).
        names: one site or several: named (``blocks.3.hook_resid_post``) or raw (``model.norm:output``).
        stop: end the pass after the deepest site (no logits); False runs the whole model.
        positions: absolute positions to keep, as for `capture`.
        to_cpu: copy each recorded tensor to the CPU.

    Returns:
        ``(logits, cache)``: the logits (None when the pass stopped early) and a `Capture` ``{site: tensor}``.

    Example:
        >>> _, cache = run_with_cache(model, input_ids, ["blocks.3.hook_resid_post", "blocks.5.mlp.hook_post"])
        >>> cache["blocks.5.mlp.hook_post"].shape  # [batch, pos, d_mlp]; layers 6.. never ran
    """
    names = [names] if isinstance(names, str) else list(names)
    kwargs = {"input_ids": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    last = stop_site(model, names) if stop else None
    with capture(model, names, positions=positions, to_cpu=to_cpu) as cache:
        if last is None:
            return getattr(model(**kwargs), "logits", None), cache
        with stop_after(model, last) as cut:
            model(**kwargs)
    if cut.passes != 1:
        raise RuntimeError(f"the forward pass never reached {last}: the model did not run the layer that holds it")
    return None, cache
