"""Study files: a grid file's ``base`` plus a search space, objectives, sampler, pruner, budget.

::

    name: mamba-study                     # optional; defaults to the file's stem
    base: {<partial RunSpec>}             # shared settings, as in a grid file
    search:                               # dotted RunSpec keys (or model.params.NAME) -> distribution
      train.lr: {type: float, low: 5.0e-4, high: 5.0e-3, log: true}
      model.width: {type: int, low: 64, high: 128, step: 32}
      sample.guidance: {type: categorical, choices: [1.0, 2.0, 4.0]}   # or just [1.0, 2.0, 4.0]
    objectives: {fid_domain: minimize}    # metric -> direction; several make a Pareto front
    sampler: {name: tpe, seed: 0}         # tpe | nsga2 | random | grid | cmaes; always named and seeded
    pruner: {name: median, metric: val_loss}   # median | hyperband | none (one objective only)
    trials: 12                            # budget: finished (complete + pruned) trials
    heartbeat: {interval_s: 10, grace_s: 60, max_retry: 2}
    launcher: {executor: local, jobs: 2, cpus_per_job: 1}

Everything is checked before anything is written: unknown keys, bad bounds, search keys that
are no run setting, values a run would reject, metrics the jobs never write (or do not write
for this configuration), and combinations Optuna cannot do; each error is one line naming the
field.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, ValidationError, model_validator

from ..config import Closed, LauncherSpec, RunSpec, _model_at, format_validation_error
from ..grid import GridError, _resolve, parse_override, read_yaml_mapping, set_dotted
from ..registry import Registry, UnknownVariant, load_registry


class StudyError(GridError):
    """A malformed study file or option; one line naming the file, the field and the fix."""


# final metrics a run writes (see ablate.jobs / ablate.train / ablate.eval) that make sense as
# objectives; the data's own ceilings (judge_acc, *_real, tok_*) do not depend on the trial
OBJECTIVE_METRICS = (
    "fid_domain", "kid_domain", "clip_domain", "fid", "clip_score", "align_acc", "align_colour", "align_shape", "align_size",
    "align_position", "align_acc_two", "blank_rate", "fragment_rate", "val_loss", "train_loss",
    "train_tokens_per_s", "sample_images_per_s", "peak_mem_mb", "params", "backbone_params",
    "train_s", "wall_s")
# curves written at every train.eval_every (val_loss) / train.log_every (train_loss): what a
# pruner can watch; both are losses (lower is better)
INTERMEDIATE_METRICS = ("val_loss", "train_loss")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,150}$")


def _metric_problem(metric: str, spec: RunSpec) -> Optional[str]:
    """Why runs of ``spec`` would not write ``metric`` (None: they do)."""
    d, e = spec.data, spec.eval
    if metric == "fid" and not e.inception_weights:
        return "fid is computed only with eval.inception_weights (a local Inception weights file); " \
               "fid_domain needs no download"
    if metric == "clip_score" and not e.clip_model:
        return "clip_score is computed only with eval.clip_model (a local CLIP model directory)"
    judged = d.name in ("shapes", "digits")
    clip = e.clip_judge is not False
    if metric in ("fid_domain", "kid_domain") and not ((judged or clip) and e.fid_domain):
        return f"{metric} needs a judge (the attribute judge of shapes or digits, or eval.clip_judge not false) " \
               "and eval.fid_domain: true"
    if metric == "clip_domain" and not clip:
        return "clip_domain needs the domain CLIP judge: leave eval.clip_judge unset or true"
    if metric.startswith("align_") and not judged:
        return f"{metric} needs captions with known attributes (data.name shapes or digits)"
    if metric in ("align_colour", "align_shape", "align_size", "align_position", "align_acc_two") \
            and d.name != "shapes":
        return f"{metric} is written for shapes data only"
    if metric == "align_acc_two" and d.max_objects < 2:
        return "align_acc_two is written only with data.max_objects: 2"
    return None


# ------------------------------------------------------------------------------ distributions

def _is_choice(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


class FloatDist(Closed):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: Optional[float] = Field(None, gt=0, description="discretise: low, low + step, ... <= high")

    @model_validator(mode="after")
    def _bounds(self) -> "FloatDist":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got low {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna samples one or the other)")
        return self

    def probes(self) -> list[Any]:
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return [self.low, mid, self.high]

    def values(self) -> Optional[list[Any]]:
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def suggest(self, trial: Any, key: str) -> Any:
        return trial.suggest_float(key, self.low, self.high, log=self.log, step=self.step)


class IntDist(Closed):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> "IntDist":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got low {self.low})")
        if self.log and self.step != 1:
            raise ValueError("log and step cannot be combined (Optuna samples one or the other)")
        return self

    def values(self) -> list[Any]:
        return list(range(self.low, self.high + 1, self.step))

    def probes(self) -> list[Any]:
        vals = self.values()
        return vals if len(vals) <= 256 else [vals[0], vals[len(vals) // 2], vals[-1]]

    def suggest(self, trial: Any, key: str) -> Any:
        return trial.suggest_int(key, self.low, self.high, step=self.step, log=self.log)


class CategoricalDist(Closed):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _scalars(self) -> "CategoricalDist":
        bad = [c for c in self.choices if not _is_choice(c)]
        if bad:
            raise ValueError(f"choices must be numbers, strings, booleans or null (Optuna stores them "
                             f"as such); got {bad[0]!r}")
        return self

    def probes(self) -> list[Any]:
        return list(self.choices)

    def values(self) -> list[Any]:
        return list(self.choices)

    def suggest(self, trial: Any, key: str) -> Any:
        return trial.suggest_categorical(key, self.choices)


Dist = Union[FloatDist, IntDist, CategoricalDist]
_DISTS = {"float": FloatDist, "int": IntDist, "categorical": CategoricalDist}
_DIST_HINT = ("{type: float, low: 1.0e-4, high: 1.0e-2, log: true}, {type: int, low: 32, high: 128, step: 32}, "
              "{type: categorical, choices: [a, b]} or a list of choices")


def parse_dist(key: str, raw: Any, source: str) -> Dist:
    """One ``search`` entry as a distribution (a plain list is a categorical one)."""
    where = f"{source}: search.{key}"
    if isinstance(raw, list):
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, dict):
        raise StudyError(f"{where}: expected a distribution such as {_DIST_HINT}; got {raw!r}")
    cls = _DISTS.get(raw.get("type"))
    if cls is None:
        raise StudyError(f"{where}.type: must be float, int or categorical; got {raw.get('type')!r}")
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = "".join(f".{p}" for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (accepted: {', '.join(cls.model_fields)})"
        elif e["type"] == "missing":
            msg = "required"
        got = e.get("input")
        got_s = f"; got {got!r}" if e["type"] not in ("extra_forbidden", "missing", "value_error") \
            and not isinstance(got, dict) else ""
        raise StudyError(f"{where}{loc}: {msg}{got_s}") from None


# ------------------------------------------------------------------------------ the file

class SamplerSpec(Closed):
    """Optuna's sampler. Always named and seeded in the file: a study must say how it searched."""

    name: Literal["tpe", "nsga2", "random", "grid", "cmaes"]
    seed: int = Field(description="worker i of a study draws from a seed derived from this one")
    startup_trials: Optional[int] = Field(None, ge=0, description="tpe, cmaes: random trials before the model")
    population: Optional[int] = Field(None, ge=2, description="nsga2: population size (default 50)")
    multivariate: bool = Field(False, description="tpe: model the parameters jointly")


