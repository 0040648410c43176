"""Variant discovery through the ``ablate.variants`` entry-point group.

A variant is an ``nn.Module`` class (the *backbone* of the generator) with these class attributes:

- ``name``: stable name users type (``model.variant``);
- ``description``: one line, becomes the table's Notes/Method text;
- ``family``: ``"transformer" | "mamba" | "hybrid"``;
- ``Config``: a pydantic model of its hyperparameters (``model.params``), extra keys forbidden;
- ``scan_orders``: tuple of image scan orders it supports (``()`` when it has none);
- ``paradigms`` (optional, default ``("masked",)``): the generation paradigms it can serve. For
  a causal one (``ar``, ``var``) it is built with ``ctx.causal = True`` (for ``var`` also
  ``ctx.blocks``, the scales' sizes: block-causal, see ``ctx.block_mask()``; a forward scan is
  causal, hence block-causal too) and must then make image token i depend on tokens ``<= i`` (of
  its block or earlier ones) only (a contract test perturbs token t and checks nothing before t
  moves); ``causal_problem(cfg) -> str | None`` (optional) says why a config cannot be causal
  (a scan order that reads later tokens).

It is built as ``cls(ctx: VariantContext, cfg: cls.Config)`` and called as
``forward(x, text, text_mask) -> h`` or ``-> (h, aux_losses: dict[str, Tensor])`` with
``x: [B, L, D]`` image token states, ``text: [B, T, D]`` projected text states,
``text_mask: [B, T]`` bool (True = real token), ``h: [B, L, D]``.

Auxiliary outputs: entries of ``aux`` named ``loss/<name>`` are scalar losses added to the
training loss; ``aux["confidence"]`` (``[B, L]`` logits that the prediction at each position is
right) lets ``sample.remask: critic`` rank tokens (the sampler scores the filled-in sequence).
A variant may also give ``critic(x, text, text_mask) -> list[Tensor]`` (token critics' logits
``[B, L]`` on an input, e.g. mamba-critic) and ``critic_weight``: training under the masked
paradigm then embeds the generator's own filled-in sequence and adds Token-Critic's loss on those
logits (see :mod:`ablate.paradigm.masked`). A variant never sees the true codes.

An entry point may name a class (one variant) or a module/package: then every module in it
that defines ``VARIANT = <class>`` (or ``VARIANTS = [...]``) is registered. A plugin that fails
to import is reported and skipped; an unknown name fails and lists the known ones.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Optional

log = logging.getLogger(__name__)

GROUP = "ablate.variants"
FAMILIES = ("transformer", "mamba", "hybrid")


@dataclass(frozen=True)
class VariantContext:
    """What the generator tells a backbone about the problem it is built for."""

    width: int  # D
    depth: int  # number of backbone layers
    heads: int
    grid: tuple[int, int]  # image token grid (h, w); L = h * w
    text_len: int  # T, padded text length
    dropout: float = 0.0
    causal: bool = False  # image token i may depend on tokens <= i only (in sequence order) ...
    blocks: tuple[int, ...] = ()  # ... or, when given, on tokens of its own block and earlier ones (var: scales)
    positions: str = "learned"  # or "rope2d": attention blocks rotate queries and keys by coords
    coords: tuple[tuple[float, float], ...] = ()  # (row, column) of each image position, in sequence order

    def block_mask(self, device: Any = None) -> Any:
        """``[L, L]`` bool, True where query i may read key j: block-causal over ``blocks``, else
        causal (None when not causal)."""
        import torch

        if not self.causal:
            return None
        ids = (torch.repeat_interleave(torch.arange(len(self.blocks)), torch.tensor(self.blocks))
               if self.blocks else torch.arange(self.seq_len)).to(device)
        return ids[:, None] >= ids[None, :]

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]


class UnknownVariant(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want the plain line
        return self.args[0]


@dataclass
class Registry:
    variants: dict[str, type]
    origins: dict[str, str]
    errors: dict[str, str]  # plugin that failed -> one-line reason

    def get(self, name: str) -> type:
        if name not in self.variants:
            known = ", ".join(sorted(self.variants)) or "(none)"
            raise UnknownVariant(f"model.variant: unknown variant {name!r}; known variants: {known}")
        return self.variants[name]

    def check_paradigm(self, name: str, params: dict[str, Any], paradigm: str) -> None:
        """Raise ValueError (one line naming model.paradigm) if variant ``name`` with these
        (resolved) ``params`` cannot generate with ``paradigm``."""
        cls = self.get(name)
        why = paradigm_problem(cls, cls.Config(**params), paradigm)
        if why:
            able = sorted(n for n, c in self.variants.items() if paradigm in getattr(c, "paradigms", ("masked",)))
            raise ValueError(f"model.paradigm: variant {name!r} cannot generate with {paradigm!r}: {why} "
                             f"(variants that can: {', '.join(able) or 'none'})")

    def check_positions(self, name: str, positions: str) -> None:
        """Raise ValueError naming model.positions if ``rope2d`` is asked of a variant without
        attention blocks that take it (its ``rope`` attribute)."""
        if positions == "rope2d" and not getattr(self.get(name), "rope", False):
            able = sorted(n for n, c in self.variants.items() if getattr(c, "rope", False))
            raise ValueError(f"model.positions: rope2d rotates attention's queries and keys; variant {name!r} has "
                             f"no attention block that takes it (variants that do: {', '.join(able)}); use learned")

    def resolve_params(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Validate ``params`` against the variant's Config; return them with defaults filled."""
        from pydantic import ValidationError

        cls = self.get(name)
        try:
            cfg = cls.Config(**params)
        except ValidationError as err:
            e = err.errors()[0]
            field = ".".join(str(p) for p in e["loc"])
            accepted = ", ".join(sorted(cls.Config.model_fields)) or "(none)"
            reason = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            raise ValueError(f"model.params.{field}: {reason} for variant {name!r} "
                             f"(accepted: {accepted})") from None
        return cfg.model_dump(mode="json")


