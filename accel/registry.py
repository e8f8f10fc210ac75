"""The technique registry, and the record of what is applied to a model.

A technique is one core (its own module, pure torch) plus one `Technique` registration: its name,
its config type, its rank in the application order, what it refuses to stack with, how it applies
to a model *site* (`accel.site`) and how its stats read. Front ends and adapters only look things
up here — which technique a config belongs to, whether a stack can work, in which order it is
applied, what line a run reports — so adding a technique adds one registration, not a branch in
every front end (`docs/adding-a-technique.md`).

Stacking rules, checked before any model is touched:
1. One config per technique (two DeepCaches would override the same modules).
2. At most one *feature cache* (a technique that overrides modules inside the model and keeps their
   outputs): two cannot hold one module's output at once.
3. Each technique's own refusals (`Technique.refuses`), e.g. step rehash "extrapolate" over a cache.
4. Techniques apply in rank order, lowest (innermost) first, whatever order the user chained them in.

What is applied to a model is recorded on its root module (`applied_to(root)`), one entry per
technique name, like diffusers' `HookRegistry`: list it, remove one technique by name (the others
stay in place), or remove all, which leaves the model bit-identical to before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .site import Removable, Site

Report = Callable[[Any, float, str], tuple[str, dict[str, Any]]]  # (stats, seconds, what a model call is)
Refusal = Callable[[Any, Any], str | None]  # (this config, another config of the stack) -> why not, or None
_RECORD = "_livecache_applied"


class Handle:
    """One technique applied to one site: its core (`stats`) and the steps that undo it."""

    def __init__(self, technique: Technique, config: Any, core: Any) -> None:
        self.technique = technique
        self.config = config
        self.core = core
        self._undo: list[Callable[[], None]] = []
        self._record: Applied | None = None
        self.calls = "model calls"  # the site's word for one call of its model (`Site.calls`), set on apply

    @property
    def name(self) -> str:
        return self.technique.name

    @property
    def stats(self) -> Any:
        return self.core.stats

    def undo(self, step: Removable | Callable[[], None]) -> None:
        """Add one undo step (a `Removable` or a function); `remove()` runs them newest first."""
        self._undo.append(step.remove if hasattr(step, "remove") else step)

    def remove(self) -> None:
        """Undo everything this technique did; the model keeps every other technique."""
        while self._undo:
            self._undo.pop()()
        if self._record is not None:
            self._record._forget(self)
            self._record = None

    def report(self, seconds: float) -> tuple[str, dict[str, Any]]:
        """The line and numbers a front end shows after a run of `seconds`."""
        return self.technique.report(self.stats, seconds, self.calls)

    @contextmanager
    def building(self) -> Iterator[Handle]:
        """Apply inside this block: when a step fails, what the steps before it did is undone."""
        try:
            yield self
        except BaseException:
            self.remove()
            raise


Apply = Callable[[Site, Any, Handle, Sequence["Technique"]], None]


@dataclass(frozen=True)
class Technique:
    """One registered technique.

    `apply(site, config, handle, stack)` applies the core to `site`, adding undo steps to `handle`
    (and setting `handle.core`); `stack` lists the techniques applied with it. `rank`: lower applies
    first (innermost). `feature_cache`: overrides modules inside the model and reuses their outputs.
    `depends_on_stack`: how it applies depends on the others (slicing's granularity), so nothing may
    be added around it later. `report(stats, seconds, calls)`: the line and numbers a run shows, `calls`
    naming what one call of the model is on its site (`Site.calls`: "U-Net calls", "transformer calls").
    """

    name: str
    title: str
    config_type: type
    rank: int
    apply: Apply
    report: Report
    feature_cache: bool = False
    depends_on_stack: bool = False
    refuses: Refusal | None = None


class Registry:
    """Techniques by name and by config type."""

    def __init__(self, techniques: Sequence[Technique] = ()) -> None:
        self._by_name: dict[str, Technique] = {}
        self._by_type: dict[type, Technique] = {}
        for technique in techniques:
            self.register(technique)

    def register(self, technique: Technique) -> Technique:
        if technique.name in self._by_name or technique.config_type in self._by_type:
            raise ValueError(f"a technique named {technique.name!r} or configured by "
                             f"{technique.config_type.__name__} is already registered")
        self._by_name[technique.name] = technique
        self._by_type[technique.config_type] = technique
        return technique

    def names(self) -> list[str]:
        return list(self._by_name)

    def named(self, name: str) -> Technique:
        if name not in self._by_name:
            raise KeyError(f"no technique named {name!r}; registered: {', '.join(self._by_name)}")
        return self._by_name[name]

    def of(self, config: Any, host: str = "LiveCache") -> Technique:
        """The technique `config` configures; `host` names who asks, in the error."""
        technique = self._by_type.get(type(config))
        if technique is None:
            raise TypeError(f"no {host} adapter for {type(config).__name__}: it configures no registered technique")
        return technique

    def check_stack(self, configs: Sequence[Any]) -> None:
        """Raise ValueError naming the problem when `configs` cannot be applied together."""
        techniques = [self.of(c) for c in configs]
        seen: set[str] = set()
        for technique in techniques:
            if technique.name in seen:
                raise ValueError(f"{technique.title} is applied twice to one model; the two would fight over the same "
                                 f"modules — keep one {technique.title} node in the chain")
            seen.add(technique.name)
        caches = [t.title for t in techniques if t.feature_cache]
        if len(caches) > 1:
            raise ValueError(f"{caches[0]} and {caches[1]} both cache the U-Net's deep features; two feature caches "
                             "cannot share one U-Net — keep one")
        for technique, config in zip(techniques, configs, strict=True):
            for other in configs:
                why = None if technique.refuses is None or other is config else technique.refuses(config, other)
                if why:
                    raise ValueError(why)

    def application_order(self, configs: Sequence[Any]) -> list[Any]:
        """`configs` sorted innermost first (stable for equal ranks), after checking they stack."""
        self.check_stack(configs)
        return sorted(configs, key=lambda c: self.of(c).rank)

    def apply(self, site: Site, configs: Sequence[Any]) -> list[Handle]:
        """Apply `configs` to `site` (checked, in rank order) and record them on `site.holder` (its root).

        The handles come back in the order of `configs`. When one fails, the ones applied before it are
        removed again. A model that already carries techniques takes new ones only around them.
        """
        techniques = [self.of(c, site.family) for c in configs]
        record = applied_to(site.holder)
        record.check_additions(techniques)
        stack = [h.technique for h in record.handles()] + techniques
        self.check_stack(record.configs() + tuple(configs))
        handles: dict[int, Handle] = {}
        try:
            for config in self.application_order(configs):
                handle = Handle(self.of(config), config, None)
                handle.calls = site.calls
                with handle.building():
                    handle.technique.apply(site, config, handle, stack)
                record._add(handle)
                handles[id(config)] = handle
        except BaseException:
            for handle in reversed(list(handles.values())):
                handle.remove()
            raise
        return [handles[id(c)] for c in configs]


class Applied:
    """What is applied to one model, by technique name, in application order (innermost first)."""

    def __init__(self, root: Any) -> None:
        self._root = root
        self._handles: list[Handle] = []

    def names(self) -> list[str]:
        return [h.name for h in self._handles]

    def handles(self) -> list[Handle]:
        return list(self._handles)

    def configs(self) -> tuple[Any, ...]:
        return tuple(h.config for h in self._handles)

    def handle(self, name: str) -> Handle:
        for handle in self._handles:
            if handle.name == name:
                return handle
        raise KeyError(f"{name!r} is not applied to this model; applied: {', '.join(self.names()) or 'nothing'}")

    def remove(self, name: str) -> None:
        """Remove one technique; every other one stays applied and keeps working."""
        self.handle(name).remove()

    def remove_all(self) -> None:
        """Remove everything, outermost first: the model is then exactly as it was before."""
        for handle in reversed(self._handles):
            handle.remove()

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self._handles)

    def check_additions(self, techniques: Sequence[Technique]) -> None:
        """Refuse techniques that cannot join what is applied (before anything is touched)."""
        if not self._handles:
            return
        for technique in techniques:
            cache = next((h.technique for h in self._handles if h.technique.feature_cache), None)
            if technique.feature_cache and cache is not None:
                raise ValueError(f"cannot apply {technique.title}: another feature cache is applied to this model "
                                 f"({cache.title}); remove it first")
            if technique.name in self:
                raise ValueError(f"{technique.title} is already applied to this model; remove it first")
            inner = next((h.technique for h in self._handles
                          if h.technique.depends_on_stack or h.technique.rank >= technique.rank), None)
            if inner is not None:
                raise ValueError(f"cannot add {technique.title} to a model that already has {inner.title}: "
                                 f"{technique.title} would have to sit inside it; remove {inner.title} and apply "
                                 "both together")

    def _add(self, handle: Handle) -> None:
        if not self._handles:
            self._root.__dict__[_RECORD] = self
        self._handles.append(handle)
        handle._record = self

    def _forget(self, handle: Handle) -> None:
        self._handles.remove(handle)
        if not self._handles:
            self._root.__dict__.pop(_RECORD, None)


def applied_to(root: Any) -> Applied:
    """The record of what is applied to `root` (an empty one when nothing is)."""
    record = root.__dict__.get(_RECORD)
    return Applied(root) if record is None else record
