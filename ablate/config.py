"""Typed, closed configuration: one run (``RunSpec``) and a grid of runs (``GridSpec``).

Every model forbids unknown keys and checks types, so a typo in a grid file is an error that
names the key, never a silently ignored setting. A ``RunSpec`` is *fully resolved* (defaults and
the variant's own hyperparameters included) before it is hashed into its key, so two spellings of
the same cell give the same key.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A bad configuration value. ``str(err)`` is one line naming the field and the fix."""


class Closed(BaseModel):
    """Base of every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# json_schema_extra of a field added after runs were keyed: left out of run_key at its default
LATER: dict[str, Any] = {"later": True}


class DataSpec(Closed):
    """Which images and captions to train on."""

    name: Literal["shapes", "digits", "folder", "webdataset", "hf"] = "shapes"
    image_size: int = Field(32, ge=8, le=1024, description="square side in pixels")
    n_train: int = Field(20000, ge=16)
    n_val: int = Field(500, ge=8)
    n_test: int = Field(1000, ge=8)
    max_objects: int = Field(1, ge=1, le=2, description="shapes: objects per image (1 or 2)")
    path: Optional[str] = Field(None, description="folder: directory with images and captions.jsonl; "
                                                  "hf: a dataset saved with save_to_disk")
    urls: Optional[Union[str, list[str]]] = Field(
        None, json_schema_extra=LATER,
        description="webdataset: training shards, a brace pattern ('/data/cc3m/{00000..00331}.tar') "
                    "or a list; $VARS are expanded ($ABLATE_DATA)")
    val_urls: Optional[Union[str, list[str]]] = Field(None, json_schema_extra=LATER,
                                                      description="webdataset: validation shards")
    test_urls: Optional[Union[str, list[str]]] = Field(None, json_schema_extra=LATER,
                                                       description="webdataset: test shards")
    image_column: str = Field("image", json_schema_extra=LATER, description="hf: the image column")
    caption_column: str = Field("caption", json_schema_extra=LATER, description="hf: the caption column")
    shard_size: int = Field(10000, ge=1, json_schema_extra=LATER,
                            description="hf and folder: samples per preparation shard")
    seed: int = Field(0, description="data seed (independent of the run seed)")
    # deliberately not LATER: the training data changed with it, so every older key must change
    heldout: float = Field(
        0.2, ge=0, le=0.5,
        description="shapes: share of the colour x shape and of the shape x position pairs held out "
                    "of training (chosen by data.seed); every third test caption names one "
                    "(align_acc_heldout)")
    shuffle_captions: bool = Field(
        False, description="control: permute training captions so text carries no information")

    @model_validator(mode="after")
    def _folder_needs_path(self) -> "DataSpec":
        if self.name == "folder" and not self.path:
            raise ValueError("data.path is required when data.name is 'folder' "
                             "(a directory with images and captions.jsonl)")
        if self.name == "hf" and not self.path:
            raise ValueError("data.path is required when data.name is 'hf' (a dataset saved with save_to_disk)")
        if self.name == "webdataset":
            missing = [f for f in ("urls", "val_urls", "test_urls") if not getattr(self, f)]
            if missing:
                raise ValueError(f"data.{missing[0]} is required when data.name is 'webdataset' "
                                 "(tar shards: a brace pattern or a list)")
        return self


class StageSpec(Closed):
    """One resolution of a progressive tokenizer schedule (``tokenizer.stages``)."""

    image_size: int = Field(ge=8, le=1024, description="square side the images are resized to (area)")
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    steps: int = Field(ge=1, description="optimizer steps at this resolution")


class TokenizerSpec(Closed):
    """Image -> grid of discrete codes: ``vqvae`` (a conv VQ-VAE trained here) or ``diffusers``
    (a frozen pretrained ``VQModel`` at ``path``; the other fields do not apply to it). The VQ-VAE's
    VQGAN options (``disc_weight``, ``lpips_weights``, ``l1_weight``, ``ema_weights``) give the
    recipe of Esser et al.; at their defaults it is the plain MSE VQ-VAE of before."""

    kind: Literal["vqvae", "diffusers", "multiscale"] = Field(
        "vqvae", json_schema_extra=LATER,
        description="vqvae (trained here), diffusers (a frozen pretrained VQModel), multiscale (VAR's residual "
                    "quantizer over tokenizer.scales, one shared codebook; for model.paradigm: var)")
    scales: list[int] = Field(
        default_factory=list, json_schema_extra=LATER,
        description="multiscale: token map sides, coarse to fine, ending at the grid side "
                    "(image_size / downsample), e.g. [1, 2, 3, 4, 6, 8]")
    path: Optional[str] = Field(None, json_schema_extra=LATER,
                                description="diffusers: a local VQModel directory (aMUSEd: its vqvae/)")

    codebook_size: int = Field(256, ge=2, le=65536)
    codebooks: int = Field(1, ge=1, json_schema_extra=LATER,
                           description="codebooks per token location (seed 004): the code_dim channels split into "
                                       "this many groups, each quantized by its own codebook; the token grid is "
                                       "h x (w * codebooks), a location's codes consecutive")
    code_dim: int = Field(32, ge=2)
    downsample: int = Field(4, description="pixels per token side; 32px / 4 = 8x8 = 64 tokens")
    hidden: int = Field(32, ge=8, description="channels of the conv encoder/decoder at token resolution")
    quantizer: Literal["ema", "st"] = "ema"
    ema_decay: float = Field(0.99, gt=0, lt=1)
    commitment: float = Field(0.25, ge=0)
    dead_code_restart: bool = True
    restart_after: int = Field(20, ge=1, description="steps a code may go unused before it is restarted")
    res_blocks: int = Field(2, ge=0, description="residual blocks at token resolution (encoder and decoder)")
    # Calibrated on 32x32 shapes: 2000 small-batch steps take ~25-30 s on one CPU core and give val
    # MSE ~1.5e-4 with every attribute readable; fewer steps (1500) lose colour on small objects.
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-3, gt=0)
    warmup_steps: int = Field(50, ge=1)
    seed: int = 0
    # the VQGAN recipe, progressive resolution, codebook lookup (issue 19)
    act: Literal["relu", "silu"] = Field(
        "relu", json_schema_extra=LATER,
        description="encoder/decoder nonlinearity; silu cannot die (measured: a relu encoder of the "
                    "16-token shapes tokenizer died at seed 0 and used 9 of 512 codes)")
    lookup: Literal["euclidean", "cosine"] = Field(
        "euclidean", json_schema_extra=LATER,
        description="nearest code by L2 distance, or by cosine between l2-normalised encoder outputs "
                    "and codes (ViT-VQGAN; code_dim is then the factorised lookup dimension)")
    l1_weight: float = Field(0.0, ge=0, json_schema_extra=LATER, description="L1 pixel loss weight")
    l2_weight: float = Field(1.0, ge=0, json_schema_extra=LATER, description="L2 (MSE) pixel loss weight")
    lpips_weights: Optional[str] = Field(
        None, json_schema_extra=LATER,
        description="local LPIPS (VGG16 layout) state-dict file (.pt/.pth/.safetensors): adds the "
                    "perceptual loss; nothing is downloaded")
    perceptual_weight: float = Field(1.0, ge=0, json_schema_extra=LATER,
                                     description="weight of the LPIPS loss (only with lpips_weights)")
    disc_weight: float = Field(
        0.0, ge=0, json_schema_extra=LATER,
        description="PatchGAN hinge loss weight, times the adaptive weight (0: no discriminator)")
    disc_start: int = Field(0, ge=0, json_schema_extra=LATER,
                            description="optimizer steps before the discriminator is switched on")
    disc_layers: int = Field(3, ge=1, le=6, json_schema_extra=LATER,
                             description="stride-2 layers of the PatchGAN (its patch grows with them)")
    disc_channels: int = Field(64, ge=4, json_schema_extra=LATER, description="PatchGAN first-layer channels")
    ema_weights: float = Field(
        0.0, ge=0, lt=1, json_schema_extra=LATER,
        description="decay of an EMA of the encoder, quantizer and decoder weights, which then encode "
                    "and decode (0: none; not ema_decay, the codebook's own update)")
    stages: list[StageSpec] = Field(
        default_factory=list, json_schema_extra=LATER,
        description="progressive resolution: [{image_size, batch_size, grad_accum, steps}, ...], one "
                    "fully convolutional model across them; replaces steps and batch_size (empty: one "
                    "stage at data.image_size)")

    @model_validator(mode="after")
    def _diffusers_needs_path(self) -> "TokenizerSpec":
        if self.kind == "diffusers" and not self.path:
            raise ValueError("tokenizer.path is required when tokenizer.kind is 'diffusers' "
                             "(a local diffusers VQModel directory)")
        if self.kind == "multiscale":
            sc = self.scales
            if not sc or any(b <= a for a, b in zip(sc, sc[1:])) or sc[0] < 1:
                raise ValueError(f"tokenizer.scales: multiscale needs increasing token map sides ending at the "
                                 f"grid side, e.g. [1, 2, 3, 4, 6, 8]; got {sc}")
            if self.stages:
                raise ValueError("tokenizer.stages: a multiscale tokenizer trains at one resolution (its scales "
                                 "end at the grid side); remove tokenizer.stages")
        elif self.scales:
            raise ValueError(f"tokenizer.scales: only for kind: multiscale (kind is {self.kind}); remove it")
        if self.codebooks > 1 and self.kind != "vqvae":
            raise ValueError(f"tokenizer.codebooks: {self.codebooks} codebooks need the vqvae trained here "
                             f"(a pretrained {self.kind} tokenizer has its own one codebook); set codebooks: 1")
        if self.code_dim % self.codebooks:
            raise ValueError(f"tokenizer.codebooks ({self.codebooks}) must divide tokenizer.code_dim "
                             f"({self.code_dim}): each codebook takes code_dim / codebooks channels")
        return self

    @field_validator("downsample")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v < 1 or v & (v - 1):
            raise ValueError(f"tokenizer.downsample must be a power of two (1, 2, 4, 8, ...), got {v}")
        return v

    @model_validator(mode="after")
    def _stages_fit(self) -> "TokenizerSpec":
        if not self.stages:
            return self
        for name in ("steps", "batch_size"):
            if getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"tokenizer.{name} is set per stage when tokenizer.stages is given; "
                                 f"remove tokenizer.{name} (or tokenizer.stages)")
        for i, st in enumerate(self.stages):
            if st.image_size % self.downsample:
                raise ValueError(f"tokenizer.stages[{i}].image_size ({st.image_size}) must be a multiple "
                                 f"of tokenizer.downsample ({self.downsample})")
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole schedule: ``steps``, or the stages' steps summed."""
        return sum(st.steps for st in self.stages) if self.stages else self.steps

    @property
    def images_drawn(self) -> int:
        """Training images the schedule draws (with repeats): steps x batch (x grad_accum), summed."""
        if not self.stages:
            return self.steps * self.batch_size
        return sum(st.steps * st.batch_size * st.grad_accum for st in self.stages)