class PrunerSpec(Closed):
    """Stops unpromising trials early on a curve the training writes (a loss: lower is better).
    Optuna pruners compare in the study's direction, so for a maximised objective the loss is
    reported negated. The training writes its curves at each ``train.checkpoint_every``: that is
    when the pruner sees them (set it to ``train.eval_every`` for a verdict at every validation)."""

    name: Literal["median", "hyperband", "none"] = "none"
    metric: Literal["val_loss", "train_loss"] = Field(
        "val_loss", description="val_loss at each train.eval_every, train_loss at each train.log_every")
    startup_trials: int = Field(4, ge=0, description="median: trials that finish before any is pruned")
    warmup_steps: int = Field(0, ge=0, description="median: training steps before a trial may be pruned")
    min_resource: Optional[int] = Field(None, ge=1, description="hyperband: steps of the smallest bracket "
                                                                "(default: train.eval_every)")
    reduction_factor: int = Field(3, ge=2, description="hyperband")


class HeartbeatSpec(Closed):
    """Optuna's trial heartbeats: a trial whose worker stopped beating for ``grace_s`` is failed
    and retried (at most ``max_retry`` times) with the same parameters."""

    interval_s: int = Field(10, ge=1)
    grace_s: int = Field(60, ge=2)
    max_retry: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _grace(self) -> "HeartbeatSpec":
        if self.grace_s <= self.interval_s:
            raise ValueError(f"heartbeat.grace_s ({self.grace_s}) must exceed interval_s ({self.interval_s})")
        return self


class StudyFile(Closed):
    name: Optional[str] = None
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Any]
    objectives: dict[str, Literal["minimize", "maximize"]]
    sampler: SamplerSpec
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    trials: Optional[int] = Field(None, ge=1, description="trial budget (complete + pruned); --trials overrides")
    heartbeat: HeartbeatSpec = Field(default_factory=HeartbeatSpec)
    launcher: LauncherSpec = Field(default_factory=LauncherSpec)


