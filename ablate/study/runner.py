"""Optuna studies on the results database: storage, the trial objective, workers, the driver.

The driver creates the study (Optuna's RDB storage on the project's database URL) before any
worker starts, builds the shared caches, then submits K workers through the grid executors
(a local slot pool, a Slurm array, or in-process for tests). Each worker loads the study and
optimises until the budget is reached. A trial is a run: its resolved RunSpec gets the normal
run key, the run is linked to (study, trial number), and a run that is already ``done`` gives
its metrics without training again.

Budget: finished trials (complete + pruned). "Is there room? then create the next trial" is one
step under a lock (a file lock next to a SQLite database, an advisory lock on PostgreSQL), so
K workers never start more trials than the budget leaves. Trials send Optuna heartbeats; a trial
whose worker died is failed once its heartbeat is ``grace_s`` old and retried with the same
parameters (its run resumes from its checkpoint), and the driver waits for that before it ends,
so no trial is left running.
"""
from __future__ import annotations

import fcntl
import inspect
import math
import io
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from ..config import ConfigError, content_hash, run_key
from ..db import Database
from .config import StudyConfig, StudyError

MAX_CONSECUTIVE_FAILURES = 3  # a worker whose trials keep failing stops (the driver reports why)
SQLITE_TIMEOUT_S = 60


def _optuna():
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage_for(url: str, heartbeat: Any = None):
    """Optuna's RDB storage on ``url``, with heartbeats and retry of stale trials when
    ``heartbeat`` (a :class:`HeartbeatSpec`) is given. On SQLite its connections get the same
    settings as the harness's (WAL, a busy timeout, write transactions begin IMMEDIATE), so
    workers, heartbeats and jobs wait for each other instead of failing with "database is locked"."""
    optuna = _optuna()
    from sqlalchemy.engine import make_url

    from ..db.engine import _sqlite_pragmas

    kw: dict[str, Any] = {}
    if heartbeat is not None:
        # renamed in Optuna 4.9 (the old name warns); same behaviour: re-enqueue with the same params
        cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
            optuna.storages.RetryFailedTrialCallback
        retry = cls(max_retry=heartbeat.max_retry)
        params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params \
            else "failed_trial_callback"  # Optuna < 4.6
        kw.update(heartbeat_interval=heartbeat.interval_s, grace_period=heartbeat.grace_s, **{name: retry})
    sqlite = make_url(url).get_backend_name() == "sqlite"
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else {"pool_pre_ping": True}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kw)
    if sqlite:
        _sqlite_pragmas(storage.engine)
        storage.engine.dispose()  # connections made while Optuna set up its tables lack the settings
    return storage


def worker_seed(seed: int, index: int, salt: int) -> int:
    """The sampler seed of worker ``index``: the file's seed for the first worker of a fresh
    study (one worker reproduces a study exactly), else a seed derived from it, so workers (and
    later rounds) never replay each other's random draws."""
    if index == 0 and salt == 0:
        return seed
    return int(content_hash(["ablate-study-worker", seed, index, salt], 8), 16)


def make_sampler(cfg: StudyConfig, seed: int):
    optuna = _optuna()
    s = cfg.file.sampler
    if s.name == "tpe":
        kw: dict[str, Any] = {"seed": seed, "multivariate": s.multivariate}
        if s.startup_trials is not None:
            kw["n_startup_trials"] = s.startup_trials
        return optuna.samplers.TPESampler(**kw)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population or 50)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "grid":
        return optuna.samplers.GridSampler(cfg.grid_space(), seed=seed)
    kw = {"seed": seed}
    if s.startup_trials is not None:
        kw["n_startup_trials"] = s.startup_trials
    return optuna.samplers.CmaEsSampler(**kw)


def make_pruner(cfg: StudyConfig):
    optuna = _optuna()
    p = cfg.file.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.name == "hyperband":
        first = cfg.spec_for(cfg.first_params())
        max_resource: Any = "auto" if "train.steps" in cfg.dists else first.train.steps
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource or first.train.eval_every,
                                              max_resource=max_resource, reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


