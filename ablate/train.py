"""Training, sampling and evaluation of one generator.

Everything random in a step (batch choice, masking, caption dropout, dropout) is seeded by
``(seed, step)``, so a run resumed from a checkpoint takes exactly the steps it would have taken
uninterrupted, and the data position is a pure function of the step.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from .config import RunSpec
from .data.stream import StepSampler
from .model import Generator, aux_losses, drop_text, masked_loss, random_mask, sample_tokens
from .registry import load_registry
from .utils import atomic_torch_save, peak_memory, step_seed, torch_load

VAL_IMAGES = 512


_step_seed = step_seed


def lr_factor(step: int, spec) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at the last step."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    span = max(1, spec.steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, embeddings or positions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Interrupted(Exception):
    """Training stopped at a step boundary on request (preemption, time limit) after saving a
    checkpoint there; a new job resumes from ``step``."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved")
        self.step = step


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The checkpoint furthest in training among the attempts' files (``ckpt*.pt``) in ``folder``."""
    best, best_step = None, -1
    for f in sorted(Path(folder).glob("ckpt*.pt")):
        try:
            step = int(torch.load(f, map_location="cpu", weights_only=True, mmap=True)["step"])
        except Exception:  # a file being replaced right now, or damaged: not a resume point
            continue
        if step > best_step:
            best, best_step = f, step
    return best


def remove_checkpoints(folder: Path) -> None:
    """Delete every attempt's checkpoint (once the run's result is committed)."""
    for f in Path(folder).glob("ckpt*.pt"):
        f.unlink(missing_ok=True)


