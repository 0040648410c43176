"""Grid files: YAML -> validated, resolved, keyed cells.

A grid file::

    name: quickstart              # optional; defaults to the file's stem
    base: {<partial RunSpec>}     # shared settings
    axes:                         # cartesian product; dotted keys into RunSpec
      model.variant: [transformer, mamba-prefix]
      train.lr: [1.0e-3, 3.0e-3]
    zip:                          # optional groups varied together (equal-length lists)
      - {model.width: [64, 128], model.heads: [2, 4]}
    seeds: [0, 1]
    exclude:                      # optional; a cell matching every key of an entry is dropped
      - {model.variant: mamba-prefix, train.lr: 3.0e-3}
    launcher: {executor: local, jobs: 2, cpus_per_job: 1, timeout_min: 30}

Each cell is validated as a :class:`RunSpec`, its variant's hyperparameters are filled in from
the variant's ``Config``, and its key is the hash of that fully resolved spec.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import Field, ValidationError

from .config import (Closed, ConfigError, LauncherSpec, RunSpec, format_validation_error, paradigm_problem,
                     run_key)
from .registry import Registry, UnknownVariant, load_registry
from .utils import expand_path


class GridError(ConfigError):
    """A malformed grid file or override; one line naming the file, the key and the fix."""


class GridFile(Closed):
    name: Optional[str] = None
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    zip: list[dict[str, list[Any]]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    launcher: LauncherSpec = Field(default_factory=LauncherSpec)


@dataclass
class Cell:
    """One run of a grid: its resolved spec, key, and the axis values that made it."""

    key: str
    spec: RunSpec
    overrides: dict[str, Any]  # dotted key -> value, the axis/zip assignments (seed excluded)

    @property
    def variant(self) -> str:
        return self.spec.model.variant

    @property
    def seed(self) -> int:
        return self.spec.seed


@dataclass
class Grid:
    name: str
    source: str
    base: RunSpec
    cells: list[Cell]
    launcher: LauncherSpec
    axes: list[str] = field(default_factory=list)  # dotted keys that vary across cells


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree['a']['b'] = value`` for ``dotted == 'a.b'``, creating dicts on the way."""
    parts = dotted.split(".")
    cur = tree
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        elif not isinstance(nxt, dict):
            raise GridError(f"{dotted}: {p!r} is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def get_dotted(tree: Any, dotted: str) -> Any:
    cur = tree
    for p in dotted.split("."):
        if not isinstance(cur, dict) or p not in cur:
            raise KeyError(dotted)
        cur = cur[p]
    return cur


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.lr=3e-4'`` -> ``('train.lr', 0.0003)`` (the value is read as YAML)."""
    if "=" not in text:
        raise GridError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise GridError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _resolve(tree: dict, registry: Registry, where: str) -> RunSpec:
    try:
        spec = RunSpec.model_validate(tree)
    except ValidationError as err:
        raise GridError(format_validation_error(err, where)) from None
    try:
        params = registry.resolve_params(spec.model.variant, spec.model.params)
        registry.check_paradigm(spec.model.variant, params, spec.model.paradigm)
        registry.check_positions(spec.model.variant, spec.model.positions)
        why = paradigm_problem(spec)
        if why:
            raise ValueError(why)
    except (UnknownVariant, ValueError) as err:
        raise GridError(f"{where}: {err}") from None
    spec.model.params = params
    return spec


def read_yaml_mapping(path: Path, what: str, example: str, keys: str,
                      error: type[GridError] = GridError) -> dict:
    """The mapping in YAML file ``path``; a missing file, a syntax error (with its line and
    column) or a non-mapping raises ``error`` with one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; pass a YAML file such as {example}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{path}:{at}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: a {what} must be a mapping with keys {keys}")
    return raw


def load_grid_file(path: Path) -> GridFile:
    path = Path(path)
    raw = read_yaml_mapping(path, "grid file", "grids/quickstart.yaml", "base, axes, seeds, ...")
    try:
        return GridFile.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        msg = format_validation_error(err, str(path))
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
            msg = f"{path}: {e['loc'][0]}: unknown key (accepted: {', '.join(GridFile.model_fields)})"
        raise GridError(msg) from None


def expand(gf: GridFile, source: str = "<grid>", overrides: tuple[str, ...] = (),
           registry: Optional[Registry] = None) -> Grid:
    """Expand a parsed grid into validated, keyed cells (duplicates by key collapse to one)."""
    registry = registry or load_registry()
    base_tree = copy.deepcopy(gf.base)
    launcher = gf.launcher.model_copy(deep=True)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("launcher."):
            *path, field = key.split(".")[1:]
            target = launcher
            for i, part in enumerate(path + [field]):
                if part not in type(target).model_fields:
                    where = ".".join(["launcher", *path[:i]])
                    raise GridError(f"--set {text}: {where} has no key {part!r} (accepted: "
                                    f"{', '.join(sorted(type(target).model_fields))})")
                if i < len(path):
                    target = getattr(target, part)
            try:
                setattr(target, field, value)
            except (ValidationError, ValueError) as err:
                raise GridError(format_validation_error(err, f"--set {text}")) from None
            continue
        # an override also pins an axis: `--set model.variant=transformer` narrows the grid
        set_dotted(base_tree, key, value)
        gf = gf.model_copy(update={"axes": {k: v for k, v in gf.axes.items() if k != key},
                                   "zip": [{k: v for k, v in g.items() if k != key} for g in gf.zip]})
    try:  # the base alone may name no variant (it is an axis): variant params are checked per cell
        base = RunSpec.model_validate(base_tree)
    except ValidationError as err:
        raise GridError(format_validation_error(err, f"{source}: base")) from None

    axes: list[list[tuple[str, Any]]] = []
    for k, values in gf.axes.items():
        if not values:
            raise GridError(f"{source}: axes.{k}: empty list; give at least one value")
        axes.append([(k, v) for v in values])
    for i, group in enumerate(gf.zip):
        lengths = {k: len(v) for k, v in group.items()}
        if len(set(lengths.values())) > 1:
            raise GridError(f"{source}: zip[{i}]: lists must have equal lengths, got {lengths}")
        if group:
            n = next(iter(lengths.values()))
            axes.append([tuple((k, group[k][j]) for k in group) for j in range(n)])  # type: ignore[misc]
    if not gf.seeds:
        raise GridError(f"{source}: seeds: empty list; give at least one seed, e.g. seeds: [0]")

    cells: dict[str, Cell] = {}
    varying: list[str] = [k for k in gf.axes] + [k for g in gf.zip for k in g]
    for i, ex in enumerate(gf.exclude):
        for k in ex:
            if k not in varying:
                raise GridError(f"{source}: exclude[{i}].{k}: not an axis of this grid "
                                f"(axes: {', '.join(varying) or 'none'})")
    for combo in itertools.product(*axes) if axes else [()]:
        assign: dict[str, Any] = {}
        for item in combo:
            pairs = item if isinstance(item[0], tuple) else (item,)
            for k, v in pairs:
                assign[k] = v
        if _excluded(assign, gf.exclude):
            continue
        for seed in gf.seeds:
            tree = copy.deepcopy(base_tree)
            for k, v in assign.items():
                set_dotted(tree, k, v)
            tree["seed"] = seed
            where = f"{source}: cell {', '.join(f'{k}={v}' for k, v in assign.items()) or '(base)'}"
            spec = _resolve(tree, registry, where)
            key = run_key(spec)
            cells.setdefault(key, Cell(key=key, spec=spec, overrides=dict(assign)))
    if not cells:
        raise GridError(f"{source}: every cell is excluded; loosen `exclude`")
    name = gf.name or Path(source).stem
    return Grid(name=name, source=source, base=base, cells=list(cells.values()), launcher=launcher,
                axes=varying)


def _excluded(assign: dict[str, Any], excludes: list[dict[str, Any]]) -> bool:
    return any(all(k in assign and assign[k] == v for k, v in ex.items()) for ex in excludes)


def load_grid(path: Path, overrides: tuple[str, ...] = (), registry: Optional[Registry] = None) -> Grid:
    """Read, validate and expand the grid file at ``path`` (raises :class:`GridError`)."""
    gf = load_grid_file(Path(path))
    return expand(gf, str(path), overrides, registry)


def check_inputs(grid: Grid) -> None:
    """Files the cells name must exist before anything is written (raises :class:`GridError`)."""
    for c in grid.cells:
        s = c.spec
        if s.data.name == "folder" and not Path(s.data.path).expanduser().is_dir():
            raise GridError(f"{grid.source}: data.path: folder {s.data.path} does not exist "
                            "(expected a directory with images and captions.jsonl)")
        if s.data.name == "hf" and not Path(expand_path(s.data.path, "data.path")).is_dir():
            raise GridError(f"{grid.source}: data.path: {s.data.path} does not exist "
                            "(expected a Hugging Face dataset saved with save_to_disk)")
        if s.tokenizer.kind == "diffusers" and not Path(expand_path(s.tokenizer.path, "tokenizer.path")).is_dir():
            raise GridError(f"{grid.source}: tokenizer.path: {s.tokenizer.path} does not exist "
                            "(expected a local diffusers VQModel directory, e.g. aMUSEd's vqvae/)")
        if s.eval.inception_weights and not Path(expand_path(s.eval.inception_weights,
                                                             "eval.inception_weights")).is_file():
            raise GridError(f"{grid.source}: eval.inception_weights: file {s.eval.inception_weights} "
                            "does not exist (give a local FID Inception weights file, or leave it unset)")
        if s.eval.clip_model and not Path(expand_path(s.eval.clip_model, "eval.clip_model")).is_dir():
            raise GridError(f"{grid.source}: eval.clip_model: directory {s.eval.clip_model} does not exist "
                            "(give a local CLIP model directory, or leave it unset)")
    named = {(c.spec.eval.inception_weights, c.spec.eval.clip_model): c.spec.eval for c in grid.cells}
    named.pop((None, None), None)
    if named:  # the weights' format, names and shapes, the CLIP directory's files: before any job runs
        from ablate.eval.standard import check_eval_spec

        for spec in named.values():
            try:
                check_eval_spec(spec)
            except ConfigError as exc:
                raise GridError(f"{grid.source}: {exc}") from None
