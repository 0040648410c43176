"""The standard metrics, from local weights only: ``fid`` (Inception pool3 features, torch-fidelity's
FID network) and ``clip_score`` (a transformers CLIP model), plus the checks that fail early when
their weights are asked for but absent. Nothing here downloads anything."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ablate.compat import bare_torch_fidelity
from ablate.config import EvalSpec
from ablate.utils import expand_path

_CHUNK = 256


def import_torch_fidelity() -> bool:
    """True if torch-fidelity's Inception extractor can be imported (see :mod:`ablate.compat`)."""
    import importlib.util

    bare_torch_fidelity()
    return importlib.util.find_spec("torch_fidelity.feature_extractor_inceptionv3") is not None


def _feed(metric, fake: torch.Tensor, real: torch.Tensor, device: torch.device):
    for imgs, is_real in ((real, True), (fake, False)):
        for i in range(0, imgs.shape[0], _CHUNK):
            metric.update(imgs[i:i + _CHUNK].to(device), real=is_real)
    return metric.compute()


def check_eval_spec(spec: EvalSpec) -> None:
    """Fail early (one line naming the field) when an optional metric is asked for but cannot run."""
    if spec.inception_weights is not None:
        if not Path(expand_path(spec.inception_weights, "eval.inception_weights")).is_file():
            raise FileNotFoundError(f"eval.inception_weights: no file at {spec.inception_weights!r} "
                                    "(a local FID Inception weights .pth; nothing is downloaded)")
        if not import_torch_fidelity():
            raise ImportError("eval.inception_weights needs torch-fidelity (pip install 'ablate[scale]'), "
                              "or leave it unset")
    if spec.clip_model is not None and not (Path(expand_path(spec.clip_model, "eval.clip_model"))
                                            / "config.json").is_file():
        raise FileNotFoundError(f"eval.clip_model: {spec.clip_model!r} is not a local transformers CLIP "
                                "directory (with config.json and the processor files)")


def inception_fid(weights: str, fake: torch.Tensor, real: torch.Tensor, device: torch.device) -> float:
    """Standard FID (Inception pool3, 2048-d) with weights from a local file."""
    import_torch_fidelity()
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=False,
                                      feature_extractor_weights_path=str(weights)).to(device)
    return float(_feed(metric, fake, real, device))


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


def clip_score(model_dir: str, images: torch.Tensor, captions: list[str], device: torch.device) -> float:
    """Mean torchmetrics CLIPScore (100 * cosine, floored at 0) of images and their captions,
    with a CLIP model and processor loaded from a local directory only."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
        return _ClipEmbeddings(model), CLIPProcessor.from_pretrained(model_dir, local_files_only=True)

    metric = CLIPScore(model_name_or_path=load).to(device)
    with torch.no_grad():
        for i in range(0, images.shape[0], _CHUNK):
            metric.update(list(images[i:i + _CHUNK].to(device)), captions[i:i + _CHUNK])
    return float(metric.compute())
