"""The trainer of one run: builds the generator on prepared data, trains it with
:func:`~ablate.train.loop.fit` (logging, validation, sample sheets and checkpoints as hooks),
then samples and evaluates it. Resumable: a new attempt continues from the furthest checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from ablate.config import RunSpec
from ablate.dist import SINGLE, Dist
from ablate import paradigm as paradigms
from ablate.model import Generator
from ablate.registry import load_registry
from ablate.train import loop
from ablate.train.loop import Hooks, Interrupted
from ablate.fingerprint import fingerprint
from ablate.train.precision import CompiledOrEager, autocast, checkpoint_layers, compile_model, enable_tf32
from ablate.train.state import TrainState, foreign_checkpoints, latest_checkpoint
from ablate.train.stream import TokenStream
from ablate.utils import atomic_torch_save, peak_memory, step_seed

__all__ = ["Trainer", "cpu_share", "save_sheet", "VAL_IMAGES"]


def cpu_share(cpu_s: float, wall_s: float) -> float:
    """The process's CPU seconds over what its ``torch.get_num_threads()`` threads could have used
    in ``wall_s``: about 1 when the job had its cores to itself; well under 1 when another
    process shared them, so its throughput figures (tokens/s, images/s) were measured contended."""
    return cpu_s / (wall_s * max(1, torch.get_num_threads())) if wall_s > 0 else float("nan")

VAL_IMAGES = 512
_step_seed = step_seed


class RunHooks(Hooks):
    """A run's schedule around the steps: train-loss and lr rows every ``log_every``, the
    validation loss every ``eval_every``, sample sheets, a checkpoint every
    ``checkpoint_every`` (curves written first, so a resumed run never lacks logged steps), and
    the interrupt question (preemption, lost claim) at every step boundary."""

    def __init__(self, trainer: "Trainer"):
        self.tr = trainer
        self.rows: list[tuple[str, Optional[int], float]] = []
        self.saved_at = -1

    def after_step(self, state: TrainState, loss: float) -> None:
        tr, t, step = self.tr, self.tr.spec.train, state.step
        if not tr.dist.main:  # one rank logs, validates, snapshots and checkpoints
            return
        state.loss_acc, state.loss_n = state.loss_acc + loss, state.loss_n + 1
        if step % t.log_every == 0 or step == t.steps:
            state.last_train_loss = state.loss_acc / state.loss_n
            self.rows += [("train_loss", step, state.last_train_loss), ("lr", step, state.sched.get_last_lr()[0])]
            state.loss_acc, state.loss_n = 0.0, 0
        if step % t.eval_every == 0 or step == t.steps:
            state.last_val_loss = tr.val_loss()
            self.rows.append(("val_loss", step, state.last_val_loss))
            tr.say(f"step {step}/{t.steps} train_loss {state.last_train_loss:.4f} val_loss {state.last_val_loss:.4f}")
        if tr.sheet_due(step):
            tr.snapshot(step)
        if step % t.checkpoint_every == 0 or step == t.steps:
            self.checkpoint(state)

    def interrupted(self) -> bool:
        return self.tr.interrupt()

    def checkpoint(self, state: TrainState) -> None:
        if not self.tr.dist.main:
            return
        self.tr.log_metrics(self.rows)
        self.rows = []
        if self.saved_at != state.step:
            state.save(self.tr.ckpt_path)
            self.saved_at = state.step

    def finish(self, state: TrainState) -> None:
        if not self.tr.dist.main:
            return
        self.tr.log_metrics(self.rows)
        self.rows = []


def _delegate(name: str) -> property:
    """A Trainer attribute that lives in its TrainState."""
    return property(lambda self: getattr(self.state, name), lambda self, v: setattr(self.state, name, v))


class Trainer:
    """Builds the generator for ``spec`` on prepared data and trains it, resumable."""

    def __init__(self, spec: RunSpec, prep: Any, device: torch.device, out_dir: Path,
                 log_metrics: Callable[[list[tuple[str, Optional[int], float]]], None] = lambda rows: None,
                 say: Callable[[str], None] = print, interrupt: Callable[[], bool] = lambda: False,
                 attempt: Optional[str] = None, dist: Dist = SINGLE):
        from ablate.text import build_text_encoder

        self.spec, self.prep, self.device, self.out_dir = spec, prep, device, Path(out_dir)
        self.dist = dist
        self.log_metrics, self.say = log_metrics, say
        # asked at every step boundary and between sampling batches: stop there (preemption)?
        # It may also raise (the job lost its claim), which ends the attempt without a write.
        self.interrupt = interrupt
        results_dir = self.out_dir.parent.parent
        self.data = {name: prep.split(name) for name in ("train", "val", "test")}
        torch.manual_seed(spec.seed)  # every parameter, the learned text encoder's too, from the seed
        self.text = build_text_encoder(spec.text, self.data["train"].iter_captions(), results_dir, device)
        t = spec.train
        self.global_batch = t.batch_size * t.grad_accum * dist.world
        self.stream = TokenStream(self.data, self.text, device, self.global_batch, spec.seed, spec.text.cache)
        store = prep.store
        from ablate.config import ConfigError, paradigm_problem

        why = paradigm_problem(spec)
        if why:
            raise ConfigError(why)
        order = paradigms.generation_order(spec.model.order, store.grid)
        self.paradigm = paradigms.get(spec.model.paradigm, store.codebook_size, order, spec.tokenizer.scales)
        variant = load_registry().get(spec.model.variant)
        model = Generator(variant, variant.Config(**spec.model.params), self.text,
                          codebook_size=store.codebook_size, grid=store.grid,
                          width=spec.model.width, depth=spec.model.depth, heads=spec.model.heads,
                          text_len=spec.text.max_len, dropout=spec.model.dropout,
                          causal=self.paradigm.causality != "none",
                          order=order if spec.model.paradigm == "ar" else None,
                          blocks=getattr(self.paradigm, "blocks", ()), positions=spec.model.positions).to(device)
        self.state = TrainState(model, spec.train, device)
        self.state.net = self._runner(model)
        self.state.first_step_at = None  # when this attempt's first step began (not checkpointed)
        self.state.last_step_at = None  # when its latest step ended
        self.sheet_s = 0.0  # seconds of sample-sheet snapshots in this attempt (not in train_s)
        # each attempt writes its own checkpoint file, so two attempts of one run (one of them
        # stale, about to find out) never overwrite each other's live file; a new attempt
        # resumes from the furthest checkpoint any attempt left
        self.ckpt_path = self.out_dir / (f"ckpt-{attempt}.pt" if attempt else "ckpt.pt")
        # a run's result comes from one code version: a checkpoint written by other code (the
        # run was lost, the code changed, the grid was run again) is removed, and training
        # starts over (the job then clears the old attempt's curves too)
        self.state.fingerprint = fingerprint(variant)
        for f, theirs in foreign_checkpoints(self.out_dir, self.state.fingerprint) if dist.main else ():
            self.say(f"{f.name} was written by other code ({theirs or 'unrecorded'}; this is "
                     f"{self.state.fingerprint}): not resumed, training starts over")
            f.unlink(missing_ok=True)
        latest = latest_checkpoint(self.out_dir, self.state.fingerprint)
        if latest is not None:
            self.state.load(latest)
            self.say(f"resumed from step {self.step} ({latest.name})")

    step = _delegate("step")
    last_train_loss = _delegate("last_train_loss")
    last_val_loss = _delegate("last_val_loss")
    train_s = _delegate("train_s")
    train_cpu_s = _delegate("train_cpu_s")
    data_s = _delegate("data_s")
    timed_steps = _delegate("timed_steps")
    peak_mem_mb = _delegate("peak_mem_mb")
    first_step_at = _delegate("first_step_at")
    last_step_at = _delegate("last_step_at")

    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def ema(self) -> Optional[nn.Module]:
        return self.state.ema

    @property
    def sampler(self) -> Any:
        return self.stream.sampler

    @property
    def null(self) -> tuple[torch.Tensor, ...]:
        return self.stream.null

    def save_checkpoint(self) -> None:
        self.state.save(self.ckpt_path)

    def batch_indices(self, step: int) -> torch.Tensor:
        """Sample indices of the batch at ``step`` (a pure function of the step)."""
        return self.stream.sampler.indices(step)

    def batch(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes long [b, L], text features [b, T, F], mask [b, T]) of samples ``idx`` of ``split``."""
        return self.stream.batch(split, idx)

    # -- training ------------------------------------------------------------------------------
    def _runner(self, model: nn.Module) -> Any:
        """What a training step calls: ``model`` with its layers checkpointed, compiled (with a
        logged fallback to eager), wrapped for data parallelism when there are several ranks."""
        t = self.spec.train
        enable_tf32(self.device)
        if t.activation_checkpointing and not checkpoint_layers(model.backbone):
            self.say(f"train.activation_checkpointing: variant {self.spec.model.variant} has no layers/blocks "
                     "list to checkpoint; training without")
        net = self.dist.wrap(model)
        if t.compile:
            net = CompiledOrEager(net, compile_model(net, self.say), self.say)
        return net

    def _loss(self, model: nn.Module, codes: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor,
              g: Optional[torch.Generator], share: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """The training loss of codes ``[B, L]`` under captions ``feats [B, T, F]``/``mask``: the
        paradigm's batch and loss, plus the backbone's auxiliary losses. For ``share = (s, S)``
        with S > 1, this share's part of the global batch's loss (the auxiliary losses, means of
        their own, count 1/S each)."""
        batch = self.paradigm.make_batch(codes, g, share)
        return self.paradigm.loss(model, batch, feats, mask, self.spec.train.label_smoothing, share)

    def _warm_up(self) -> None:
        """One forward and backward pass on two training examples, before memory is measured, so
        that what any first call loads (compiled scan kernels, lazy buffers) is not counted as
        the model's memory. Changes nothing: RNG state restored, gradients dropped, no step."""
        with torch.random.fork_rng(devices=[]):
            codes, feats, mask = self.batch("train", torch.arange(min(2, len(self.data["train"]))))
            self._loss(self.model, codes, feats, mask, None).backward()
        self.model.zero_grad(set_to_none=True)

    def train_step(self, step: int) -> float:
        """One optimizer step at ``step`` (which must be :attr:`step`); does not advance it."""
        if step != self.step:
            raise ValueError(f"train_step({step}): the state is at step {self.step}")
        t = self.spec.train
        return loop.train_step(self.state, self.stream, self._loss, self.spec.seed, t.cond_dropout, self.dist)

    @torch.no_grad()
    def val_loss(self) -> float:
        """The paradigm's loss on a fixed val subset with fixed draws (comparable across steps)."""
        self.model.eval()
        n = min(VAL_IMAGES, len(self.data["val"]))
        g = torch.Generator().manual_seed(_step_seed(self.spec.seed, 0, salt=99))
        total, count = 0.0, 0
        for i in range(0, n, 256):
            codes, feats, mask = self.batch("val", torch.arange(i, min(n, i + 256)))
            batch = self.paradigm.make_batch(codes, g)
            with autocast(self.spec.train.precision, self.device):
                ce, k = self.paradigm.eval_loss(self.model, batch, feats, mask)
            total += ce
            count += k
        return total / max(1, count)

    def train(self) -> None:
        """Train to ``train.steps`` (from wherever the checkpoint left off), measuring the memory
        the training steps take (:meth:`_measure_memory`)."""
        if self.step >= self.spec.train.steps:
            return
        with self._measure_memory():
            self._train()

    @contextlib.contextmanager
    def _measure_memory(self) -> Iterator[None]:
        """``peak_mem_mb``: the model's training memory, measured over this attempt's training
        steps only (data, judge, tokenizer and compiled kernels were loaded before): the CUDA
        allocator's peak on a GPU; on a CPU the growth of this process's resident set from
        before the first step to its high-water mark during the steps (Linux; NaN elsewhere).
        The largest value over a run's attempts is kept."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield
            mb = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        else:
            self._warm_up()
            with peak_memory(collect=True) as m:
                yield
            mb = m["mb"] if m["mb"] is not None else float("nan")
        if math.isfinite(mb):
            self.peak_mem_mb = mb if not math.isfinite(self.peak_mem_mb) else max(self.peak_mem_mb, mb)

    def _train(self) -> None:
        loop.fit(self.state, self.stream, self._loss, self.spec, RunHooks(self), self.dist)

    # -- results -------------------------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        out = {"params": float(n_params),
               "backbone_params": float(sum(p.numel() for p in self.model.backbone.parameters())),
               "train_loss": self.last_train_loss, "val_loss": self.last_val_loss,
               "train_steps": float(self.step)}
        if self.global_batch != self.spec.train.batch_size:  # samples per optimizer step, all ranks
            out["global_batch"] = float(self.global_batch)
        if self.dist.world > 1:
            out["world_size"] = float(self.dist.world)
        if self.timed_steps:
            out["train_tokens_per_s"] = self.timed_steps * self.global_batch * self.model.seq_len / self.train_s
            out["train_s"] = self.train_s
            out["data_wait_share"] = self.data_s / self.train_s  # of the timed step time
            if self.device.type == "cpu":  # the share of its cores the job had: under 1, a neighbour took some
                out["train_cpu_share"] = cpu_share(self.train_cpu_s, self.train_s)
        if self.sheet_s:
            out["sheet_s"] = self.sheet_s
        if math.isfinite(self.peak_mem_mb):
            out["peak_mem_mb"] = self.peak_mem_mb
        return out

    @torch.no_grad()
    def generate(self, n: int, split: str = "test", model: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
        """Sample images for the first ``n`` captions of ``split``: uint8 ``[n, 3, H, W]``. With
        several ranks each samples a contiguous part (its own seed; rank 0's is the one-process
        seed) and rank 0 gets them all; the other ranks get None."""
        model = model or self.ema or self.model
        model.eval()
        rank, world = self.dist.rank, self.dist.world
        g = torch.Generator(self.device).manual_seed(_step_seed(self.spec.seed, rank, salt=4242))
        bs = self.spec.sample.batch_size
        part = -(-n // world)  # captions per rank (the last may have fewer)
        lo, hi = min(n, rank * part), min(n, (rank + 1) * part)
        codes = []
        for i in range(0, part, bs):  # as many safe points on every rank
            self.safe_point()
            if lo + i >= hi:
                continue
            _, feats, mask = self.batch(split, torch.arange(lo + i, min(hi, lo + i + bs)))
            with autocast(self.spec.train.precision, self.device):
                codes.append(self.paradigm.sample(model, feats, mask, *self.null, self.spec.sample, generator=g))
        h, w = self.prep.store.grid
        mine = torch.cat(codes) if codes else torch.zeros(0, h * w, dtype=torch.long, device=self.device)
        every = self.dist.gather_tensors(mine)
        return None if every is None else self.prep.vq.decode(every.to(self.device).view(-1, h, w))

    def safe_point(self, collective: bool = True) -> None:
        """Outside training (sampling, evaluation), where stopping loses nothing: the checkpoint
        of the last step is on disk, and a resumed job redoes the evaluation (deterministic).
        With several ranks every rank stops if any was asked to (``collective``: all ranks call
        it at the same points)."""
        asked = self.interrupt()
        if self.dist.any(asked) if collective else asked:
            raise Interrupted(self.step)

    def evaluate(self) -> dict[str, float]:
        """Sample the first ``eval.n_images`` test captions (split across ranks) and score them
        on rank 0; the other ranks return {}."""
        from ablate.eval import evaluate_images
        from ablate.eval.failures import write_failures

        test = self.prep.splits.test
        n = min(self.spec.eval.n_images, len(test))
        t0, c0 = time.perf_counter(), time.process_time()
        images = self.generate(n)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        sample_s = time.perf_counter() - t0
        sample_cpu_s = time.process_time() - c0
        if images is None:
            return {}
        self.samples_path = self.out_dir / "samples.png"
        save_sheet(images[:64].cpu(), self.samples_path)
        (self.out_dir / "samples.txt").write_text("\n".join(test.captions[:64]) + "\n")
        attrs = test.attrs[:n] if test.attrs is not None else None
        self.safe_point(collective=False)
        metrics = evaluate_images(images, test.captions[:n], attrs, test, self.prep.judge,
                                  self.spec.eval, self.device, self.prep.clip)
        metrics["sample_images_per_s"] = n / sample_s  # at sample.batch_size, every rank's share together
        metrics["sample_s_per_image"] = sample_s / n
        if self.device.type == "cpu":
            metrics["sample_cpu_share"] = cpu_share(sample_cpu_s, sample_s)
        self.temperature_sheet()
        self.failures_path = write_failures(self.out_dir / "failures", self.prep.splits.name, images,
                                            test.captions[:n], attrs, getattr(test, "heldout", None),
                                            self.prep.judge)
        return metrics

    def artifacts(self) -> list[tuple[str, str]]:
        """Save the EMA weights as the run's model; list the run's files as (kind, path)."""
        model_path = self.out_dir / "model.pt"
        atomic_torch_save({"model": (self.ema or self.model).state_dict(), "step": self.step}, model_path)
        out = [("model", str(model_path))]
        if getattr(self, "samples_path", None) is not None:
            out.append(("samples", str(self.samples_path)))
        if (self.out_dir / "sheet" / "prompts.json").exists():
            out.append(("sheet", str(self.out_dir / "sheet")))
        if getattr(self, "failures_path", None) is not None:
            out.append(("failures", str(self.failures_path)))
        if getattr(self, "temperatures_path", None) is not None:
            out.append(("temperatures", str(self.temperatures_path)))
        return out

    @torch.no_grad()
    def temperature_sheet(self) -> Optional[Path]:
        """``temperatures.png``: the first ``max(8, eval.sheet_prompts)`` test captions sampled at
        each temperature of ``eval.temperature_sheet`` (one row each, the same noise seed for
        every row), with ``temperatures.json`` (temperatures and prompts); None if not asked.
        Observation only, after the metrics: its own generator."""
        temps = self.spec.eval.temperature_sheet
        if not temps:
            return None
        test = self.prep.splits.test
        k = min(max(8, self.spec.eval.sheet_prompts), len(test))
        model = self.ema or self.model
        model.eval()
        _, feats, mask = self.batch("test", torch.arange(k))
        h, w = self.prep.store.grid
        rows = []
        for t in temps:
            g = torch.Generator(self.device).manual_seed(_step_seed(self.spec.seed, 0, salt=888))
            spec = self.spec.sample.model_copy(update={"temperature": t})
            with autocast(self.spec.train.precision, self.device):
                codes = self.paradigm.sample(model, feats, mask, *self.null, spec, generator=g)
            rows.append(self.prep.vq.decode(codes.view(-1, h, w)).cpu())
        path = self.out_dir / "temperatures.png"
        save_sheet(torch.cat(rows), path, cols=k)
        meta = {"temperatures": list(temps), "prompts": list(test.captions[:k])}
        (self.out_dir / "temperatures.json").write_text(json.dumps(meta, indent=1) + "\n")
        self.temperatures_path = path
        return path

    # -- sample-sheet snapshots ------------------------------------------------------------------
    def sheet_due(self, step: int) -> bool:
        """Whether ``step`` is a snapshot step: one of ``eval.sheet_steps``, or when that is
        empty a validation step (each ``train.eval_every`` and the last)."""
        e, t = self.spec.eval, self.spec.train
        if e.sheet_prompts <= 0:
            return False
        if e.sheet_steps:
            return step in e.sheet_steps
        return step % t.eval_every == 0 or step == t.steps

    @torch.no_grad()
    def snapshot(self, step: int) -> Path:
        """Decode the fixed prompts (the first ``eval.sheet_prompts`` test captions) with the
        weights the run is evaluated with (EMA if any) and the same sampling noise at every
        step; save ``sheet/step_<step>.png`` (one tile per prompt, in a row, 2 px gaps) and
        ``sheet/prompts.json``. Observation only: its own generator, no gradient, and the next
        training step reseeds everything it draws, so the run's results do not change.
        Returns the PNG's path."""
        t0 = time.perf_counter()
        test = self.prep.splits.test
        k = min(self.spec.eval.sheet_prompts, len(test))
        model = self.ema or self.model
        model.eval()
        g = torch.Generator(self.device).manual_seed(_step_seed(self.spec.seed, 0, salt=777))
        _, feats, mask = self.batch("test", torch.arange(k))
        with autocast(self.spec.train.precision, self.device):
            codes = self.paradigm.sample(model, feats, mask, *self.null, self.spec.sample, generator=g)
        h, w = self.prep.store.grid
        images = self.prep.vq.decode(codes.view(-1, h, w)).cpu()  # uint8 [k, 3, H, W]
        folder = self.out_dir / "sheet"
        path = folder / f"step_{step:06d}.png"
        save_sheet(images, path, cols=k)
        meta = {"prompts": list(test.captions[:k]), "tile": list(images.shape[-2:]), "gap": 2}
        (folder / "prompts.json").write_text(json.dumps(meta, indent=1) + "\n")
        self.sheet_s += time.perf_counter() - t0
        return path


def save_sheet(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    """Tile uint8 images ``[n, 3, H, W]`` into one PNG (``cols`` per row, 2 px gaps)."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / cols)
    sheet = torch.full((c, rows * (h + 2), cols * (w + 2)), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        sheet[:, r * (h + 2):r * (h + 2) + h, q * (w + 2):q * (w + 2) + w] = images[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(sheet.permute(1, 2, 0).numpy()).save(tmp)
    tmp.replace(path)