class TextSpec(Closed):
    """Text encoder: ``learned`` (trained with the generator), ``minilm`` (frozen, offline),
    or ``hf:<name-or-path>`` (any local transformers encoder)."""

    encoder: str = "learned"
    max_len: int = Field(16, ge=1, le=512, description="text tokens T after padding/truncation")
    width: int = Field(128, ge=8, description="learned encoder: embedding width")
    # 0 by default: measured on shapes (transformer, 400 steps), one pre-norm encoder layer over
    # N(0, 0.02) embeddings smears the word identities and align_acc was 0.07 (colour at chance),
    # against 0.61 with the embeddings fed to the generator's cross-attention directly
    layers: int = Field(0, ge=0, le=12, description="learned encoder: transformer layers")
    vocab_size: int = Field(4096, ge=16, description="learned encoder: most frequent words kept")
    heads: int = Field(4, ge=1, description="learned encoder: attention heads")
    cache: bool = Field(
        True, json_schema_extra=LATER,
        description="frozen encoders: encode each split's captions once (cached on disk, held in "
                    "memory); false: encode every batch on the fly (corpora of millions of captions)")

    @field_validator("encoder")
    @classmethod
    def _known(cls, v: str) -> str:
        if v in ("learned", "minilm") or (v.startswith("hf:") and len(v) > 3):
            return v
        raise ValueError(f"text.encoder must be 'learned', 'minilm' or 'hf:<name-or-path>', got {v!r}")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TextSpec":
        if self.encoder == "learned" and self.layers and self.width % self.heads:
            raise ValueError(f"text.width ({self.width}) must be divisible by text.heads ({self.heads})")
        return self


