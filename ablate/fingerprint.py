"""Code identity of a run: which code decided its numbers.

A run's key hashes its spec only, so resuming and deduplicating survive any code change. Its
numbers, though, come from code: after a fix in a variant, old and new runs of one key are not
the same measurement. Each job records :func:`fingerprint` of the code it runs, and the table
never pools runs of different fingerprints silently.

The fingerprint is the package version plus a hash of the sources that decide a run's numbers
(the variant's own module and the private helper modules it imports from its package, and
:data:`PARTS` of ``ablate``), taken over their syntax trees with docstrings removed: comments,
docstrings and formatting do not count; any change to what the code does does. Benchmarks and
the harness around the job (database, launcher, CLI, table) are left out: they do not change a
run's numbers.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
from pathlib import Path
from typing import Iterable, Optional

PACKAGE = Path(__file__).resolve().parent
# the parts of ablate that decide a run's numbers (folders: every module in them)
PARTS = ("model", "paradigm", "ops", "train", "prepare.py", "tokenizer", "data", "text", "eval")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def source_digest(path: Path) -> str:
    """SHA-256 of a Python file's syntax tree without docstrings (comments and layout never
    reach the tree); a file that does not parse is hashed as bytes."""
    text = Path(path).read_bytes()
    try:
        tree = _strip_docstrings(ast.parse(text))
        canon = ast.dump(tree, annotate_fields=False, include_attributes=False).encode()
    except SyntaxError:
        canon = text
    return hashlib.sha256(canon).hexdigest()


def _files(parts: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for part in parts:
        p = PACKAGE / part
        if p.is_dir():
            out += sorted(p.rglob("*.py"))
        elif p.exists():
            out.append(p)
    return out


@functools.lru_cache(maxsize=None)
def harness_digest() -> str:
    """Digest of :data:`PARTS` (computed once per process)."""
    h = hashlib.sha256()
    for f in _files(PARTS):
        h.update(f.relative_to(PACKAGE).as_posix().encode() + b"\0" + source_digest(f).encode() + b"\0")
    return h.hexdigest()


def _local_imports(path: Path) -> list[Path]:
    """Modules of the variant's own package that its file imports (``from ._common import x``,
    ``from variants import _common``): shared helpers change its numbers too."""
    try:
        tree = ast.parse(path.read_bytes())
    except SyntaxError:
        return []
    here = path.parent
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names.update([node.module] if node.module else [a.name for a in node.names])
            elif node.level == 0 and node.module and node.module.split(".")[0] == here.name:
                rest = node.module.split(".")[1:]
                names.update([rest[0]] if rest else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == here.name and len(parts) > 1:
                    names.add(parts[1])
    return sorted(f for n in names if n and (f := here / f"{n.split('.')[0]}.py").is_file() and f != path)


@functools.lru_cache(maxsize=None)
def _variant_digest(path: str) -> str:
    h = hashlib.sha256()
    p = Path(path)
    for f in [p, *_local_imports(p)]:
        h.update(f.name.encode() + b"\0" + source_digest(f).encode() + b"\0")
    return h.hexdigest()


def variant_source(cls: type) -> Optional[Path]:
    """The file that defines a variant class (None for a class without a source file)."""
    try:
        f = inspect.getsourcefile(cls)
    except TypeError:
        return None
    return Path(f).resolve() if f else None


def fingerprint(variant_cls: Optional[type] = None) -> str:
    """``<version>-<16 hex>``: the package version and the hash of the code that decides the
    numbers of a run of ``variant_cls`` (the harness parts alone when None)."""
    from . import __version__

    h = hashlib.sha256(harness_digest().encode())
    src = variant_source(variant_cls) if variant_cls is not None else None
    if src is not None:
        h.update(_variant_digest(str(src)).encode())
    elif variant_cls is not None:
        h.update(f"{variant_cls.__module__}.{variant_cls.__qualname__}".encode())
    return f"{__version__}-{h.hexdigest()[:16]}"


def variant_fingerprint(name: str) -> str:
    """:func:`fingerprint` of the registered variant ``name``."""
    from .registry import load_registry

    return fingerprint(load_registry().get(name))

