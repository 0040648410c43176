"""Optuna studies (`ablate study`): a small study reaches its budget and shows its best trial,
re-running never exceeds the budget, a trial whose config equals a finished run reuses it, the
pruner stops a hopeless trial (run `pruned`, not `failed`), a dead worker's trial is failed and
retried, Optuna itself reads the study from our database, the trials are runs in `ablate table`,
two local worker processes share one budget, the bad-input corpus, and all of it on PostgreSQL."""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from ablate.cli import main
from ablate.config import run_key
from ablate.db import Database
from ablate.study import load_study_file, run_study, storage_for
from ablate.study.runner import open_study

BASE = """
base:
  data: {name: shapes, image_size: 16, n_train: 256, n_val: 32, n_test: 32}
  tokenizer: {codebook_size: 32, code_dim: 8, hidden: 16, downsample: 4, steps: 20, batch_size: 32}
  text: {encoder: learned, max_len: 10, width: 32}
  model: {variant: transformer, width: 32, depth: 1, heads: 2}
  train: {steps: 8, batch_size: 8, warmup_steps: 2, log_every: 2, eval_every: 2, checkpoint_every: 2, throughput_warmup: 1}
  sample: {steps: 2, batch_size: 16}
  eval: {n_images: 16, judge_steps: 20, sheet_prompts: 0}
"""
STUDY = "name: {name}\n" + BASE.replace("{", "{{").replace("}", "}}") + """search:
  train.lr: [0.002, 0.01]
  model.width: {{type: categorical, choices: [16, 32]}}
objectives: {objectives}
sampler: {sampler}
pruner: {pruner}
trials: {trials}
heartbeat: {{interval_s: 1, grace_s: 2, max_retry: 1}}
launcher: {{executor: debug, jobs: 2, cpus_per_job: 1, timeout_min: 10}}
"""
S = optuna.trial.TrialState