class ModelSpec(Closed):
    """The generator's size and its backbone variant. ``params`` are the variant's own
    hyperparameters; they are validated (and defaults filled in) by the variant's ``Config``."""

    variant: str = "transformer"
    paradigm: Literal["masked", "ar", "var"] = Field(
        "masked", json_schema_extra=LATER,
        description="how images are generated from tokens: masked (Muse/MaskGIT parallel decoding), ar "
                    "(next token, causal backbone) or var (next scale, block-causal; tokenizer.kind: multiscale)")
    order: Literal["raster", "snake"] = Field(
        "raster", json_schema_extra=LATER,
        description="ar: the order tokens are generated in (snake: every other row right to left)")
    positions: Literal["learned", "rope2d"] = Field(
        "learned", json_schema_extra=LATER,
        description="learned absolute position embeddings, or 2D rotary positions in the attention blocks "
                    "(seed 002; var adds a learned embedding per scale)")
    width: int = Field(128, ge=8, description="D, model width")
    depth: int = Field(4, ge=1, description="backbone layers")
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSpec":
        if self.width % self.heads:
            raise ValueError(f"model.width ({self.width}) must be divisible by model.heads ({self.heads})")
        return self


class TrainSpec(Closed):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor as a share of lr")
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="0 disables EMA weights")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    cond_dropout: float = Field(0.1, ge=0, le=1, description="share of captions replaced by the null caption")
    log_every: int = Field(25, ge=1)
    eval_every: int = Field(200, ge=1, description="validation loss every N steps")
    checkpoint_every: int = Field(200, ge=1)
    throughput_warmup: int = Field(10, ge=0, description="steps excluded from train_tokens_per_s")
    threads: int = Field(0, ge=0, description="torch threads in the job; 0 = the launcher's cpus_per_job")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", json_schema_extra=LATER,
        description="autocast dtype of training and sampling (fp16 with a gradient scaler); the selective "
                    "scan keeps its state and sums in fp32")
    grad_accum: int = Field(1, ge=1, json_schema_extra=LATER,
                            description="micro-batches of batch_size per optimizer step (global batch = "
                                        "batch_size x processes x grad_accum); schedule, EMA and logs count steps")
    compile: bool = Field(False, json_schema_extra=LATER,
                          description="torch.compile the generator (a failure falls back to eager, logged)")
    activation_checkpointing: bool = Field(
        False, json_schema_extra=LATER,
        description="recompute each backbone layer in the backward pass instead of storing its activations")


