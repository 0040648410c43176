"""The standard metrics, from local weights only, with their reference values on real images.

- ``fid``: the Frechet distance between 2048-d Inception pool3 features of torch-fidelity's
  ``FeatureExtractorInceptionV3`` (uint8 images of any size, resized to 299 x 299 with its
  TF-1.x-compatible bilinear resize, the original FID's) with the weights of
  ``eval.inception_weights``: torch-fidelity's ``pt_inception-2015-12-05`` file
  (``ablate weights fetch inception``). torchmetrics' ``FrechetInceptionDistance`` accumulates the
  statistics. torchmetrics' own Inception (``feature=2048``) resizes with antialiasing by
  default, which is not the standard FID resize, and unpickles the file unsafely; so the extractor
  is built here, once per process and file, with weights this module loaded with
  ``weights_only=True`` and checked key by key and shape by shape.
- ``fid_real``: FID between two disjoint real samples of the same n, the floor that ``fid``
  is read against (FID is biased upwards at small n).
- ``clip_score``: torchmetrics ``CLIPScore`` with the transformers CLIP directory of
  ``eval.clip_model``; ``clip_score_real`` (real test images with their own captions: the
  ceiling) and ``clip_score_shuffled`` (with captions deranged by a fixed seed: chance level).

:func:`check_eval_spec` checks both settings before any job runs (``ablate run`` and
``ablate prepare`` call it through ``ablate.grid.check_inputs``); a bad value is a one-line
:class:`~ablate.config.ConfigError` naming the field. Nothing here downloads anything.
"""
from __future__ import annotations

import functools
import json
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ablate.compat import bare_torch_fidelity
from ablate.config import ConfigError, EvalSpec
from ablate.utils import expand_path

_CHUNK = 256  # images per CLIP (and judge) forward pass
INCEPTION_CHUNK = 32  # Inception runs at 299 x 299: ~100 MB of activations per image
# torchmetrics syncs a metric across the process group when one exists: a cell's ranks train
# together, but each scores its own images (rank 0 all of them), so never sync
LOCAL = {"sync_on_compute": False}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
_WANT_INCEPTION = (f"expected torch-fidelity's Inception weights {INCEPTION_FILE}, a state dict of "
                   "FeatureExtractorInceptionV3 (`ablate weights fetch inception` downloads it)")
_COUNTER = ".num_batches_tracked"  # BatchNorm counters: absent from torch-fidelity's file, harmless if present
_WANT_CLIP = ("expected a local transformers CLIP directory: config.json (model_type clip), the weights, "
              "preprocessor_config.json and the tokenizer files (`ablate weights fetch clip-b32` writes one)")
_CLIP_FILES = {  # what a CLIP directory needs: any one name of each group
    "the weights (model.safetensors or pytorch_model.bin)": (
        "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json"),
    "the image processor config (preprocessor_config.json)": ("preprocessor_config.json", "processor_config.json"),
    "the tokenizer (tokenizer.json, or vocab.json and merges.txt)": ("tokenizer.json", "vocab.json+merges.txt"),
}
_PATCH = threading.Lock()


class MissingFile(ConfigError, FileNotFoundError):
    """A path setting that names nothing: bad input (exit 2 at the command line) and a missing file."""


def import_torch_fidelity() -> bool:
    """True if torch-fidelity's Inception extractor can be imported (see :mod:`ablate.compat`)."""
    import importlib.util

    bare_torch_fidelity()
    return importlib.util.find_spec("torch_fidelity.feature_extractor_inceptionv3") is not None


def _feed(metric, fake: torch.Tensor, real: torch.Tensor, device: torch.device, chunk: int = _CHUNK):
    """Update a two-set torchmetrics metric with uint8 [n, 3, H, W] ``real`` then ``fake`` in
    chunks of ``chunk`` images; its ``compute()``."""
    with torch.no_grad():
        for imgs, is_real in ((real, True), (fake, False)):
            for i in range(0, imgs.shape[0], chunk):
                metric.update(imgs[i:i + chunk].to(device), real=is_real)
        return metric.compute()