def write(path: Path, name: str = "s", objectives: str = "{val_loss: minimize}",
          sampler: str = "{name: random, seed: 0}", pruner: str = "{name: none}", trials: int = 4,
          search: str = "") -> Path:
    text = STUDY.format(name=name, objectives=objectives, sampler=sampler, pruner=pruner, trials=trials)
    if search:
        text = text.replace("search:\n  train.lr: [0.002, 0.01]\n", f"search:\n{search}")
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One results folder for the module: the tiny dataset, tokenizer and judge are built once."""
    return tmp_path_factory.mktemp("study_results")


def load(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


# ------------------------------------------------------------------------------ end to end

def check_small_study(tmp_path, results, url, capsys, name):
    """The whole user story on one database: run, re-run, --more, show, table, status."""
    f = write(tmp_path / "s.yaml", name=name, trials=6)
    assert main(["study", str(f), "--workers", "2", "--results", str(results), "--db", url]) == 0
    out = capsys.readouterr().out
    assert f"study {name}: 6 of 6 trials finished (6 complete, 0 pruned)" in out
    assert "best trial: #" in out and "val_loss = " in out

    study = load(url, name)  # Optuna's own API on our database
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == S.COMPLETE for t in trials)
    db = Database(url, create=False)
    try:
        links = db.study_runs(name)
        assert sorted(links) == [t.number for t in trials]
        for t in trials:  # a trial is a run: the run key is that of its resolved spec
            cfg = load_study_file(f)
            assert links[t.number][0] == t.user_attrs["run_key"] == run_key(cfg.spec_for(t.params))
            assert t.value == pytest.approx(db.final_metrics(t.user_attrs["run_key"])["val_loss"])
        keys = {k for k, _ in links.values()}
        # 2 x 2 configs for 6 trials: some trial reused a finished run instead of training again
        assert len(keys) < 6 and any(t.user_attrs["reused"] for t in trials)
        assert all(db.run(k).attempts == 1 and db.run(k).status == "done" for k in keys)
    finally:
        db.close()
    assert study.best_value == min(t.value for t in trials)

    # re-running does no work and never exceeds the budget; --more raises it
    assert main(["study", str(f), "--results", str(results), "--db", url]) == 0
    assert "budget 6 reached; nothing to run" in capsys.readouterr().out
    assert len(load(url, name).trials) == 6
    assert main(["study", str(f), "--more", "2", "--results", str(results), "--db", url]) == 0
    assert "8 of 8 trials finished" in capsys.readouterr().out
    assert len(load(url, name).trials) == 8 and load(url, name).user_attrs["budget"] == 8

    # show: best trial, importances (or why not), every trial, plots
    assert main(["study", "show", name, "--results", str(results), "--db", url]) == 0
    out = capsys.readouterr().out
    best = load(url, name).best_trial
    assert f"best trial: #{best.number}" in out and "parameter importances" in out and "trials (8):" in out
    plots = results / "plots" / f"study_{name}"
    assert (plots / "optimization_history.png").stat().st_size > 1000

    # the trials are runs: `ablate table --study`, and `ablate status` lists the study's runs
    assert main(["table", "--study", name, "--format", "csv", "--results", str(results), "--db", url]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    rows = table[table["Method"] == "transformer"]
    assert len(rows) == len(keys) and "model.width=32, train.lr=0.01" in set(rows["Hyperparameters"])
    assert main(["status", f"study:{name}", "--results", str(results), "--db", url]) == 0
    assert f"{len(keys)} done" in capsys.readouterr().out
    assert main(["table", "--study", "nope", "--results", str(results), "--db", url]) == 2
    assert "no study named 'nope'; known studies:" in capsys.readouterr().err


def test_small_study_reaches_budget_reuses_runs_and_shows_best(tmp_path, results, capsys):
    check_small_study(tmp_path, results, f"sqlite:///{tmp_path / 'a.db'}", capsys, "small")


def test_pruned_trial_is_recorded_pruned_and_not_retrained(tmp_path, results):
    """A run whose val_loss trails the finished trial's is pruned at its first report; the same
    config suggested again is pruned from its stored curve without training."""
    f = write(tmp_path / "p.yaml", name="prune", trials=3, pruner="{name: median, startup_trials: 1}",
              search="  train.lr: [0.02, 0.00001]\n")
    cfg = load_study_file(f, ("model.width=32",))
    url = f"sqlite:///{tmp_path / 'p.db'}"
    db = Database(url)
    storage = storage_for(url, cfg.file.heartbeat)
    study = open_study(cfg, storage, db)
    for lr in (0.02, 0.00001, 0.00001):  # a good trial first, then a hopeless one, twice
        study.enqueue_trial({"train.lr": lr})
    report = run_study(cfg, db, results, executor="debug", workers=1)
    assert report.ok and report.counts["COMPLETE"] == 1 and report.counts["PRUNED"] == 2
    t = load(url, "prune").trials
    assert [x.state for x in t] == [S.COMPLETE, S.PRUNED, S.PRUNED]
    assert list(t[1].intermediate_values) == [2] and t[1].intermediate_values[2] > t[0].intermediate_values[2]
    key = t[1].user_attrs["run_key"]
    assert t[2].user_attrs["run_key"] == key
    run = db.run(key)
    assert run.status == "pruned" and "pruned by the study's median pruner at step 2" in run.error
    assert run.attempts == 1, "the second suggestion of a pruned config must not train again"
    assert [s for s, _ in db.curve(key, "val_loss")] == [2] and "val_loss" not in db.final_metrics(key)
    assert db.run(t[0].user_attrs["run_key"]).status == "done"
    storage.engine.dispose()
    db.close()
    assert main(["status", "study:prune", "--results", str(results), "--db", url]) == 0


def test_dead_workers_trial_is_failed_retried_and_the_study_completes(tmp_path, results):
    """A worker died mid-trial (its Optuna heartbeat and its run's heartbeat stopped): the trial
    is failed, retried with the same params, its run resumed, and the budget still reached."""
    from datetime import datetime

    from sqlalchemy import update

    from ablate.db.models import Run

    f = write(tmp_path / "k.yaml", name="killed", trials=2)
    cfg = load_study_file(f)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    db = Database(url)
    storage = storage_for(url, cfg.file.heartbeat)
    study = open_study(cfg, storage, db)
    with pytest.warns(UserWarning, match="Heartbeat"):  # a trial outside Study.optimize: what a worker does
        dead = study.ask()
    params = cfg.suggest(dead)
    spec = cfg.spec_for(params)
    key = run_key(spec)
    db.register_trial(cfg.name, dead.number, cfg.grid_name, key, spec.model.variant, spec.seed,
                      spec.model_dump(mode="json"), params)
    assert db.claim(key, job_id="local:999999")
    with db.tx() as s:
        s.execute(update(Run).where(Run.key == key).values(heartbeat_at=datetime(2000, 1, 1)))
    storage.record_heartbeat(dead._trial_id)
    time.sleep(cfg.file.heartbeat.grace_s + 0.5)  # the worker is gone: its heartbeat goes stale

    report = run_study(cfg, db, results, executor="debug", workers=1)
    assert report.ok and report.counts == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 1, "RUNNING": 0, "WAITING": 0}
    trials = load(url, "killed").trials
    assert trials[0].state == S.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == S.COMPLETE and retry[0].params == params
    run = db.run(key)
    assert run.status == "done" and run.attempts == 2  # the dead attempt's run was taken over
    assert db.study_runs("killed")[retry[0].number][0] == key
    storage.engine.dispose()
    db.close()


def test_local_worker_killed_mid_trial(tmp_path, results):
    """Two worker processes (local executor) on SQLite; one is killed (SIGKILL) while it trains:
    its trial is failed once its heartbeat is stale, retried with the same params by a new worker
    that takes over the run, and the study ends with exactly its budget, nothing left running."""
    import os
    import signal
    import subprocess

    from jobgrid import cli, driving, local_job_running, poll_run

    f = write(tmp_path / "l.yaml", name="local2", trials=3,
              search="  train.lr: {type: float, low: 0.001, high: 0.02, log: true}\n")
    url = f"sqlite:///{tmp_path / 'l.db'}"
    cmd = cli("study", str(f), "--executor", "local", "--workers", "2", "--results", str(results), "--db", url,
              "--set", "train.steps=300", "--set", "train.checkpoint_every=50")
    with driving(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) as driver:
        key, job = poll_run(url, local_job_running)
        os.kill(int(job.split(":")[1]), signal.SIGKILL)
        out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out[-3000:]
    assert "ended without a result" in out and "3 of 3 trials finished" in out
    trials = load(url, "local2").trials
    assert [t.state for t in trials].count(S.COMPLETE) == 3 and [t.state for t in trials].count(S.FAIL) == 1
    assert not [t for t in trials if t.state in (S.RUNNING, S.WAITING)]
    dead = next(t for t in trials if t.state == S.FAIL)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == dead.number)
    assert retry.state == S.COMPLETE and retry.params == dead.params and retry.user_attrs["run_key"] == key
    db = Database(url, create=False)
    try:
        assert db.run(key).status == "done" and db.run(key).attempts == 2
    finally:
        db.close()


def test_postgresql_multi_objective_study(tmp_path, results, pg_url, capsys):
    """The same study on PostgreSQL, plus a two-objective one: a Pareto front and its plot."""
    check_small_study(tmp_path, results, pg_url, capsys, "small-pg")
    f = write(tmp_path / "m.yaml", name="pareto", trials=3, sampler="{name: nsga2, seed: 1, population: 2}",
              objectives="{val_loss: minimize, train_tokens_per_s: maximize}")
    assert main(["study", str(f), "--results", str(results), "--db", pg_url]) == 0
    capsys.readouterr()
    assert main(["study", "show", "pareto", "--results", str(results), "--db", pg_url]) == 0
    out = capsys.readouterr().out
    study = load(pg_url, "pareto")
    assert len(study.trials) == 3 and "Pareto front:" in out
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert (results / "plots" / "study_pareto" / "pareto_front.png").exists()


def test_slurm_workers_on_postgresql(tmp_path, results, slurm, pg_url):
    """K workers as one Slurm job array, sharing the study through PostgreSQL."""
    f = write(tmp_path / "w.yaml", name="slurm", trials=3,
              search="  train.lr: {type: float, low: 0.001, high: 0.02, log: true}\n")
    sets = [f"launcher.slurm.partition={slurm}", "launcher.slurm.gpus_per_job=0", "launcher.slurm.cpus_per_job=1",
            "launcher.slurm.mem_gb=2", "launcher.slurm.time_min=20"]
    assert main(["study", str(f), "--executor", "slurm", "--workers", "2", "--results", str(results),
                 "--db", pg_url, *[a for s in sets for a in ("--set", s)]]) == 0
    trials = load(pg_url, "slurm").trials
    assert len(trials) == 3 and all(t.state == S.COMPLETE for t in trials)
    assert all(t.user_attrs["job_id"].startswith("slurm:") for t in trials)


# ------------------------------------------------------------------------------ bad input

GOOD = STUDY.format(name="bad", objectives="{val_loss: minimize}", sampler="{name: tpe, seed: 0}",
                    pruner="{name: none}", trials=2)
LR, TPE, OBJ = "train.lr: [0.002, 0.01]", "{name: tpe, seed: 0}", "{val_loss: minimize}"


def edit(*pairs: str) -> str:
    """GOOD with (old, new) replacements."""
    text = GOOD
    for old, new in zip(pairs[::2], pairs[1::2]):
        assert old in text
        text = text.replace(old, new)
    return text


BAD = [
    ("unknown key", GOOD + "serch: {}\n", "serch: unknown key (accepted: name, description, base"),
    ("unknown sampler key", edit(TPE, "{name: tpe, seed: 0, foo: 1}"), "sampler.foo: unknown key"),
    ("unknown sampler", edit(TPE, "{name: bayes, seed: 0}"), "sampler.name: must be"),
    ("unseeded sampler", edit(TPE, "{name: tpe}"), "sampler.seed: required"),
    ("low >= high", edit(LR, "train.lr: {type: float, low: 0.01, high: 0.001}"),
     "search.train.lr: low (0.01) must be below high (0.001)"),
    ("log with low <= 0", edit(LR, "train.lr: {type: float, low: 0, high: 0.01, log: true}"),
     "search.train.lr: log: true needs low > 0"),
    ("int bounds", edit(LR, "train.steps: {type: int, low: 8, high: 8}"),
     "search.train.steps: low (8) must be below high (8)"),
    ("unknown distribution", edit(LR, "train.lr: {type: uniform, low: 0, high: 1}"),
     "search.train.lr.type: must be float, int or categorical"),
    ("unknown search key", edit(LR, "train.lrr: [0.002, 0.01]"),
     "search.train.lrr: not a run setting: train has no key 'lrr'"),
    ("search key is a section", edit(LR, "train: [1, 2]"), "search.train: a section"),
    ("unknown variant param", edit(LR, "model.params.nope: [1, 2]"),
     "search.model.params.nope: variant 'transformer' has no hyperparameter 'nope'"),
    ("value a run rejects", edit(LR, "train.lr: {type: float, low: -1, high: 0.01}"),
     "search.train.lr=-1.0: train.lr: Input should be greater than 0"),
    ("launcher key", edit(LR, "launcher.jobs: [1, 2]"), "search.launcher.jobs: not a run setting"),
    ("unknown metric", edit(OBJ, "{fid_domian: minimize}"), "objectives.fid_domian: unknown metric (accepted: fid_domain"),
    ("metric not written", edit(OBJ, "{fid: minimize}"), "objectives.fid: fid is computed only with eval.inception_weights"),
    ("bad direction", edit(OBJ, "{val_loss: lower}"), "objectives.val_loss: must be 'minimize' or 'maximize'"),
    ("pruner with two objectives", edit(OBJ, "{val_loss: minimize, align_acc: maximize}", "pruner: {name: none}",
                                        "pruner: {name: median}"), "pruner: median cannot prune a study with 2 objectives"),
    ("grid sampler, continuous", edit(TPE, "{name: grid, seed: 0}", LR, "train.lr: {type: float, low: 0.001, high: 0.01}"),
     "sampler grid needs finite values"),
    ("empty choices", edit(LR, "train.lr: []"), "search.train.lr.choices"),
    ("base error", edit("steps: 8,", "steps: lots,"), "base: train.steps"),
    ("bad name", edit("name: bad", "name: 'a b'"), "name: 'a b' must start with"),
    ("yaml", "search: [1, 2\n", "YAML syntax error"),
]


@pytest.mark.parametrize("name, text, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_study_exits_2_and_writes_nothing(tmp_path, capsys, name, text, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    results = tmp_path / "results"
    results.mkdir()
    existing = results / "ablate.db"
    Database(f"sqlite:///{existing}").close()
    before = digest(existing)
    assert main(["study", str(f), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert digest(existing) == before


@pytest.mark.parametrize("sampler, pruner, classes", [
    ("{name: tpe, seed: 3, startup_trials: 2, multivariate: true}",
     "{name: median, startup_trials: 2, warmup_steps: 4}", ("TPESampler", "MedianPruner")),
    ("{name: random, seed: 3}", "{name: hyperband, min_resource: 2, reduction_factor: 2}",
     ("RandomSampler", "HyperbandPruner")),
    ("{name: grid, seed: 3}", "{name: none}", ("GridSampler", "NopPruner")),
    ("{name: nsga2, seed: 3, population: 4}", "{name: median}", ("NSGAIISampler", "MedianPruner")),
])
def test_every_sampler_and_pruner_builds(tmp_path, sampler, pruner, classes):
    from ablate.study.runner import make_pruner, make_sampler, worker_seed

    cfg = load_study_file(write(tmp_path / "s.yaml", sampler=sampler, pruner=pruner))
    assert (type(make_sampler(cfg, 3)).__name__, type(make_pruner(cfg)).__name__) == classes
    assert cfg.grid_space() == {"train.lr": [0.002, 0.01], "model.width": [16, 32]}
    # the first worker of a fresh study uses the file's seed; others never replay its draws
    assert worker_seed(3, 0, 0) == 3 and len({worker_seed(3, i, n) for i in range(3) for n in (0, 5)}) == 6
    pinned = load_study_file(tmp_path / "s.yaml", ("train.lr=0.005", "launcher.jobs=3"))
    assert list(pinned.dists) == ["model.width"] and pinned.spec_for({"model.width": 16}).train.lr == 0.005
    assert pinned.file.launcher.jobs == 3


def test_cmaes_needs_its_package_or_one_objective(tmp_path, capsys):
    f = write(tmp_path / "c.yaml", sampler="{name: cmaes, seed: 0}",
              objectives="{val_loss: minimize, align_acc: maximize}")
    assert main(["study", str(f), "--results", str(tmp_path / "r")]) == 2
    assert "sampler: cmaes optimises one objective" in capsys.readouterr().err
    try:
        import cmaes  # noqa: F401
    except ImportError:
        write(f, sampler="{name: cmaes, seed: 0}")
        assert main(["study", str(f), "--results", str(tmp_path / "r")]) == 2
        assert "cmaes needs the `cmaes` package" in capsys.readouterr().err


def test_bad_options_exit_2(tmp_path, capsys):
    f = tmp_path / "g.yaml"
    f.write_text(GOOD)
    results = tmp_path / "r"
    assert main(["study", str(f), "--executor", "slurm", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "--db: Slurm workers" in err and "SQLite cannot be shared" in err and len(err.strip().splitlines()) == 1
    assert not (results / "ablate.db").exists()
    f.write_text(GOOD.replace("trials: 2\n", ""))
    assert main(["study", str(f), "--results", str(results)]) == 2
    assert "trials: no budget" in capsys.readouterr().err
    assert main(["study", str(f), "--trials", "0", "--results", str(results)]) == 2
    assert "--trials: must be at least 1" in capsys.readouterr().err
    Database(f"sqlite:///{tmp_path / 'e.db'}").close()
    assert main(["study", "show", "nope", "--db", f"sqlite:///{tmp_path / 'e.db'}", "--results", str(results)]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err