def _format(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        parent = StudyFile if len(e["loc"]) == 1 else _model_at(StudyFile, e["loc"][:-1])
        accepted = f" (accepted: {', '.join(parent.model_fields)})" if parent else ""
        return f"{source}: {loc}: unknown key{accepted}"
    if e["type"] == "missing":
        hint = {"search": " (dotted keys -> distributions)", "objectives": " (metric: minimize|maximize)",
                "sampler": " (e.g. {name: tpe, seed: 0}; the sampler is always explicit)",
                "sampler.seed": " (a study is always seeded)"}.get(loc, "")
        return f"{source}: {loc}: required{hint}"
    return format_validation_error(err, source).replace("Value error, ", "")


# ------------------------------------------------------------------------------ resolved study

@dataclass
class StudyConfig:
    """A validated study: what workers need to suggest, build and score a trial (picklable)."""

    name: str
    source: str
    file: StudyFile
    base_tree: dict[str, Any]
    dists: dict[str, Dist]

    @property
    def metrics(self) -> list[str]:
        return list(self.file.objectives)

    @property
    def directions(self) -> list[str]:
        return list(self.file.objectives.values())

    @property
    def grid_name(self) -> str:
        """The pseudo-grid the study's runs are registered under (``ablate status`` lists it)."""
        return f"study:{self.name}"

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The trial's parameters, in the file's order (dotted key -> value)."""
        return {key: dist.suggest(trial, key) for key, dist in self.dists.items()}

    def spec_for(self, params: dict[str, Any], registry: Optional[Registry] = None) -> RunSpec:
        """The fully resolved RunSpec of a trial (raises :class:`GridError` on a bad combination)."""
        tree = copy.deepcopy(self.base_tree)
        for key, value in params.items():
            set_dotted(tree, key, value)
        where = f"{self.source}: trial " + ", ".join(f"{k}={v}" for k, v in params.items())
        return _resolve(tree, registry or load_registry(), where)

    def first_params(self) -> dict[str, Any]:
        return {key: dist.probes()[0] for key, dist in self.dists.items()}

    def grid_space(self) -> dict[str, list[Any]]:
        return {key: dist.values() for key, dist in self.dists.items()}


def _read_yaml(path: Path) -> dict:
    return read_yaml_mapping(path, "study file", "grids/study.yaml",
                             "base, search, objectives, sampler, ...", error=StudyError)


def _apply_overrides(sf: StudyFile, overrides: tuple[str, ...]) -> StudyFile:
    """``--set KEY=VALUE``: base keys (pinning a searched key removes it from the search) and
    ``launcher.*``."""
    sf = sf.model_copy(deep=True)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("launcher."):
            *path, field = key.split(".")[1:]
            target: BaseModel = sf.launcher
            for i, part in enumerate(path + [field]):
                if part not in type(target).model_fields:
                    raise StudyError(f"--set {text}: {'.'.join(['launcher', *path[:i]])} has no key {part!r} "
                                     f"(accepted: {', '.join(sorted(type(target).model_fields))})")
                if i < len(path):
                    target = getattr(target, part)
            try:
                setattr(target, field, value)
            except (ValidationError, ValueError) as err:
                raise StudyError(format_validation_error(err, f"--set {text}")) from None
            continue
        set_dotted(sf.base, key, value)
        sf.search.pop(key, None)
    return sf


def _check_key(key: str, variants: list[str], registry: Registry, where: str) -> None:
    """``key`` must name one setting of a RunSpec, or ``model.params.NAME`` of every variant."""
    parts = key.split(".")
    if parts[:2] == ["model", "params"]:
        if len(parts) != 3:
            raise StudyError(f"{where}: name one variant hyperparameter as model.params.NAME")
        for v in variants:
            try:
                fields = registry.get(v).Config.model_fields
            except UnknownVariant as exc:
                raise StudyError(f"{where}: {exc}") from None
            if parts[2] not in fields:
                raise StudyError(f"{where}: variant {v!r} has no hyperparameter {parts[2]!r} "
                                 f"(accepted: {', '.join(fields) or 'none'})")
        return
    if parts[0] == "launcher":
        raise StudyError(f"{where}: not a run setting: launcher.* says where runs go, not what they are; "
                         "search data, tokenizer, text, model, train, sample or eval keys")
    cur: Any = RunSpec
    for i, part in enumerate(parts):
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            raise StudyError(f"{where}: {'.'.join(parts[:i])} is a setting, not a section")
        if part not in cur.model_fields:
            at = ".".join(parts[:i])
            raise StudyError(f"{where}: not a run setting: {at + ' has' if at else 'a run has'} no key "
                             f"{part!r} (accepted: {', '.join(cur.model_fields)})")
        cur = cur.model_fields[part].annotation
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        raise StudyError(f"{where}: a section, not a setting; search one of its keys "
                         f"({', '.join(f'{key}.{k}' for k in list(cur.model_fields)[:3])}, ...)")


def validate_study(sf: StudyFile, source: str, registry: Optional[Registry] = None) -> StudyConfig:
    """Check a parsed study file against the run schema, the variants and the metrics."""
    registry = registry or load_registry()
    name = sf.name or Path(source).stem
    if not NAME_RE.match(name):
        raise StudyError(f"{source}: name: {name!r} must start with a letter or digit and use only "
                         "letters, digits, '.', '_' and '-' (it names folders and the Optuna study)")
    if not sf.search:
        raise StudyError(f"{source}: search: empty; give at least one dotted key -> distribution")
    if not sf.objectives:
        raise StudyError(f"{source}: objectives: empty; give metric: minimize|maximize, e.g. {{fid_domain: minimize}}")
    dists = {key: parse_dist(key, raw, source) for key, raw in sf.search.items()}
    try:
        base = RunSpec.model_validate(sf.base)
    except ValidationError as err:
        raise StudyError(format_validation_error(err, f"{source}: base")) from None
    variants = [str(v) for v in dists["model.variant"].values()] if "model.variant" in dists \
        else [base.model.variant]
    for key, dist in dists.items():
        where = f"{source}: search.{key}"
        if key == "model.params":
            raise StudyError(f"{where}: name one variant hyperparameter as model.params.NAME")
        _check_key(key, variants, registry, where)
        for value in dist.probes():  # every value a run would reject is an error now, not a failed trial
            for variant in variants if key.startswith("model.params.") else [None]:
                tree = copy.deepcopy(sf.base)
                if variant is not None:
                    set_dotted(tree, "model.variant", variant)
                set_dotted(tree, key, value)
                _resolve(tree, registry, f"{where}={value!r}")
    cfg = StudyConfig(name=name, source=source, file=sf, base_tree=copy.deepcopy(sf.base), dists=dists)
    first = cfg.spec_for(cfg.first_params(), registry)
    for metric in sf.objectives:
        if metric not in OBJECTIVE_METRICS:
            raise StudyError(f"{source}: objectives.{metric}: unknown metric "
                             f"(accepted: {', '.join(OBJECTIVE_METRICS)})")
        why = _metric_problem(metric, first)
        if why:
            raise StudyError(f"{source}: objectives.{metric}: {why}")
    n_obj = len(sf.objectives)
    if sf.pruner.name != "none" and n_obj > 1:
        raise StudyError(f"{source}: pruner: {sf.pruner.name} cannot prune a study with {n_obj} objectives "
                         "(Optuna prunes single-objective studies only); use pruner: {name: none}")
    p = sf.pruner
    if p.name != "hyperband" and (p.min_resource is not None or "reduction_factor" in p.model_fields_set):
        raise StudyError(f"{source}: pruner: min_resource and reduction_factor are hyperband settings, "
                         f"not {p.name}'s")
    if p.name != "median" and ({"startup_trials", "warmup_steps"} & p.model_fields_set):
        raise StudyError(f"{source}: pruner: startup_trials and warmup_steps are median settings, not {p.name}'s")
    s = sf.sampler
    if s.name == "cmaes":
        if n_obj > 1:
            raise StudyError(f"{source}: sampler: cmaes optimises one objective; use nsga2 or tpe for {n_obj}")
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise StudyError(f"{source}: sampler: cmaes needs the `cmaes` package (pip install cmaes); "
                             "or use tpe") from None
    if s.name == "grid":
        for key, dist in dists.items():
            if dist.values() is None:
                raise StudyError(f"{source}: search.{key}: sampler grid needs finite values; give the float a "
                                 "step, or list choices")
    if s.population is not None and s.name != "nsga2":
        raise StudyError(f"{source}: sampler.population: an nsga2 setting, not {s.name}'s")
    if s.startup_trials is not None and s.name not in ("tpe", "cmaes"):
        raise StudyError(f"{source}: sampler.startup_trials: a tpe/cmaes setting, not {s.name}'s")
    if s.multivariate and s.name != "tpe":
        raise StudyError(f"{source}: sampler.multivariate: a tpe setting, not {s.name}'s")
    return cfg


def load_study_file(path: Path, overrides: tuple[str, ...] = (), registry: Optional[Registry] = None) -> StudyConfig:
    """Read and validate the study file at ``path`` (raises :class:`StudyError`; writes nothing)."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        sf = StudyFile.model_validate(raw)
    except ValidationError as err:
        raise StudyError(_format(err, str(path))) from None
    return validate_study(_apply_overrides(sf, overrides), str(path), registry)
