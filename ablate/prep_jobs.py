"""The preparation stage of a grid, as jobs: the first stage of ``ablate run`` and all of
``ablate prepare``.

One job per distinct preparation and part (tokenizer, judge), in parallel, and where Mamba cells
run on the CPU one job that compiles their numba kernels into numba's cache
(:mod:`ablate.kernels`: otherwise every cell that starts before the cache exists compiles them
itself); then, for streaming
datasets, the token store: its shards dealt to ``launcher.prepare_tasks`` encode tasks (a job
array on Slurm). Every piece is cached atomically, so a re-run (or a requeued job) redoes only
what is unfinished: a killed encode task loses only the shard it was writing.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from .config import ConfigError, RunSpec
from .prepare import PREP_PARTS, cache_keys, prep_key

__all__ = ["prepare_job", "encode_job", "kernels_job", "run_preparation", "plan", "SLURM_ENCODE_TASKS"]

SLURM_ENCODE_TASKS = 16  # launcher.prepare_tasks = 0 on Slurm: this many array tasks at most


def _body(fn: Callable[..., dict[str, Any]], spec_json: dict, results_dir: str, threads: int,
          *args: Any) -> dict[str, Any]:
    """Run a preparation body; never raises (DebugExecutor would open pdb)."""
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        return {"status": "done", **fn(RunSpec.model_validate(spec_json), Path(results_dir), *args)}
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}


def _part(spec: RunSpec, results_dir: Path, part: str) -> dict[str, Any]:
    from .prepare import prepare
    from .utils import pick_device

    prep = prepare(spec, results_dir, pick_device(spec.train.device), parts=(part,))
    return {"metrics": prep.metrics}


def _encode(spec: RunSpec, results_dir: Path, task: int, n_tasks: int) -> dict[str, Any]:
    from .data.encode import encode_store
    from .prepare import load_tokenizer, open_splits
    from .utils import pick_device

    splits = open_splits(spec.data, results_dir)
    vq, _, tok_key = load_tokenizer(spec, splits, results_dir, pick_device(spec.train.device))
    encode_store(splits, vq, tok_key, results_dir, task, n_tasks)
    return {}


def _kernels(spec: RunSpec, results_dir: Path, others: list[dict]) -> dict[str, Any]:
    from .kernels import warm_kernels

    return {"metrics": warm_kernels([spec, *(RunSpec.model_validate(o) for o in others)])}


class _Checkpointable:
    """A submitted preparation callable: a preemption or time-limit signal requeues it at once
    (submitit's handler) and the requeued job redoes the unfinished work; every cache it writes
    is atomic, so a job cut short leaves nothing half-written."""

    def __init__(self, fn: Callable[..., dict[str, Any]]):
        self.fn = fn

    def __call__(self, spec_json: dict, results_dir: str, threads: int, *args: Any) -> dict[str, Any]:
        return _body(self.fn, spec_json, results_dir, threads, *args)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


prepare_job = _Checkpointable(_part)
encode_job = _Checkpointable(_encode)
kernels_job = _Checkpointable(_kernels)


def plan(specs: list[RunSpec]) -> dict[str, tuple[RunSpec, dict[str, int]]]:
    """``{prep_key: (a spec, {split: shards})}`` of the distinct preparations ``specs`` need;
    shard counts only for streaming data. Checks every local shard and model path exists
    (ConfigError naming the field) without decoding anything."""
    from .data.encode import StreamedSplits
    from .data.sources import STREAMING
    from .eval.clip_judge import MIN_PAIRS
    from .eval.standard import check_eval_spec
    from .tokenizer.pretrained import check_pretrained

    out: dict[str, tuple[RunSpec, dict[str, int]]] = {}
    for spec in specs:
        if spec.tokenizer.kind == "diffusers":
            check_pretrained(spec.tokenizer.path, spec.data.image_size)
        check_eval_spec(spec.eval)
        if spec.eval.clip_judge and spec.data.name not in STREAMING and spec.data.n_train < MIN_PAIRS:
            raise ConfigError(f"eval.clip_judge: true needs at least {MIN_PAIRS} training pairs, data.n_train is "
                              f"{spec.data.n_train} (raise data.n_train, or set eval.clip_judge: false)")
        key = prep_key(spec)  # validates data paths, shard lists and the tokenizer path
        if key in out:
            continue
        shards = {}
        if spec.data.name in STREAMING:
            splits = StreamedSplits(spec.data)
            shards = {s: len(v) for s, v in splits.shards.items()}
        out[key] = (spec, shards)
    return out


def run_preparation(runner: Any, specs: list[RunSpec], results_dir: Path, cpus: int, n_tasks: int,
                    out: TextIO) -> dict[str, str]:
    """Prepare everything ``specs`` need; ``{prep_key: why}`` for the preparations that failed."""
    todo = plan(specs)
    failed: dict[str, str] = {}

    def done(name: str, res: Any, secs: float, _running: int) -> None:
        if isinstance(res, Exception) or res.get("status") != "done":
            why = str(res) if isinstance(res, Exception) else res["error"]
            if name == KERNELS:  # an optimisation only: no cell depends on it
                out.write(f"preparation {name} failed (each cell compiles its own kernels): {why}\n")
                return
            failed.setdefault(name.split("/")[0], why)
            out.write(f"preparation {name} failed: {why}\n")
        else:
            out.write(f"preparation {name} ready in {secs:.0f}s\n")

    jobs = [(f"{k}/{part}", prepare_job, (spec.model_dump(mode="json"), str(results_dir), cpus, part))
             for k, (spec, _) in todo.items() for part in parts_needed(spec)]
    warm = kernel_specs(specs)
    if warm:  # last: the slots take the longer tokenizer and judge jobs first
        jobs.append((KERNELS, kernels_job, (warm[0].model_dump(mode="json"), str(results_dir), cpus,
                                            [s.model_dump(mode="json") for s in warm[1:]])))
    out.write(f"preparing {len(todo)} dataset setting(s): {len(jobs)} job(s)\n")
    if jobs:
        runner.run(jobs, done)
    encodes = []
    for k, (spec, shards) in todo.items():
        if not shards or k in failed:
            continue
        total = sum(shards.values()) - _finished_shards(spec, results_dir)
        if not total:
            continue
        n = max(1, min(total, n_tasks))
        out.write(f"encoding {total} shard(s) of {spec.data.name} into the token store as {n} task(s)\n")
        encodes += [(f"{k}/encode-{i}", encode_job, (spec.model_dump(mode="json"), str(results_dir), cpus, i, n))
                    for i in range(n)]
    if encodes:
        runner.run(encodes, done)
    return failed


KERNELS = "kernels"  # the job name of the kernel compilation


def kernel_specs(specs: list[RunSpec]) -> list[RunSpec]:
    """One spec per distinct Mamba model configuration that runs on the CPU where numba is
    installed (:mod:`ablate.kernels`); empty where no cell needs compiled kernels."""
    from .kernels import model_key, needs_warmup

    out: dict[tuple, RunSpec] = {}
    for spec in specs:
        if needs_warmup([spec]):
            out.setdefault(model_key(spec), spec)
    return list(out.values())


def parts_needed(spec: RunSpec) -> tuple[str, ...]:
    """The preparation parts that have something to build: no judge job for data without one,
    no tokenizer job for a pretrained tokenizer on streaming data (nothing to train; the encode
    tasks and the cells load it)."""
    from .data.sources import STREAMING
    from .eval.judge import judge_kind

    out = []
    for part in PREP_PARTS:
        if part == "judge" and judge_kind(spec.data.name) is None and cache_keys(spec)["clip"] is None:
            continue
        if part == "tokenizer" and spec.tokenizer.kind == "diffusers" and spec.data.name in STREAMING:
            continue
        out.append(part)
    return tuple(out)


def _finished_shards(spec: RunSpec, results_dir: Path) -> int:
    from .data.encode import StreamedSplits, store_progress, store_root

    splits = StreamedSplits(spec.data)
    done = store_progress(splits, store_root(results_dir, splits.image_key, cache_keys(spec)["tokenizer"]))
    return sum(a for a, _ in done.values())


def encode_tasks(kind: str, slots: int, asked: int) -> int:
    """How many encode tasks: ``launcher.prepare_tasks`` when set, else one per local job slot,
    or :data:`SLURM_ENCODE_TASKS` array tasks on Slurm."""
    if asked:
        return asked
    return SLURM_ENCODE_TASKS if kind == "slurm" else max(1, slots)


def describe(todo: dict[str, tuple[RunSpec, dict[str, int]]], results_dir: Optional[Path] = None) -> list[str]:
    """One line per preparation: data, tokenizer, and for streaming data its shards per split
    (``finished/total`` in the token store under ``results_dir`` when given)."""
    from .data.encode import StreamedSplits, store_progress, store_root

    lines = []
    for k, (spec, shards) in todo.items():
        t = spec.tokenizer
        tok = f"diffusers {t.path}" if t.kind == "diffusers" else f"vqvae K={t.codebook_size} f={t.downsample}"
        if not shards:
            where = "in memory"
        elif results_dir is None:
            where = ", ".join(f"{s} {n}" for s, n in shards.items())
        else:
            splits = StreamedSplits(spec.data)
            done = store_progress(splits, store_root(results_dir, splits.image_key, cache_keys(spec)["tokenizer"]))
            where = ", ".join(f"{s} {a}/{b}" for s, (a, b) in done.items())
        lines.append(f"{k[:12]}  data {spec.data.name} {spec.data.image_size}px  tokenizer {tok}  "
                     f"shards: {where}")
    return lines