class SampleSpec(Closed):
    """Sampling with classifier-free guidance: MaskGIT iterative decoding (masked) or token by
    token (ar)."""

    steps: int = Field(12, ge=1)
    guidance: float = Field(2.0, ge=0, description="final CFG scale t in (1+t)*l_c - t*l_u")
    guidance_schedule: Literal["constant", "linear", "cosine"] = "linear"
    temperature: float = Field(1.0, gt=0, description="token sampling temperature")
    choice_temperature: float = Field(4.5, ge=0, description="Gumbel noise on confidences, annealed by (1 - r)")
    batch_size: int = Field(250, ge=1)
    top_k: int = Field(0, ge=0, json_schema_extra=LATER,
                       description="ar: sample among the k most likely tokens only (0: all)")
    top_p: float = Field(1.0, gt=0, le=1, json_schema_extra=LATER,
                         description="ar: sample among the smallest set of tokens whose probability reaches p")
    decode: Literal["cached", "full"] = Field(
        "cached", json_schema_extra=LATER,
        description="ar: cached = recurrent state (Mamba) / KV cache (attention), O(1) per token; full = the "
                    "whole prefix again per token (the reference)")
    remask: Literal["confidence", "critic"] = Field(
        "confidence", json_schema_extra=LATER,
        description="what ranks tokens for re-masking: the sampled token's probability, or the "
                    "backbone's own critic (variants that return aux['confidence'], e.g. mamba-critic)")