def _files_key(path: Path) -> tuple:
    """Identity of a file, or of a directory's files: resolved path, names, mtimes and sizes."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return str(path.resolve()), tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)


# -- Inception ------------------------------------------------------------------------------

def _extractor() -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` ('2048' features, eval mode, no grad)
    with random weights on the current default device: its constructor's own weight loading
    (a download without a path, ``torch.load(weights_only=False)`` with one) is bypassed, so
    the caller loads weights it has checked."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    class Unloaded(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # noqa: ANN001
            return super().load_state_dict(state_dict, *args, **kwargs) if state_dict else None

    with _PATCH:  # the constructor calls this module-level loader when given no path
        fetch = tfi.load_state_dict_from_url
        tfi.load_state_dict_from_url = lambda *args, **kwargs: {}
        try:
            return Unloaded("inception-v3-compat", ["2048"])
        finally:
            tfi.load_state_dict_from_url = fetch


@functools.lru_cache(maxsize=1)
def inception_layout() -> dict[str, tuple[int, ...]]:
    """Every tensor torch-fidelity's extractor holds, name -> shape, read off the module built
    on the meta device (no weights, no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in _extractor().state_dict().items()}


def _require_torch_fidelity() -> None:
    if not import_torch_fidelity():
        raise ConfigError("eval.inception_weights needs torch-fidelity: pip install --no-deps torch-fidelity==0.4.0 "
                          "(--no-deps: it declares torchvision, which would pull a CUDA torch), or leave it unset")


def _load_error(exc: Exception) -> str:
    """The informative line of a failed ``torch.load``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return f"refused: {lines[i + 1]}"
        if "WeightsUnpickler error:" in ln:
            return "refused: " + ln.split("WeightsUnpickler error:", 1)[1].strip()
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def load_inception_state(path: Path) -> dict[str, torch.Tensor]:
    """The checked state dict of an Inception weights file, loaded with ``weights_only=True``
    (tensors and plain containers only: nothing in the file runs). Raises a one-line
    ConfigError when it is not a dict of tensors with exactly the extractor's names and shapes
    (BatchNorm ``num_batches_tracked`` counters may be absent, as in torch-fidelity's file; they
    are filled in)."""
    where = f"eval.inception_weights: {path}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # text, an arbitrary pickle, a truncated zip: all bad input here
        raise ConfigError(f"{where} is not a PyTorch state dict that loads with torch.load(weights_only=True) "
                          f"({_load_error(exc)}); {_WANT_INCEPTION}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{where} holds a {type(state).__name__}, not a state dict; {_WANT_INCEPTION}")
    odd = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise ConfigError(f"{where}: entry {odd!r} is a {type(state[odd]).__name__}, not a tensor "
                          f"(a state dict maps names to tensors); {_WANT_INCEPTION}")
    layout = inception_layout()
    missing = [k for k in layout if k not in state and not k.endswith(_COUNTER)]
    if missing:
        raise ConfigError(f"{where} lacks {len(missing)} of the extractor's {len(layout)} tensors "
                          f"(first: {missing[0]!r}); {_WANT_INCEPTION}")
    extra = [k for k in state if k not in layout]
    if extra:
        raise ConfigError(f"{where} has {len(extra)} tensors the extractor does not "
                          f"(first: {extra[0]!r}); {_WANT_INCEPTION}")
    for k, v in state.items():
        if tuple(v.shape) != layout[k]:
            raise ConfigError(f"{where}: {k!r} has shape {tuple(v.shape)}, the extractor's is {layout[k]}; "
                              f"{_WANT_INCEPTION}")
        if not k.endswith(_COUNTER) and not v.is_floating_point():
            raise ConfigError(f"{where}: {k!r} is {v.dtype}, not floating point; {_WANT_INCEPTION}")
    counters = {k: torch.zeros((), dtype=torch.long) for k in layout if k.endswith(_COUNTER)}
    return {**counters, **state}


@functools.lru_cache(maxsize=16)
def _checked(key: tuple) -> None:
    """Cached per (path, mtime, size): a file is read once per process; failures are not cached."""
    load_inception_state(Path(key[0]))


def check_inception_weights(value: str) -> Path:
    """The path of ``eval.inception_weights`` (``~`` and ``$VARS`` expanded) once its file is
    checked (:func:`load_inception_state`); MissingFile when there is no file."""
    path = Path(expand_path(value, "eval.inception_weights"))
    if not path.is_file():
        raise MissingFile(f"eval.inception_weights: no file at {value!r}; {_WANT_INCEPTION}; nothing is "
                          "downloaded at run time")
    _require_torch_fidelity()
    _checked(_files_key(path))
    return path


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception as a torchmetrics feature extractor: uint8 [B, 3, H, W]
    (any H, W) -> float32 [B, 2048] pool3 features. ``num_features`` spares torchmetrics its
    probe forward pass."""

    num_features = 2048

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0]


