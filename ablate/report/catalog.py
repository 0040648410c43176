"""Which variants exist and what they are called, without importing them.

The table needs each registered variant's name and one-line description. Importing the variants
imports torch (about 2 s); reading their source with :mod:`ast` takes milliseconds. The static
reading follows the registry's own rules (entry points of ``ablate.variants``; a module entry
point registers every non-underscore submodule's ``VARIANT``/``VARIANTS``; a class entry point
that class) and gives up, returning None, wherever a value is not a literal in the source (an
inherited or computed ``name`` or ``description``, a class imported from elsewhere, a syntax
error): the caller then loads the real registry. One thing it cannot see is a module that parses but fails to import;
it lists such a variant as implemented where ``ablate variants`` would report and skip it.
"""
from __future__ import annotations

import ast
import importlib.util
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional

from ..registry import FAMILIES, GROUP, Registry


def _literal_attrs(cls: ast.ClassDef) -> dict[str, str]:
    out = {}
    for node in cls.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        else:
            continue
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            out[target] = value.value
    return out


def _module_classes(path: Path, only: Optional[str] = None) -> Optional[list[dict[str, str]]]:
    """The variant classes a module file exports (or class ``only``), as their literal
    attributes; None if the source does not say."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    if only is not None:
        names = [only]
    else:
        names = []
        for node in tree.body:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                continue
            if node.targets[0].id == "VARIANT":
                if not isinstance(node.value, ast.Name):
                    return None
                names.append(node.value.id)
            elif node.targets[0].id == "VARIANTS":
                if not isinstance(node.value, (ast.List, ast.Tuple)) or \
                        not all(isinstance(e, ast.Name) for e in node.value.elts):
                    return None
                names += [e.id for e in node.value.elts]
    def attrs_of(name: str, seen: tuple[str, ...] = ()) -> dict[str, str]:
        """Literal attributes with those of same-module base classes (leftmost base wins)."""
        cls, merged = classes[name], {}
        for base in reversed(cls.bases):
            if isinstance(base, ast.Name) and base.id in classes and base.id not in seen:
                merged.update(attrs_of(base.id, seen + (name,)))
        merged.update(_literal_attrs(cls))
        return merged

    out = []
    for name in names:
        if name not in classes:
            return None
        attrs = attrs_of(name)
        # the table needs name and description; a family written here must be valid (one
        # inherited from a base in another module, e.g. variants._common, is the registry's call)
        if not {"name", "description"} <= set(attrs) or attrs.get("family", FAMILIES[0]) not in FAMILIES:
            return None
        out.append(attrs)
    return out


def static_catalog() -> Optional[dict[str, str]]:
    """``{variant name: description}`` in the registry's order, read from source; None where
    the source alone cannot tell (then use :func:`ablate.registry.load_registry`)."""
    found: dict[str, str] = {}
    eps = sorted(entry_points(group=GROUP), key=lambda e: (e.name != "builtin", e.name))
    for ep in eps:
        module, _, attr = ep.value.partition(":")
        try:
            spec = importlib.util.find_spec(module.strip())
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        files: list[Path] = []
        if attr:
            classes = _module_classes(Path(spec.origin), attr.strip())
        else:
            files = [Path(spec.origin)]
            for loc in spec.submodule_search_locations or ():
                files += sorted((p for p in Path(loc).glob("*.py") if not p.name.startswith("_")),
                                key=lambda p: p.stem)
            classes = []
            for f in files:
                got = _module_classes(f)
                if got is None:
                    return None
                classes += got
        if classes is None:
            return None
        for c in classes:
            if c["name"] in found:
                return None  # duplicates: the registry decides which one wins
            found[c["name"]] = c["description"]
    return found


def catalog(registry: Optional[Registry] = None, needed: tuple[str, ...] = ()) -> dict[str, str]:
    """``{name: description}`` of the registered variants: from ``registry`` if given, else read
    statically, else (or when a name in ``needed`` is missing from the static reading, so a
    variant is never wrongly called unregistered) from the imported registry."""
    if registry is None:
        static = static_catalog()
        if static is not None and set(needed) <= set(static):
            return static
        from ..registry import load_registry

        registry = load_registry()
    return {name: cls.description for name, cls in registry.variants.items()}