class EvalSpec(Closed):
    n_images: int = Field(500, ge=2, description="generated images scored (captions from the test split)")
    fid_domain: bool = True
    inception_weights: Optional[str] = Field(
        None, description="local FID Inception weights file; `fid` is computed only when given")
    clip_model: Optional[str] = Field(
        None, description="local CLIP model directory; `clip_score` is computed only when given")
    judge_steps: int = Field(600, ge=1, description="training steps of the dataset's judge classifier")
    blank_threshold: float = Field(0.02, ge=0, description="pixel std below which an image counts as blank")
    judge_batch_size: int = Field(128, ge=1, description="batch size of the judge's training")
    judge_lr: float = Field(3e-3, gt=0, description="peak learning rate of the judge (AdamW, cosine)")
    judge_width: int = Field(32, ge=4, description="channels of the judge's conv trunk")
    fragment_components: int = Field(
        3, ge=1, description="an image with more foreground components than this counts as fragments")
    # the domain CLIP judge: a small contrastive image-text model trained on the real pairs
    clip_judge: Optional[bool] = Field(
        None, json_schema_extra=LATER,
        description="the domain CLIP judge (clip_domain, and fid_domain/kid_domain on data without "
                    "attribute labels): null = wherever the train split has enough pairs, true = "
                    "required (an error where it cannot be trained), false = off")
    clip_steps: int = Field(500, ge=1, json_schema_extra=LATER,
                            description="training steps of the domain CLIP judge")
    clip_batch_size: int = Field(128, ge=2, json_schema_extra=LATER,
                                 description="pairs per step of the CLIP judge (its InfoNCE negatives)")
    clip_lr: float = Field(2e-3, gt=0, json_schema_extra=LATER, description="peak learning rate of the CLIP judge")
    clip_width: int = Field(32, ge=4, json_schema_extra=LATER, description="channels of the CLIP judge's image tower")
    clip_images: int = Field(50000, ge=2, json_schema_extra=LATER,
                             description="streamed data: training pairs the CLIP judge reads (the first N)")
    # sample-sheet snapshots only observe training (own RNG, EMA weights, no_grad): same results
    sheet_prompts: int = Field(
        6, ge=0, le=64, json_schema_extra=LATER,
        description="sample sheets: decode the first N test captions at each snapshot step (0: none)")
    sheet_steps: list[int] = Field(
        default_factory=list, json_schema_extra=LATER,
        description="training steps of the sample-sheet snapshots (empty: every validation step, "
                    "i.e. each train.eval_every and the last)")
    temperature_sheet: list[float] = Field(
        default_factory=list, json_schema_extra=LATER,
        description="after evaluation, a sheet of the first sheet_prompts test captions (at least 8) sampled "
                    "at each of these temperatures, one row each (seed 004's temperature study; empty: none)")

    @field_validator("sheet_steps")
    @classmethod
    def _positive_steps(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v):
            raise ValueError(f"eval.sheet_steps must be training steps >= 1, got {v}")
        return sorted(set(v))


class SlurmSpec(Closed):
    """sbatch settings for each job when the grid runs on a Slurm cluster."""

    partition: Optional[str] = None
    gpus_per_job: int = Field(1, ge=0)
    cpus_per_job: int = Field(8, ge=1)
    mem_gb: int = Field(32, ge=1)
    time_min: int = Field(240, ge=1, description="wall-clock limit per job; longer runs requeue from their checkpoint")
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = Field(32, ge=1, description="jobs of the array running at once")
    nodes: int = Field(1, ge=1, description="nodes per cell: each runs one task per GPU (gpus_per_job), "
                                            "or launcher.tasks_per_job tasks without GPUs")
    extra: dict[str, Any] = Field(default_factory=dict, description="further sbatch options, e.g. {exclude: node3}")


class LauncherSpec(Closed):
    """Where jobs run. Not part of a run's key: the same cell on another executor is the same cell."""

    executor: Literal["local", "slurm", "debug", "auto"] = Field(
        "local", description="auto: slurm when sbatch is on PATH, else local")
    jobs: int = Field(2, ge=1, description="concurrent local jobs (at most one per GPU on a GPU machine)")
    cpus_per_job: int = Field(1, ge=1, description="torch threads of a local job")
    timeout_min: int = Field(60, ge=1, description="time limit of a local job")
    lost_after_s: float = Field(180.0, gt=0, description="a running cell whose heartbeat is older is lost, then resumed")
    prepare_tasks: int = Field(0, ge=0, description="streaming data: tasks that encode the shards into the "
                                                    "token store (0: one per local job slot, 16 on Slurm)")
    tasks_per_job: int = Field(
        1, ge=1, description="processes (ranks) training one cell together with DDP: locally, and per node on "
                             "Slurm without GPUs (with GPUs: one per GPU); the global batch is "
                             "train.batch_size x ranks x train.grad_accum")
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)


RUN_SECTIONS = ("data", "tokenizer", "text", "model", "train", "sample", "eval")


