"""What the table calls its rows: the Hyperparameters text of each configuration (what differs
between a variant's configurations), the code versions in its Notes, and the keys rows are grouped
and sorted by. Shared by the table (:mod:`ablate.report.summary` and its pandas twin), the plots'
labels and the HTML report; plain Python."""
from __future__ import annotations

import itertools
import json
import operator
import re
from typing import Any, Optional, Sequence

UNKNOWN_CODE = "-"  # the fingerprint of runs recorded before fingerprints existed


def resolve_key(columns: Sequence[str], key: str, what: str) -> str:
    """The column named by ``key``: itself, ``variant`` for method/model.variant, ``config_key``
    for config, or the one spec column ending with ``.key`` (``scan`` -> ``model.params.scan``)."""
    if key in ("variant", "method", "Method", "model.variant"):
        return "variant"
    if key == "config":
        return "config_key"
    if key in columns:
        return key
    ends = [c for c in columns if c.endswith("." + key)]
    if len(ends) == 1:
        return ends[0]
    spec_cols = sorted(c for c in columns if "." in c)
    hint = f"several match: {', '.join(ends)}" if ends else \
        ("accepted: variant, config, fingerprint, hyper, seed or a spec key such as "
         f"{', '.join(spec_cols[:4]) or 'model.width'}")
    raise ValueError(f"{what}: unknown key {key!r} ({hint})")


def sort_value(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def spec_text(v: Any) -> str:
    """A spec value as the Hyperparameters column writes it (as the grid's overrides are)."""
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


_UNSET = object()  # a spec key some configurations lack (written by an older schema)
_ITEM = re.compile(r", (?=[A-Za-z_][\w.-]*=)")  # splits "a.b=1, c=[1, 2]" between items only


def config_hypers(variants: Sequence[str], config_keys: Sequence[str], hypers: Sequence[str],
                  specs: Optional[dict[str, dict]], overrides: bool) -> dict[str, tuple]:
    """``{config_key: (Hyperparameters text, sort key)}`` of the runs' columns ``variants``,
    ``config_keys``, ``hypers``: per variant, the spec keys whose values differ between its
    configurations here (from ``specs``, ``{config_key: flat spec}``), plus with ``overrides``
    the grid's overrides of its base (the ``hyper`` column); "base" when nothing is left. A
    configuration without a spec falls back to its ``hyper`` text. Texts that would still
    coincide within a variant get the configuration key appended."""
    specs = specs or {}
    by_variant: dict[str, dict[str, str]] = {}  # variant -> {config_key: its first run's hyper}
    firsts: set = set()
    for v, ck, h in zip(variants, config_keys, hypers):
        if ck not in firsts:
            firsts.add(ck)
            by_variant.setdefault(v, {})[ck] = h
    out: dict[str, tuple] = {}
    for part in by_variant.values():
        cks, hyper_texts = list(part), list(part.values())
        differ: list[str] = []
        if len(cks) > 1 and all(c in specs for c in cks):
            names = sorted(set().union(*(specs[c] for c in cks)))
            ref = [specs[cks[0]].get(k, _UNSET) for k in names]
            changed: set = set()
            for c in cks[1:]:  # (C-level passes over the keys: 100 configurations of 100 keys in 1 ms)
                changed.update(itertools.compress(names, map(operator.ne, map(specs[c].get, names,
                                                                              itertools.repeat(_UNSET)), ref)))
            differ = [k for k in names if k in changed]
        texts = {}
        for ck, hyper in zip(cks, hyper_texts):
            items: dict[str, str] = {}
            if overrides or (len(cks) > 1 and ck not in specs):
                items = dict(x.split("=", 1) for x in _ITEM.split(hyper) if "=" in x) if hyper else {}
            spec = specs.get(ck, {})
            for k in differ:
                items.setdefault(k, spec_text(spec[k]) if k in spec else "(unset)")
            text = ", ".join(f"{k}={v}" for k, v in sorted(items.items())) or "base"
            texts[ck] = (text, tuple(sort_value(spec.get(k)) for k in differ))
        seen: dict[str, int] = {}
        for text, _ in texts.values():
            seen[text] = seen.get(text, 0) + 1
        for ck, (text, order) in texts.items():
            out[ck] = (text + (f" [config {ck[:8]}]" if seen[text] > 1 else ""), order + (text,))
    return out


def code_names(fps: Sequence[str]) -> str:
    """``fingerprint abcd1234`` (the first 8 digits), several comma-separated; runs without a
    fingerprint as ``unknown code: no fingerprint``."""
    named = [f[:8] for f in fps if f != UNKNOWN_CODE]
    parts = [("fingerprints " if len(named) > 1 else "fingerprint ") + ", ".join(named)] if named else []
    if UNKNOWN_CODE in fps:
        parts.append("unknown code: no fingerprint")
    return "; ".join(parts) or "unknown code"