class BudgetGate:
    """A lock shared by a study's workers around "is there room? then create a trial"."""

    def __init__(self, url: str, study: str):
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url
        from sqlalchemy.pool import NullPool

        u = make_url(url)
        self.kind, self.held = u.get_backend_name(), False
        self._file = self._conn = self._engine = None
        if self.kind == "sqlite":
            path = Path(u.database).resolve()
            self._file = open(path.with_name(f"{path.name}.study-{study}.lock"), "a+")
        elif self.kind == "postgresql":
            self._engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
            self._conn = self._engine.connect()
            self._key = int(content_hash(["ablate-study", study], 15), 16)
        # other backends: no lock; concurrent workers may then overshoot the budget by a trial

    def acquire(self) -> None:
        from sqlalchemy import text

        if self.held:
            return
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_EX)
        elif self._conn is not None:
            self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        self.held = True

    def release(self) -> None:
        from sqlalchemy import text

        if not self.held:
            return
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        elif self._conn is not None:
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
        self.held = False

    def close(self) -> None:
        self.release()
        if self._file is not None:
            self._file.close()
        if self._conn is not None:
            self._conn.close()
            self._engine.dispose()


def counts(study: Any) -> dict[str, int]:
    """Trials per state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    out = {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def has_room(study: Any, budget: int) -> bool:
    """Whether another trial fits: finished + running < budget (dead trials failed first)."""
    optuna = _optuna()
    S = optuna.trial.TrialState
    optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING))) < budget


class TrialFailed(Exception):
    """A trial's run failed or cannot be built; recorded on the trial (FAIL), the worker goes on."""


class _Reporter:
    """Feeds a pruning study the run's curve (``pruner.metric``) and stops a hopeless run."""

    def __init__(self, trial: Any, cfg: StudyConfig, steps: int):
        p = cfg.file.pruner
        self.trial, self.metric, self.steps, self.pruner = trial, p.metric, steps, p.name
        self.enabled = p.name != "none" and len(cfg.metrics) == 1
        # pruners compare in the study's direction; the curve is a loss (lower is better)
        self.sign = 1.0 if cfg.directions[0] == "minimize" else -1.0
        self.seen: set[int] = set()

    def report(self, rows: list) -> Optional[tuple[int, float]]:
        last = None
        for name, step, value in rows:
            if name == self.metric and step is not None and step not in self.seen and math.isfinite(value):
                self.trial.report(self.sign * value, step)
                self.seen.add(step)
                last = (step, value)
        return last

    def hook(self, rows: list) -> None:
        """``run_job``'s ``on_metrics``: report, and raise :class:`~ablate.jobs.Pruned` when told."""
        from ..jobs import Pruned

        last = self.report(rows)
        if last is not None and last[0] < self.steps and self.trial.should_prune():
            raise Pruned(last[0], f"pruned by the study's {self.pruner} pruner at step {last[0]} "
                                  f"({self.metric} {last[1]:.4g})")

    def replay(self, db: Database, key: str) -> None:
        if self.enabled:
            self.report([(self.metric, s, v) for s, v in db.curve(key, self.metric)])


# final metrics copied onto each trial (user attrs: visible in optuna-dashboard)
SHOWN_METRICS = ("fid_domain", "align_acc", "blank_rate", "val_loss", "train_tokens_per_s", "wall_s")