class RunSpec(Closed):
    """One cell of a grid: everything that determines its result. Hash it with :func:`run_key`."""

    data: DataSpec = Field(default_factory=DataSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    text: TextSpec = Field(default_factory=TextSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    sample: SampleSpec = Field(default_factory=SampleSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    seed: int = 0

    @model_validator(mode="after")
    def _stages_end_at_data_size(self) -> "RunSpec":
        sizes = [st.image_size for st in self.tokenizer.stages]
        if sizes and (sizes[-1] != self.data.image_size or max(sizes) > self.data.image_size):
            raise ValueError(f"tokenizer.stages image sizes {sizes} must end at data.image_size "
                             f"({self.data.image_size}) and never exceed it: the last stage trains at "
                             "the resolution the tokenizer encodes")
        return self


def paradigm_problem(spec: RunSpec) -> Optional[str]:
    """Why ``spec``'s paradigm and tokenizer do not fit together, or None. Checked per cell (a
    grid's base may set one and an axis the other), and by the trainer."""
    t = spec.tokenizer
    if (spec.model.paradigm == "var") != (t.kind == "multiscale"):
        return ("model.paradigm: var predicts the scales of a multiscale tokenizer and only var reads them; "
                f"set both or neither (paradigm {spec.model.paradigm}, tokenizer.kind {t.kind})")
    if t.kind == "multiscale":
        side = spec.data.image_size // t.downsample
        if t.scales[-1] != side:
            return (f"tokenizer.scales: must end at the grid side {side} (data.image_size {spec.data.image_size} "
                    f"/ tokenizer.downsample {t.downsample}); got {t.scales}")
    return None


def canonical_json(obj: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, floats as Python reprs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, n: int = 16) -> str:
    """First ``n`` hex digits of the SHA-256 of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def drop_later_defaults(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    """``dumped`` without the fields marked ``LATER`` that hold their default, recursively."""
    out = dict(dumped)
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("later") and value == field.get_default(call_default_factory=True):
            out.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(out.get(name), dict):
            out[name] = drop_later_defaults(value, out[name])
    return out


def run_key(spec: RunSpec) -> str:
    """The cell's identity: a hash of the fully resolved spec (resolve variant params first).

    A field added to the schema after runs were recorded is declared with
    ``json_schema_extra=LATER`` and a default that keeps the old behaviour; while it holds that
    default it is left out of the hash, so the runs already in a database keep their keys."""
    return content_hash(drop_later_defaults(spec, spec.model_dump(mode="json")))


def config_key(spec: RunSpec) -> str:
    """The configuration's identity: :func:`run_key` without the seed. Runs that share it are
    seeds of one configuration, the only runs the table may average together."""
    return stored_config_key(spec.model_dump(mode="json"))


def _drop_later_dict(model: type[BaseModel], d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (a stored dump of ``model``) without the ``LATER`` fields that hold their default."""
    out = dict(d)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        sub = field.annotation
        if extra.get("later"):
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            if out[name] == (list(default) if isinstance(default, tuple) else default):
                out.pop(name)
        elif isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(out[name], dict):
            out[name] = _drop_later_dict(sub, out[name])
    return out


def stored_config_key(spec: dict[str, Any]) -> str:
    """:func:`config_key` of a spec as stored with a run (its resolved JSON dump), computed on
    the stored values as they are: a field the stored spec lacks (written before the field
    existed) is not filled in, so a run made before a key-changing field was added never
    shares a configuration with runs made after it; fields added as ``LATER`` are left out at
    their default, as :func:`run_key` does."""
    d = _drop_later_dict(RunSpec, {k: v for k, v in spec.items() if k != "seed"})
    return content_hash(d)


def format_validation_error(err: Exception, source: str = "") -> str:
    """One line from a pydantic ValidationError: the dotted field, the problem, the source."""
    from pydantic import ValidationError

    where = f"{source}: " if source else ""
    if isinstance(err, ValidationError):
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = _model_at(RunSpec, e["loc"][:-1])
            if parent is not None:
                msg += f" (accepted: {', '.join(sorted(parent.model_fields))})"
        elif e["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be")
        elif e["type"] == "value_error":  # a validator's own message, which names its fields
            msg = msg.removeprefix("Value error, ")
        more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        got = e.get("input")
        got_s = f"; got {got!r}" if got is not None and not isinstance(got, dict) and e["type"] != "extra_forbidden" else ""
        return f"{where}{loc + ': ' if loc else ''}{msg}{got_s}{more}"
    return f"{where}{err}"


def _model_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The nested model class at ``loc`` under ``model`` (for listing accepted keys)."""
    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        cur = ann
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None