@functools.lru_cache(maxsize=1)
def _inception(key: tuple) -> InceptionFeatures:
    net = _extractor()
    net.load_state_dict(load_inception_state(Path(key[0])))  # strict: every name and shape
    return InceptionFeatures(net)


def inception_features(value: str) -> InceptionFeatures:
    """The feature network of ``eval.inception_weights``, built once per process and file (the
    cached module moves to whichever device a metric is moved to)."""
    return _inception(_files_key(check_inception_weights(value)))


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`` of means [F] and
    covariances [F, F], float64. The last trace is the sum of the square roots of the
    eigenvalues of ``sigma1 @ sigma2``, here read from the symmetric matrix ``r sigma2 r`` with
    ``r = sigma1^(1/2)``, which has the same eigenvalues: two symmetric eigendecompositions
    instead of torchmetrics' general ``eigvals`` (at F = 2048 on 2 CPU cores ~2 s, not ~30 s).
    Eigenvalues below F * eps of the largest count as 0: with fewer images than features the
    covariances are singular, and the square roots of their rounding noise would add up."""
    def clean(w: torch.Tensor) -> torch.Tensor:
        return torch.where(w > w.max() * w.shape[0] * torch.finfo(w.dtype).eps, w, torch.zeros_like(w))

    w, v = torch.linalg.eigh(sigma1)
    root = (v * clean(w).sqrt()) @ v.T  # [F, F]
    c = clean(torch.linalg.eigvalsh(root @ sigma2 @ root)).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * c


@functools.lru_cache(maxsize=1)
def _fid_metric() -> type:
    """torchmetrics' ``FrechetInceptionDistance`` (its feature statistics, accumulated in
    float64) whose ``compute`` takes the trace term from :func:`frechet_distance`."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class FrechetDistance(FrechetInceptionDistance):
        def compute(self) -> torch.Tensor:
            stats = []
            for side in ("real", "fake"):
                n = getattr(self, f"{side}_features_num_samples")
                if n < 2:
                    raise RuntimeError(f"FID needs >= 2 {side} images, got {int(n)}")
                mean = getattr(self, f"{side}_features_sum") / n  # [F]
                cov = (getattr(self, f"{side}_features_cov_sum") - n * torch.outer(mean, mean)) / (n - 1)
                stats += [mean, cov]
            return frechet_distance(*stats)

    return FrechetDistance


def inception_fid(weights: str, fake: torch.Tensor, real: torch.Tensor, device: torch.device) -> float:
    """Standard FID (see the module docstring) between uint8 [n, 3, H, W] ``fake`` and [m, 3,
    H', W'] ``real`` (n, m >= 2; FID depends on n and m: compare values at equal sizes)."""
    metric = _fid_metric()(feature=inception_features(weights), normalize=False, **LOCAL).to(device)
    return float(_feed(metric, fake, real, device, INCEPTION_CHUNK))


# -- CLIP -----------------------------------------------------------------------------------

def check_clip_model(value: str) -> Path:
    """The directory of ``eval.clip_model`` once it looks like a transformers CLIP model: a
    config.json of ``model_type`` clip, weights, image processor config and tokenizer files
    (nothing is loaded). One-line ConfigError otherwise (MissingFile when nothing is there)."""
    path = Path(expand_path(value, "eval.clip_model"))
    if not path.is_dir():
        raise MissingFile(f"eval.clip_model: no directory at {value!r}; {_WANT_CLIP}")
    if not (path / "config.json").is_file():
        raise MissingFile(f"eval.clip_model: {path} has no config.json; {_WANT_CLIP}")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"eval.clip_model: {path / 'config.json'} is not JSON; {_WANT_CLIP}") from None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind != "clip":
        raise ConfigError(f"eval.clip_model: {path} holds a {kind!r} model, not CLIP; {_WANT_CLIP}")
    for what, names in _CLIP_FILES.items():
        if not any(all((path / n).is_file() for n in name.split("+")) for name in names):
            raise ConfigError(f"eval.clip_model: {path} lacks {what}; {_WANT_CLIP}")
    return path