class Objective:
    """The trial objective: suggest -> resolved RunSpec -> run (trained, resumed or reused) -> metrics."""

    def __init__(self, cfg: StudyConfig, db: Database, results_dir: str, threads: int,
                 lost_after_s: float, poll_s: float = 2.0):
        from ..registry import load_registry

        self.cfg, self.db, self.results_dir, self.threads = cfg, db, results_dir, threads
        self.lost_after_s, self.poll_s = lost_after_s, poll_s
        self.registry = load_registry()

    def __call__(self, trial: Any) -> Any:
        try:
            return self._run(trial)
        except TrialFailed as exc:  # Optuna keeps no reason for a failed trial: the dashboard shows this
            trial.set_user_attr("fail_reason", str(exc)[:2000])
            raise

    def _run(self, trial: Any) -> Any:
        optuna = _optuna()
        from ..jobs import run_job
        from ..launch import job_id_here

        # a retried trial (its worker died) starts with the dead trial's user attrs: its job id
        dead_job = trial.user_attrs.get("job_id")
        trial.set_user_attr("job_id", job_id_here())
        params = self.cfg.suggest(trial)
        try:
            spec = self.cfg.spec_for(params, self.registry)
        except ConfigError as exc:
            raise TrialFailed(str(exc)) from None
        key = run_key(spec)
        trial.set_user_attr("run_key", key)
        status = self.db.register_trial(self.cfg.name, trial.number, self.cfg.grid_name, key, spec.model.variant,
                                        spec.seed, spec.model_dump(mode="json"), params)
        reporter = _Reporter(trial, self.cfg, spec.train.steps)
        trained = False
        for _ in range(1000):
            if status == "done":
                reporter.replay(self.db, key)
                trial.set_user_attr("reused", not trained)
                return self._values(trial, key)
            if status == "running":  # the same config in another worker (or a dead one): wait
                status = self._wait(key, dead_job)
                continue
            if status == "pruned":  # pruned before at these parameters: ask the pruner again
                reporter.replay(self.db, key)
                if reporter.enabled and trial.should_prune():
                    raise optuna.TrialPruned(f"run {key} was pruned before at these parameters")
            res = run_job(key, self.db.url, self.results_dir, self.threads,
                          on_metrics=reporter.hook if reporter.enabled else None)
            st = res.get("status")
            if st == "pruned":
                raise optuna.TrialPruned(res.get("error", "pruned"))
            if st == "done" and not res.get("skipped"):
                trained = True
            if st in ("done", "running"):
                status = st
                continue
            error = str(res.get("error", "")).strip().splitlines()
            raise TrialFailed(f"run {key} {st}: {error[-1] if error else 'no reason recorded'}")
        raise TrialFailed(f"run {key}: gave up waiting for it")

    def _wait(self, key: str, dead_job: Optional[str]) -> str:
        """Wait until the run is no longer ``running``; its status then. The run of a retried
        trial, still ``running`` under the dead trial's job, is lost at once: Optuna's heartbeat
        already showed that job dead (after ``heartbeat.grace_s``, not ``launcher.lost_after_s``)."""
        while True:
            run = self.db.run(key)
            if run.status == "running" and dead_job is not None and run.job_id == dead_job:
                if self.db.set_status(key, "lost", f"its study worker ({dead_job}) died: the trial's heartbeat "
                                      "stopped", only_from=("running",), job_id=dead_job):
                    return "lost"
            self.db.mark_lost(self.lost_after_s)  # a dead job's run becomes lost, then ours to resume
            status = self.db.statuses([key]).get(key, "pending")
            if status != "running":
                return status
            time.sleep(self.poll_s)

    def _values(self, trial: Any, key: str) -> Any:
        final = self.db.final_metrics(key)
        trial.set_user_attr("metrics", {m: final[m] for m in (*self.cfg.metrics, *SHOWN_METRICS) if m in final})
        values = []
        for m in self.cfg.metrics:
            v = final.get(m)
            if v is None or not math.isfinite(v):
                raise TrialFailed(f"run {key} wrote no finite final {m} (it has: {', '.join(sorted(final))})")
            values.append(v)
        return values[0] if len(values) == 1 else values