def paradigm_problem(cls: Any, cfg: Any, paradigm: str) -> Optional[str]:
    """Why variant class ``cls`` with config ``cfg`` cannot serve ``paradigm``, or None. A
    variant declares ``paradigms`` (default ``("masked",)``); a causal paradigm also asks its
    ``causal_problem(cfg)`` (e.g. a scan order that reads later tokens)."""
    declared = tuple(getattr(cls, "paradigms", ("masked",)))
    if paradigm not in declared:
        return f"it declares {', '.join(declared)} only"
    check = getattr(cls, "causal_problem", None)
    if paradigm != "masked" and check is not None:
        return check(cfg)
    return None


def _check_variant(cls: Any, origin: str) -> Optional[str]:
    """Return None if ``cls`` satisfies the contract, else the reason it does not."""
    from pydantic import BaseModel

    if not inspect.isclass(cls):
        return f"{origin}: {cls!r} is not a class"
    for attr in ("name", "description", "family", "Config"):
        if not hasattr(cls, attr):
            return f"{origin}: variant class {cls.__name__} lacks `{attr}`"
    if cls.family not in FAMILIES:
        return f"{origin}: family {cls.family!r} not in {FAMILIES}"
    if not (inspect.isclass(cls.Config) and issubclass(cls.Config, BaseModel)):
        return f"{origin}: {cls.__name__}.Config must be a pydantic model"
    return None


def _module_variants(mod: ModuleType) -> list[type]:
    found = list(getattr(mod, "VARIANTS", []))
    if hasattr(mod, "VARIANT"):
        found.append(mod.VARIANT)
    return found


def _walk(mod: ModuleType, errors: dict[str, str]) -> list[tuple[type, str]]:
    """Variants exported by ``mod`` and, if it is a package, by each of its submodules.
    A submodule that fails to import is recorded in ``errors`` and skipped."""
    out = [(c, mod.__name__) for c in _module_variants(mod)]
    if hasattr(mod, "__path__"):
        for info in sorted(pkgutil.iter_modules(mod.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            sub_name = f"{mod.__name__}.{info.name}"
            try:
                sub = importlib.import_module(sub_name)
            except Exception as exc:
                errors[sub_name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log.warning("variant module %s failed to import and is skipped: %s",
                            sub_name, errors[sub_name])
                continue
            out += [(c, sub_name) for c in _module_variants(sub)]
    return out


_cache: Optional[Registry] = None


def load_registry(refresh: bool = False) -> Registry:
    """Discover all variants (cached per process; ``refresh`` re-reads entry points)."""
    global _cache
    if _cache is not None and not refresh:
        return _cache
    variants: dict[str, type] = {}
    origins: dict[str, str] = {}
    errors: dict[str, str] = {}
    eps = sorted(entry_points(group=GROUP), key=lambda e: (e.name != "builtin", e.name))
    for ep in eps:
        found: list[tuple[type, str]] = []
        try:
            obj = ep.load()
            if isinstance(obj, ModuleType):
                found = _walk(obj, errors)
            else:
                found = [(obj, ep.value)]
        except Exception as exc:  # a broken plugin must not take the others down
            errors[ep.value] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("variant plugin %s failed to import and is skipped: %s", ep.value, errors[ep.value])
            continue
        for cls, origin in found:
            problem = _check_variant(cls, origin)
            if problem:
                errors[origin] = problem
                log.warning("variant skipped: %s", problem)
                continue
            if cls.name in variants and variants[cls.name] is not cls:
                errors[origin] = f"duplicate variant name {cls.name!r} (already from {origins[cls.name]})"
                log.warning("variant skipped: %s", errors[origin])
                continue
            variants[cls.name] = cls
            origins[cls.name] = origin
    _cache = Registry(variants, origins, errors)
    return _cache