class _ClipEmbeddings(nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors: since
    transformers 5 they return a model output (embeddings in ``pooler_output``), which
    torchmetrics 1.9's CLIPScore cannot normalise."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


@functools.lru_cache(maxsize=1)
def _clip(key: tuple) -> tuple[_ClipEmbeddings, Any]:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(key[0], local_files_only=True).eval()
    return _ClipEmbeddings(model), CLIPProcessor.from_pretrained(key[0], local_files_only=True)


def clip_score(model_dir: str, images: torch.Tensor, captions: list[str], device: torch.device) -> float:
    """torchmetrics CLIPScore of uint8 [n, 3, H, W] ``images`` and their ``captions`` (n of
    them): the mean over pairs of 100 * cosine(image, caption embedding), floored at 0 (the
    mean, not each pair). The model and processor load from the local directory only, once per
    process and directory."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(captions) != images.shape[0]:
        raise ValueError(f"clip_score: {images.shape[0]} images and {len(captions)} captions (need as many)")
    loaded = _clip(_files_key(check_clip_model(model_dir)))
    metric = CLIPScore(model_name_or_path=lambda: loaded, **LOCAL).to(device)
    with torch.no_grad():
        for i in range(0, images.shape[0], _CHUNK):
            metric.update(list(images[i:i + _CHUNK].to(device)), captions[i:i + _CHUNK])
        return float(metric.compute())


def derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation ``p`` of range(n) with no fixed point (n >= 2), the same for the same
    seed: item i is paired with item ``p[i]``. One random cycle through all n items, drawn
    from its own generator (the global RNG does not move)."""
    if n < 2:
        raise ValueError(f"derangement: need n >= 2, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = [0] * n
    for k, i in enumerate(order):
        out[i] = order[(k + 1) % n]
    return out


# -- the public face -------------------------------------------------------------------------

def check_eval_spec(spec: EvalSpec) -> None:
    """Fail early (one line naming the field) when an optional metric is asked for but cannot
    run: ``eval.inception_weights`` is not a loadable Inception state dict of the right names
    and shapes, or ``eval.clip_model`` is not a CLIP directory. Checks are cached per file, so
    calling this per run costs nothing after the first."""
    if spec.inception_weights is not None:
        check_inception_weights(spec.inception_weights)
    if spec.clip_model is not None:
        check_clip_model(spec.clip_model)


def standard_floors(reference: torch.Tensor, test: torch.Tensor, test_captions: list[str], n: int,
                    spec: EvalSpec, device: torch.device) -> dict[str, float]:
    """Reference values of the standard metrics on real images, at the generated set's size n:

    - ``fid_real``: FID of ``reference[:n]`` vs ``test[:n]``, two disjoint real samples (the
      floor of ``fid``, which compares n generated images with ``test[:n]``); needs
      ``eval.inception_weights`` and n >= 2.
    - ``clip_score_real``: CLIPScore of ``test[:n]`` with their own captions (the ceiling).
    - ``clip_score_shuffled``: the same images with the same captions deranged
      (:func:`derangement`, seed 0; chance level); n >= 2. Both need ``eval.clip_model``.

    ``reference``, ``test``: uint8 [m, 3, H, W] real images; where a set is smaller than n the
    values are of that smaller size. Returns only the values that could be computed."""
    for name, imgs in (("reference", reference), ("test", test)):
        if imgs.dtype != torch.uint8 or imgs.dim() != 4 or imgs.shape[1] != 3:
            raise ValueError(f"standard_floors: {name} must be uint8 [n, 3, H, W], got {imgs.dtype} {tuple(imgs.shape)}")
    check_eval_spec(spec)
    out: dict[str, float] = {}
    n_fid = min(n, len(reference), len(test))
    if spec.inception_weights is not None and n_fid >= 2:
        out["fid_real"] = inception_fid(spec.inception_weights, reference[:n_fid], test[:n_fid], device)
    n_clip = min(n, len(test), len(test_captions))
    if spec.clip_model is not None and n_clip >= 1:
        images, captions = test[:n_clip], list(test_captions[:n_clip])
        out["clip_score_real"] = clip_score(spec.clip_model, images, captions, device)
        if n_clip >= 2:
            shuffled = [captions[j] for j in derangement(n_clip)]
            out["clip_score_shuffled"] = clip_score(spec.clip_model, images, shuffled, device)
    return out