def run_worker(cfg: StudyConfig, db_url: Optional[str], results_dir: str, threads: int, budget: int, index: int,
               salt: int = 0) -> dict[str, Any]:
    """One worker: load the study, optimise until the budget is reached. Never raises (the
    debug executor would open a debugger): returns ``{"status", "trials", ...}``. ``db_url``
    None: from ``$ABLATE_DB_URL`` (how submitted workers get it: never in their job files)."""
    import torch

    from ..jobs import job_db_url

    torch.set_num_threads(max(1, threads))
    db = gate = storage = None
    states: list[str] = []
    try:
        db_url = job_db_url(db_url)
        optuna = _optuna()
        S = optuna.trial.TrialState
        db = Database(db_url, create=False)
        storage = storage_for(db_url, cfg.file.heartbeat)
        seed = worker_seed(cfg.file.sampler.seed, index, salt)
        study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=make_sampler(cfg, seed),
                                  pruner=make_pruner(cfg))
        objective = Objective(cfg, db, results_dir, threads, cfg.file.launcher.lost_after_s)
        gate = BudgetGate(db_url, cfg.name)
        failures = [0]

        def gated(trial: Any) -> Any:
            gate.release()  # the trial exists: other workers may now count it and go on
            return objective(trial)

        def after(study: Any, frozen: Any) -> None:
            states.append(frozen.state.name)
            failures[0] = failures[0] + 1 if frozen.state == S.FAIL else 0
            if failures[0] >= MAX_CONSECUTIVE_FAILURES:
                study.stop()
                return
            gate.acquire()
            if not has_room(study, budget):
                gate.release()
                study.stop()

        gate.acquire()
        if has_room(study, budget):
            study.optimize(gated, catch=(TrialFailed,), gc_after_trial=True,
                           callbacks=[optuna.study.MaxTrialsCallback(budget, states=(S.COMPLETE, S.PRUNED)), after])
        status = "failed" if failures[0] >= MAX_CONSECUTIVE_FAILURES else "done"
        return {"status": status, "worker": index, "trials": len(states), "states": states,
                **({"error": f"{failures[0]} trials in a row failed"} if status == "failed" else {})}
    except Exception as exc:
        return {"status": "failed", "worker": index, "trials": len(states), "states": states,
                "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        if gate is not None:
            gate.close()
        if storage is not None:
            storage.engine.dispose()
        if db is not None:
            db.close()


class StudyWorker:
    """The submitted callable: :func:`run_worker`, checkpointable for submitit (a requeued worker
    loads the study again; its interrupted trial is failed by its stale heartbeat and retried)."""

    def __call__(self, *args: Any) -> dict[str, Any]:
        return run_worker(*args)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


# ------------------------------------------------------------------------------ the driver

@dataclass
class StudyReport:
    name: str
    budget: int
    counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.counts.get("COMPLETE", 0) + self.counts.get("PRUNED", 0)

    @property
    def ok(self) -> bool:
        return self.finished >= self.budget


def open_study(cfg: StudyConfig, storage: Any, db: Database) -> Any:
    """Create the study (or load it; its objectives must match the file's)."""
    optuna = _optuna()
    existed = cfg.name in optuna.get_all_study_names(storage)
    study = optuna.create_study(study_name=cfg.name, storage=storage, directions=cfg.directions,
                                load_if_exists=True, sampler=make_sampler(cfg, cfg.file.sampler.seed),
                                pruner=make_pruner(cfg))
    if existed:
        dirs = [d.name.lower() for d in study.directions]
        metrics = study.user_attrs.get("objectives", cfg.metrics)
        if dirs != cfg.directions or metrics != cfg.metrics:
            have = ", ".join(f"{m}: {d}" for m, d in zip(metrics, dirs))
            raise StudyError(f"{cfg.source}: objectives: study {cfg.name!r} already exists in this database "
                             f"with objectives {{{have}}}; keep them, or give this study another name")
    else:
        db.forget_study(cfg.name)  # links left by an earlier study of this name, deleted since
        study.set_user_attr("objectives", cfg.metrics)
        if hasattr(study, "set_metric_names"):  # optuna-dashboard labels the objectives with them
            study.set_metric_names(cfg.metrics)
    s, p = cfg.file.sampler, cfg.file.pruner
    study.set_user_attr("sampler", f"{s.name} (seed {s.seed})")
    study.set_user_attr("pruner", "none" if p.name == "none" else f"{p.name} on {p.metric}")
    study.set_user_attr("source", cfg.source)
    return study


def _trial_line(t: Any, metrics: list[str]) -> str:
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    key = str(t.user_attrs.get("run_key", ""))[:12]
    if t.state.name == "COMPLETE":
        vals = ", ".join(f"{m}={_fmt(v)}" for m, v in zip(metrics, t.values))
        what = f"{vals}{' (reused)' if t.user_attrs.get('reused') else ''}"
    elif t.state.name == "PRUNED":
        what = f"at step {t.last_step}" if t.last_step is not None else ""
    else:
        reason = str(t.user_attrs.get("fail_reason", "")).strip().splitlines()
        what = reason[-1][:200] if reason else ""
    return f"trial {t.number} {t.state.name} {what} | {params}" + (f" | run {key}" if key else "")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _settle(study: Any, grace_s: int, poll_s: float, out: TextIO) -> None:
    """Wait until no trial is RUNNING: each ends, or its heartbeat goes stale and it is failed
    (and retried by the next round)."""
    optuna = _optuna()
    said = False
    while True:
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:
            return
        if not said:
            out.write(f"waiting for {len(running)} running trial(s) to finish, or to be failed once their "
                      f"heartbeat is {grace_s}s old\n")
            out.flush()
            said = True
        time.sleep(poll_s)


def run_study(cfg: StudyConfig, db: Database, results_dir: Path, executor: Optional[str] = None,
              workers: Optional[int] = None, trials: Optional[int] = None, more: Optional[int] = None,
              out: Optional[TextIO] = None) -> StudyReport:
    """Create or continue the study and run workers until ``budget`` trials have finished."""
    from ..prep_jobs import encode_tasks, run_preparation
    from .. import launch

    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the driver prints its own line per trial
    out = out or sys.stdout
    results_dir = Path(results_dir).resolve()  # jobs may start in another directory (Slurm)
    t0 = time.time()
    kind = launch.resolve(executor or cfg.file.launcher.executor)
    hb = cfg.file.heartbeat
    storage = storage_for(db.url, hb)
    try:
        study = open_study(cfg, storage, db)
        stored = study.user_attrs.get("budget")
        budget = trials if trials is not None else max(cfg.file.trials or 0, stored or 0)
        budget += more or 0
        if budget < 1:
            raise StudyError(f"{cfg.source}: trials: no budget; give `trials: N` in the file or --trials N")
        study.set_user_attr("budget", budget)
        optuna.storages.fail_stale_trials(study)
        report = StudyReport(cfg.name, budget, counts(study))
        if report.finished >= budget:
            out.write(f"study {cfg.name}: {report.finished} trials finished, budget {budget} reached; nothing to run "
                      "(--more N adds trials)\n")
            report.wall_s = time.time() - t0
            return report
        launcher = cfg.file.launcher
        k = workers or launcher.jobs
        cpus = launch.KINDS[kind].cpus(launcher)
        runner = launch.executor(kind, Path(results_dir) / "submitit" / f"study_{cfg.name}", launcher, k)
        out.write(f"study {cfg.name}: {report.finished} of {budget} trials finished; "
                  f"{k} worker(s) on executor '{kind}'\n")
        out.flush()

        # 1. the caches every trial shares (dataset, tokenizer, judge), built once before the workers
        shared = not any(key.split(".")[0] in ("data", "tokenizer") or key.startswith("eval.judge")
                         for key in cfg.dists)
        if shared:
            quiet = io.StringIO()  # the driver prints its own lines; failures are reported below
            why = run_preparation(runner, [cfg.spec_for(cfg.first_params())], Path(results_dir), cpus,
                                  encode_tasks(kind, runner.slots, launcher.prepare_tasks), quiet)
            failed = [f"preparation failed: {w}" for w in why.values()]
            if failed:
                report.errors += failed
                out.write("\n".join(failed) + "\n")
                report.wall_s = time.time() - t0
                return report

        # 2. rounds of K workers; another round only if the last one finished trials or left retries
        seen: dict[int, str] = {t.number: t.state.name for t in study.get_trials(deepcopy=False)
                                if t.state.is_finished()}
        stalls = 0
        while True:
            before = counts(study)
            salt = sum(before.values())
            tasks = [(f"worker{i}", StudyWorker(), (cfg, None, str(results_dir), cpus, budget, i, salt))
                     for i in range(k)]

            def worker_done(name: str, res: Any, secs: float, _running: int) -> None:
                if isinstance(res, Exception):  # the worker process died: its trial goes stale
                    msg = str(res).strip().splitlines()[0] if str(res).strip() else type(res).__name__
                    report.errors.append(f"{name} ended without a result: {msg}")
                elif res.get("status") != "done":
                    report.errors.append(f"{name} stopped: {res.get('error')}")
                else:
                    return
                out.write(report.errors[-1] + "\n")
                out.flush()

            with launch.job_env(db.url):  # workers read the URL from their environment, not their job files
                if kind == "debug":  # in this process (and thread): no progress thread
                    runner.run(tasks, worker_done)
                else:
                    th = threading.Thread(target=runner.run, args=(tasks, worker_done), daemon=True)
                    th.start()
                    while th.is_alive():
                        th.join(timeout=3.0)
                        _print_new(study, seen, cfg, out)
            _settle(study, hb.grace_s, min(2.0, hb.interval_s), out)
            _print_new(study, seen, cfg, out)
            now = counts(study)
            done_now = now["COMPLETE"] + now["PRUNED"]
            if done_now >= budget:
                break
            if done_now > before["COMPLETE"] + before["PRUNED"]:
                stalls = 0
                continue
            stalls += 1
            if not now["WAITING"] or stalls > hb.max_retry:
                break
        report.counts = counts(study)
        report.wall_s = time.time() - t0
        c = report.counts
        out.write(f"study {cfg.name}: {report.finished} of {budget} trials finished ({c['COMPLETE']} complete, "
                  f"{c['PRUNED']} pruned), {c['FAIL']} failed, in {report.wall_s:.0f}s\n")
        return report
    finally:
        storage.engine.dispose()


def _print_new(study: Any, seen: dict[int, str], cfg: StudyConfig, out: TextIO) -> None:
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and seen.get(t.number) != t.state.name:
            seen[t.number] = t.state.name
            out.write(_trial_line(t, cfg.metrics) + "\n")
    out.flush()