class Trainer:
    """Builds the generator for ``spec`` on prepared data and trains it, resumable."""

    def __init__(self, spec: RunSpec, prep: Any, device: torch.device, out_dir: Path,
                 log_metrics: Callable[[list[tuple[str, Optional[int], float]]], None] = lambda rows: None,
                 say: Callable[[str], None] = print, interrupt: Callable[[], bool] = lambda: False,
                 attempt: Optional[str] = None):
        from .text import build_text_encoder

        self.spec, self.prep, self.device, self.out_dir = spec, prep, device, Path(out_dir)
        self.log_metrics, self.say = log_metrics, say
        # asked at every step boundary and between sampling batches: stop there (preemption)?
        # It may also raise (the job lost its claim), which ends the attempt without a write.
        self.interrupt = interrupt
        results_dir = self.out_dir.parent.parent
        store = prep.store
        self.data = {name: prep.split(name) for name in ("train", "val", "test")}
        torch.manual_seed(spec.seed)  # every parameter, the learned text encoder's too, from the seed
        self.text = build_text_encoder(spec.text, self.data["train"].iter_captions(), results_dir, device)
        self.features = CaptionFeatures(self.text, self.data, device, cache=spec.text.cache)
        self.null = tuple(t.to(device) for t in self.text.null_features(1))
        self.sampler = StepSampler(len(self.data["train"]), spec.train.batch_size, spec.seed)

        variant = load_registry().get(spec.model.variant)
        self.model = Generator(variant, variant.Config(**spec.model.params), self.text,
                               codebook_size=store.codebook_size, grid=store.grid,
                               width=spec.model.width, depth=spec.model.depth, heads=spec.model.heads,
                               text_len=spec.text.max_len, dropout=spec.model.dropout).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if spec.train.ema_decay > 0 else None
        t = spec.train
        self.opt = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr, betas=t.betas,
                                     fused=device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, t))
        self.step = 0
        self.train_s = 0.0  # seconds of timed steps (after throughput warm-up)
        self.data_s = 0.0  # of those, seconds spent reading the batch (codes and text features)
        self._data_t = 0.0  # the current step's data seconds
        self.timed_steps = 0
        self.last_train_loss = float("nan")
        self.last_val_loss = float("nan")
        self.loss_acc, self.loss_n = 0.0, 0  # train loss summed since the last log row
        self.first_step_at: Optional[float] = None  # when this attempt's first step began
        self.last_step_at: Optional[float] = None  # when its latest step ended
        self.sheet_s = 0.0  # seconds of sample-sheet snapshots in this attempt (not in train_s)
        self.peak_mem_mb = float("nan")  # the model's training memory (max over attempts)
        # each attempt writes its own checkpoint file, so two attempts of one run (one of them
        # stale, about to find out) never overwrite each other's live file; a new attempt
        # resumes from the furthest checkpoint any attempt left
        self.ckpt_path = self.out_dir / (f"ckpt-{attempt}.pt" if attempt else "ckpt.pt")
        latest = latest_checkpoint(self.out_dir)
        if latest is not None:
            self._load(latest)
            self.say(f"resumed from step {self.step} ({latest.name})")

    # -- state ---------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "ema": self.ema.state_dict() if self.ema else {},
                "train_s": self.train_s, "data_s": self.data_s, "timed_steps": self.timed_steps,
                "last_train_loss": self.last_train_loss, "last_val_loss": self.last_val_loss,
                "loss_acc": self.loss_acc, "loss_n": self.loss_n, "peak_mem_mb": self.peak_mem_mb}

    def _load(self, path: Path) -> None:
        st = torch_load(path)
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"])
        self.step, self.train_s, self.timed_steps = st["step"], st["train_s"], st["timed_steps"]
        self.data_s = float(st.get("data_s", 0.0))
        self.last_train_loss, self.last_val_loss = st["last_train_loss"], st["last_val_loss"]
        self.loss_acc, self.loss_n = st.get("loss_acc", 0.0), st.get("loss_n", 0)
        self.peak_mem_mb = float(st.get("peak_mem_mb", float("nan")))

    def save_checkpoint(self) -> None:
        atomic_torch_save(self._state(), self.ckpt_path)

    # -- data ----------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> torch.Tensor:
        """Sample indices of the batch at ``step``: epochs are seeded permutations, so the data
        position is a function of the step (exact resume)."""
        return self.sampler.indices(step)

    def batch(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes long [b, L], text features [b, T, F], mask [b, T]) of samples ``idx`` of
        ``split``, on the device."""
        codes = self.data[split].codes(idx).to(self.device, non_blocking=True)
        feats, mask = self.features(split, idx)
        return codes, feats, mask

    # -- training ------------------------------------------------------------------------------
    def _loss(self, codes: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor,
              g: Optional[torch.Generator]) -> torch.Tensor:
        """The training loss of codes ``[B, L]`` under captions ``feats [B, T, F]``/``mask``:
        mask a random share of tokens, predict them, plus the backbone's auxiliary losses."""
        inputs, masked = random_mask(codes, self.model.mask_id, generator=g)
        logits, aux = self.model(inputs, feats, mask, targets=codes, masked=masked)
        loss = masked_loss(logits, codes, masked, self.spec.train.label_smoothing)
        for v in aux_losses(aux).values():
            loss = loss + v
        return loss

    def _warm_up(self) -> None:
        """One forward and backward pass on two training examples, before memory is measured, so
        that what any first call loads (compiled scan kernels, lazy buffers) is not counted as
        the model's memory. Changes nothing: RNG state restored, gradients dropped, no step."""
        with torch.random.fork_rng(devices=[]):
            codes, feats, mask = self.batch("train", torch.arange(min(2, len(self.data["train"]))))
            self._loss(codes, feats, mask, None).backward()
        self.model.zero_grad(set_to_none=True)

    def train_step(self, step: int) -> float:
        t = self.spec.train
        g = torch.Generator().manual_seed(_step_seed(self.spec.seed, step))
        torch.manual_seed(_step_seed(self.spec.seed, step, salt=1))  # module dropout
        t0 = time.perf_counter()
        codes, feats, mask = self.batch("train", self.batch_indices(step))  # [B, L], [B, T, F], [B, T]
        self._data_t = time.perf_counter() - t0
        feats, mask = drop_text(feats, mask, *self.null, t.cond_dropout, generator=g)
        self.model.train()
        loss = self._loss(codes, feats, mask, g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            # warm EMA: short runs must not average in the random initialisation
            decay = min(t.ema_decay, (1 + step) / (10 + step))
            ema_p = [p for p in self.ema.parameters()]
            torch._foreach_lerp_(ema_p, [p.detach() for p in self.model.parameters()], 1 - decay)
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)
        return loss.item()

    @torch.no_grad()
    def val_loss(self) -> float:
        """Masked-token loss on a fixed val subset with fixed masks (comparable across steps)."""
        self.model.eval()
        n = min(VAL_IMAGES, len(self.data["val"]))
        g = torch.Generator().manual_seed(_step_seed(self.spec.seed, 0, salt=99))
        total, count = 0.0, 0
        for i in range(0, n, 256):
            codes, feats, mask = self.batch("val", torch.arange(i, min(n, i + 256)))
            inputs, masked = random_mask(codes, self.model.mask_id, generator=g)
            logits, _ = self.model(inputs, feats, mask)
            total += masked_loss(logits, codes, masked).item() * int(masked.sum())
            count += int(masked.sum())
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
        t = self.spec.train
        rows: list[tuple[str, Optional[int], float]] = []
        while self.step < t.steps:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if self.first_step_at is None:
                self.first_step_at = time.time()  # wall clock: compared with the submission time
            loss = self.train_step(self.step)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.last_step_at = time.time()
            if self.step >= t.throughput_warmup:
                self.train_s += time.perf_counter() - t0
                self.data_s += self._data_t
                self.timed_steps += 1
            self.loss_acc, self.loss_n = self.loss_acc + loss, self.loss_n + 1
            self.step += 1
            if self.step % t.log_every == 0 or self.step == t.steps:
                self.last_train_loss = self.loss_acc / self.loss_n
                rows += [("train_loss", self.step, self.last_train_loss),
                         ("lr", self.step, self.sched.get_last_lr()[0])]
                self.loss_acc, self.loss_n = 0.0, 0
            if self.step % t.eval_every == 0 or self.step == t.steps:
                self.last_val_loss = self.val_loss()
                rows.append(("val_loss", self.step, self.last_val_loss))
                self.say(f"step {self.step}/{t.steps} train_loss {self.last_train_loss:.4f} "
                         f"val_loss {self.last_val_loss:.4f}")
            if self.sheet_due(self.step):
                self.snapshot(self.step)
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                self.log_metrics(rows)  # curves first, so a resumed run never lacks logged steps
                rows = []
                self.save_checkpoint()
            elif self.step < t.steps and self.interrupt():
                self.log_metrics(rows)
                self.save_checkpoint()
                raise Interrupted(self.step)
        self.log_metrics(rows)

    # -- results -------------------------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        t = self.spec.train
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        out = {"params": float(n_params),
               "backbone_params": float(sum(p.numel() for p in self.model.backbone.parameters())),
               "train_loss": self.last_train_loss, "val_loss": self.last_val_loss,
               "train_steps": float(self.step)}
        if self.timed_steps:
            out["train_tokens_per_s"] = self.timed_steps * t.batch_size * self.model.seq_len / self.train_s
            out["train_s"] = self.train_s
            out["data_wait_share"] = self.data_s / self.train_s  # of the timed step time
        if self.sheet_s:
            out["sheet_s"] = self.sheet_s
        if math.isfinite(self.peak_mem_mb):
            out["peak_mem_mb"] = self.peak_mem_mb
        return out

    @torch.no_grad()
    def generate(self, n: int, split: str = "test", model: Optional[nn.Module] = None) -> torch.Tensor:
        """Sample images for the first ``n`` captions of ``split``: uint8 ``[n, 3, H, W]``."""
        model = model or self.ema or self.model
        model.eval()
        g = torch.Generator(self.device).manual_seed(_step_seed(self.spec.seed, 0, salt=4242))
        bs = self.spec.sample.batch_size
        codes = []
        for i in range(0, n, bs):
            self.safe_point()
            _, feats, mask = self.batch(split, torch.arange(i, min(n, i + bs)))
            codes.append(sample_tokens(model, feats, mask, *self.null, self.spec.sample, generator=g))
        h, w = self.prep.store.grid
        return self.prep.vq.decode(torch.cat(codes).view(-1, h, w))

    def safe_point(self) -> None:
        """Outside training (sampling, evaluation), where stopping loses nothing: the checkpoint
        of the last step is on disk, and a resumed job redoes the evaluation (deterministic)."""
        if self.interrupt():
            raise Interrupted(self.step)

    def evaluate(self) -> dict[str, float]:
        from .eval import evaluate_images

        test = self.prep.splits.test
        n = min(self.spec.eval.n_images, len(test))
        t0 = time.perf_counter()
        images = self.generate(n)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        sample_s = time.perf_counter() - t0
        self.samples_path = self.out_dir / "samples.png"
        save_sheet(images[:64].cpu(), self.samples_path)
        (self.out_dir / "samples.txt").write_text("\n".join(test.captions[:64]) + "\n")
        attrs = test.attrs[:n] if test.attrs is not None else None
        self.safe_point()
        metrics = evaluate_images(images, test.captions[:n], attrs, test, self.prep.judge,
                                  self.spec.eval, self.device)
        metrics["sample_images_per_s"] = n / sample_s
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
        return out

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
        codes = sample_tokens(model, feats, mask, *self.null, self.spec.sample, generator=g)
        h, w = self.prep.store.grid
        images = self.prep.vq.decode(codes.view(-1, h, w)).cpu()  # uint8 [k, 3, H, W]
        folder = self.out_dir / "sheet"
        path = folder / f"step_{step:06d}.png"
        save_sheet(images, path, cols=k)
        meta = {"prompts": list(test.captions[:k]), "tile": list(images.shape[-2:]), "gap": 2}
        (folder / "prompts.json").write_text(json.dumps(meta, indent=1) + "\n")
        self.sheet_s += time.perf_counter() - t0
        return path


class CaptionFeatures:
    """Text features of store samples, per batch: ``(idx of split) -> (feats, mask)`` on the
    device. A frozen encoder with ``text.cache`` encodes every caption of a split once (disk
    cache, held in memory: right for small and medium sets); otherwise, and for the learned
    encoder (whose features are word ids), captions are featurized batch by batch."""

    def __init__(self, encoder: Any, data: dict[str, Any], device: torch.device, cache: bool):
        self.encoder, self.data, self.device = encoder, data, device
        self.whole = cache and not getattr(encoder, "trainable", True)
        self._split: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.whole:
            if split not in self._split:
                feats = self.encoder.featurize(list(self.data[split].iter_captions()))
                self._split[split] = tuple(t.to(self.device) for t in feats)  # type: ignore[assignment]
            idx = idx.to(self.device)
            return tuple(t[idx] for t in self._split[split])  # type: ignore[return-value]
        feats = self.encoder.featurize_batch(self.data[split].captions(idx))
        return tuple(t.to(self.device, non_blocking=True) for t in feats)  # type: ignore[return-value]


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
