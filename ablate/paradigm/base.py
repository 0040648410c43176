"""What every paradigm shares: the batch it trains on, the contract, classifier-free guidance.

A paradigm owns how images are generated from tokens; the backbone never knows. It makes a
training batch from codes (inputs, targets, where the loss counts), computes the loss of a
generator on it, and samples codes for captions. Everything random is drawn from the step's
generator for the whole global batch and a share keeps its rows (``share = (s, S)``: rows
``s::S``), so any split of a batch over ranks and micro-batches computes the same step.

Classifier-free guidance (Muse, seed 003) is the same for every paradigm: captions are dropped
to the null caption with probability ``train.cond_dropout`` (:func:`drop_text`), and sampling
mixes the logits as ``(1 + t) l_c - t l_u`` (:func:`guided_logits`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from ..config import SampleSpec


@dataclass
class Batch:
    """A share of a training batch: ``inputs [B, L]`` the tokens the generator reads,
    ``targets [B, L]`` the codes it should predict, ``where [B, L]`` bool the positions the
    loss counts, ``total`` their number in the whole global batch (None: this share's own)."""

    inputs: Tensor
    targets: Tensor
    where: Tensor
    total: Optional[int] = None


class Paradigm:
    """The contract; see the module docstring. ``causality``: what the backbone must be over the
    image sequence (``none``, ``causal``, ``block``); ``extra_tokens``: tokens beyond the K codes
    that the generator embeds (``[MASK]``, or the start token)."""

    name: ClassVar[str]
    causality: ClassVar[str]
    extra_tokens: ClassVar[int] = 1

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.special = codebook_size  # the one extra token's id: [MASK] or the start token

    def make_batch(self, codes: Tensor, g: Optional[torch.Generator], share: tuple[int, int] = (0, 1)) -> Batch:
        raise NotImplementedError

    def loss(self, net: Any, batch: Batch, feats: Tensor, mask: Tensor, label_smoothing: float = 0.0,
             share: tuple[int, int] = (0, 1)) -> Tensor:
        raise NotImplementedError

    def sample(self, net: Any, feats: Tensor, mask: Tensor, null_feats: Tensor, null_mask: Tensor,
               spec: SampleSpec, generator: Optional[torch.Generator] = None) -> Tensor:
        raise NotImplementedError

    def eval_loss(self, net: Any, batch: Batch, feats: Tensor, mask: Tensor) -> tuple[float, int]:
        """Validation: the summed cross-entropy (fp32, no smoothing, no auxiliary losses) over
        ``batch.where`` and how many positions that is."""
        logits = net(batch.inputs, feats, mask)[0].float()
        where = batch.where
        ce = torch.nn.functional.cross_entropy(logits[where], batch.targets[where], reduction="sum")
        return float(ce), int(where.sum())


class EveryPosition(Paradigm):
    """A paradigm whose batch predicts every position (next token, next scale): cross-entropy at
    each, :func:`full_loss`."""

    def loss(self, net: Any, batch: Batch, feats: Tensor, mask: Tensor, label_smoothing: float = 0.0,
             share: tuple[int, int] = (0, 1)) -> Tensor:
        return full_loss(net, batch, feats, mask, label_smoothing, share)


def rows(x: Tensor, share: tuple[int, int]) -> Tensor:
    """Rows ``s::S`` of ``x`` for ``share = (s, S)``: share s's part of a global draw."""
    s, n = share
    return x if n == 1 else x[s::n]


def aux_losses(aux: dict[str, Tensor]) -> dict[str, Tensor]:
    """The auxiliary losses among a backbone's outputs: entries named ``loss/<name>``."""
    return {k: v for k, v in aux.items() if k.startswith("loss/")}


def with_aux(loss: Tensor, aux: dict[str, Tensor], share: tuple[int, int]) -> Tensor:
    """``loss`` plus the backbone's auxiliary losses (means of their own: 1/S each per share)."""
    for v in aux_losses(aux).values():
        loss = loss + (v if share[1] == 1 else v / share[1])
    return loss


def full_loss(net: Any, batch: Batch, feats: Tensor, mask: Tensor, label_smoothing: float,
              share: tuple[int, int]) -> Tensor:
    """Cross-entropy at every position (next token, next scale): this share's part of the global
    batch's mean (``batch.total`` positions), plus the backbone's auxiliary losses."""
    logits, aux = net(batch.inputs, feats, mask)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                                           label_smoothing=label_smoothing, reduction="sum")
    return with_aux(ce / batch.total, aux, share)


def drop_text(feats: Tensor, mask: Tensor, null_feats: Tensor, null_mask: Tensor, p: float,
              generator: Optional[torch.Generator] = None, share: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor]:
    """Replace each caption by the null caption with probability ``p`` (classifier-free guidance);
    ``share`` as in the module docstring. ``feats: [B, T(, Dt)]``, ``mask: [B, T]``;
    ``null_feats``/``null_mask`` have batch size 1."""
    if p <= 0:
        return feats, mask
    drop = rows(torch.rand(feats.shape[0] * share[1], generator=generator, device="cpu"), share)
    drop = drop.to(feats.device) < p  # [B]
    shape = (-1,) + (1,) * (feats.dim() - 1)
    feats = torch.where(drop.view(shape), null_feats.to(feats.dtype).expand_as(feats), feats)
    mask = torch.where(drop.view(-1, 1), null_mask.expand_as(mask), mask)
    return feats, mask


def guidance_at(spec: SampleSpec, step: int, steps: Optional[int] = None) -> float:
    """Guidance scale ``t`` at decoding step ``step`` (0-based) of ``steps`` (default: ``spec.steps``)."""
    r = (step + 1) / (steps or spec.steps)
    if spec.guidance_schedule == "constant":
        return spec.guidance
    if spec.guidance_schedule == "linear":
        return spec.guidance * r
    return spec.guidance * 0.5 * (1 - math.cos(math.pi * r))


def gumbel(shape: torch.Size, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device).to(device)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))


def cfg_mix(cond: Tensor, uncond: Tensor, t: float) -> Tensor:
    """Classifier-free guidance: ``(1 + t) l_c - t l_u``."""
    return (1 + t) * cond - t * uncond


@torch.no_grad()
def guided_logits(model: Any, tokens: Tensor, feats: Tensor, mask: Tensor, null_feats: Tensor, null_mask: Tensor,
                  t: float) -> Tensor:
    """``(1 + t) l_c - t l_u`` in one batched forward (conditional and null caption stacked)."""
    if t == 0:
        return model(tokens, feats, mask)[0]
    b = tokens.shape[0]
    nf = null_feats.to(feats.dtype).expand(b, *feats.shape[1:])
    nm = null_mask.expand(b, -1)
    logits = model(torch.cat([tokens, tokens]), torch.cat([feats, nf]), torch.cat([mask, nm]))[0]
    return cfg_mix(logits[:b], logits[b:], t)
