"""``masked``: Muse / MaskGIT. Training masks a cosine-scheduled share of the tokens and predicts
them; sampling is iterative parallel decoding with classifier-free guidance.

Sampling. At step s of S (ratio r = (s+1)/S) every still-masked token is sampled; the least
confident ``floor(L * cos(pi/2 * r))`` of the newly sampled ones are masked again. Confidence is
the log probability of the sampled token plus Gumbel noise scaled by ``choice_temperature *
(1 - r)``, so early steps explore and the last step is greedy. Tokens once decided never change.
Guidance: ``l_g = (1 + t) l_c - t l_u`` with ``t`` rising over the steps (Muse).
With ``remask: critic`` the confidence is instead the backbone's own critic, scored after
filling in: every masked position gets its sampled token, the model runs (conditional pass, one
extra forward per step) on that filled-in sequence, and ``aux["confidence"]``, the critic's logit
that the token at each position is the true one, ranks the new tokens, plus the same annealed
Gumbel noise. This is Token-Critic's premise (Lezama et al. 2022: the critic reads the sampled
sequence and tells real tokens from generated ones), and what mamba-critic's critic is trained
on: a token judged in its context, the sampled token itself visible. Scoring the partially
masked input instead would ask the critic about a token it cannot see (the input there is
``[MASK]``) and that is not the one sampled.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import SampleSpec
from .base import Batch, Paradigm, guidance_at, guided_logits, gumbel, rows, with_aux


def mask_ratio(u: Tensor) -> Tensor:
    """Muse's cosine schedule: share of tokens masked, ``r = cos(pi/2 * u)`` for ``u ~ U(0, 1)``."""
    return torch.cos(0.5 * math.pi * u)


def random_mask(codes: Tensor, mask_id: int, generator: Optional[torch.Generator] = None,
                share: tuple[int, int] = (0, 1), return_total: bool = False) -> tuple[Tensor, ...]:
    """Mask each row of ``codes: [B, L]`` at a cosine-scheduled ratio (at least one token).

    Returns ``(inputs [B, L] with mask_id at masked places, masked [B, L] bool)``, and with
    ``return_total`` the number of masked tokens in the whole global batch. ``share = (s, S)``:
    ``codes`` are rows ``s::S`` of a global batch of ``S * B`` rows (a rank's or a micro-batch's
    part); the random numbers are drawn for the global batch and this share's rows kept, so S
    shares are masked exactly as the one global batch would be.
    """
    b, length = codes.shape
    u = torch.rand(b * share[1], generator=generator, device="cpu")
    n_all = torch.clamp((mask_ratio(u) * length).ceil().long(), 1, length)  # [S*B]
    scores = rows(torch.rand(b * share[1], length, generator=generator, device="cpu"), share).to(codes.device)
    n_mask = rows(n_all, share).to(codes.device)  # [B]
    # the n_mask smallest scores of each row are masked: rank < n_mask
    ranks = scores.argsort(dim=1).argsort(dim=1)
    masked = ranks < n_mask.unsqueeze(1)
    inputs = torch.where(masked, torch.full_like(codes, mask_id), codes)
    return (inputs, masked, int(n_all.sum())) if return_total else (inputs, masked)


def masked_loss(logits: Tensor, codes: Tensor, masked: Tensor, label_smoothing: float = 0.0,
                total: Optional[int] = None) -> Tensor:
    """Cross-entropy on masked positions only. ``logits: [B, L, K]``, ``codes, masked: [B, L]``.
    The mean over them, or with ``total`` their sum / ``total`` (a share's part of the global
    batch's mean: the shares' parts add up to it exactly)."""
    if total is None:
        return F.cross_entropy(logits[masked], codes[masked], label_smoothing=label_smoothing)
    return F.cross_entropy(logits[masked], codes[masked], label_smoothing=label_smoothing, reduction="sum") / total


@torch.no_grad()
def critic_confidence(model: Any, tokens: Tensor, feats: Tensor, mask: Tensor) -> Tensor:
    """The backbone's logit that each token of ``tokens [B, L]`` is the true one, given the
    others and the caption: ``[B, L]``. Pass the filled-in sequence (no ``[MASK]`` where the
    tokens to rank are): the critic judges the token it sees."""
    _, aux = model(tokens, feats, mask)
    if "confidence" not in aux:
        raise ValueError("sample.remask: 'critic' needs a variant whose backbone returns "
                         "aux['confidence'] (e.g. mamba-critic); use remask: confidence")
    return aux["confidence"].float()


@torch.no_grad()
def sample_tokens(model: Any, feats: Tensor, mask: Tensor, null_feats: Tensor, null_mask: Tensor,
                  spec: SampleSpec, generator: Optional[torch.Generator] = None,
                  init: Optional[Tensor] = None) -> Tensor:
    """Decode ``[B, L]`` codes for captions ``feats``/``mask`` (``[B, T(, Dt)]``, ``[B, T]``).

    ``init``: optional ``[B, L]`` tokens where ``model.mask_id`` marks what to generate; the
    other tokens are kept as given (inpainting). Returns codes in ``[0, K)``, none masked.
    """
    device = feats.device
    b, length, mask_id = feats.shape[0], model.seq_len, model.mask_id
    tokens = torch.full((b, length), mask_id, dtype=torch.long, device=device) if init is None else init.clone()
    for s in range(spec.steps):
        r = (s + 1) / spec.steps
        is_masked = tokens == mask_id  # [B, L]
        n_masked = is_masked.sum(1)  # [B]
        if int(n_masked.max()) == 0:
            break
        logits = guided_logits(model, tokens, feats, mask, null_feats, null_mask, guidance_at(spec, s)).float()
        logits = logits / spec.temperature
        sampled = (logits + gumbel(logits.shape, generator, device)).argmax(-1)  # [B, L] Gumbel-max sample
        sampled = torch.where(is_masked, sampled, tokens)
        if spec.remask == "critic":  # scored after filling in: the critic sees the sampled tokens
            logp = critic_confidence(model, sampled, feats, mask)
        else:
            logp = torch.log_softmax(logits, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        conf = logp + spec.choice_temperature * (1 - r) * gumbel(logp.shape, generator, device)
        conf = torch.where(is_masked, conf, torch.full_like(conf, math.inf))
        # how many stay masked after this step: the schedule, but at least one token decided per step
        keep = 0 if s == spec.steps - 1 else math.floor(length * math.cos(0.5 * math.pi * r))
        n_keep = torch.clamp(torch.full_like(n_masked, keep), max=(n_masked - 1).clamp_min(0))
        ranks = conf.argsort(dim=1).argsort(dim=1)  # 0 = least confident
        remask = ranks < n_keep.unsqueeze(1)
        tokens = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
    return tokens


def critic_loss(logits: list[Tensor], label: Tensor, where: Tensor) -> Tensor:
    """Token-Critic's loss: the mean over critics of the BCE of each critic's logits ``[B, L]``
    against ``label [B, L]`` (1 = the token there is the true one), averaged over the ``where``
    positions only (the masked ones: elsewhere the token is the truth by construction); 0 when
    there are none."""
    w = where.to(logits[0].dtype)
    n = w.sum().clamp_min(1)
    losses = [(F.binary_cross_entropy_with_logits(z, label.to(z.dtype), reduction="none") * w).sum() / n
              for z in logits]
    return torch.stack(losses).mean()


class Masked(Paradigm):
    """A backbone with a ``critic`` pass (mamba-critic) is also trained as a token critic: the
    generator's own sample fills the masked positions (temperature 1, the global RNG, seeded per
    step by the trainer), the true codes the others, and ``critic_weight *``
    :func:`critic_loss` of the critics' logits on that sequence joins the loss."""

    name = "masked"
    causality = "none"

    def make_batch(self, codes: Tensor, g: Optional[torch.Generator], share: tuple[int, int] = (0, 1)) -> Batch:
        inputs, masked, total = random_mask(codes, self.special, generator=g, share=share, return_total=True)
        return Batch(inputs, codes, masked, total)

    def loss(self, net: Any, batch: Batch, feats: Tensor, mask: Tensor, label_smoothing: float = 0.0,
             share: tuple[int, int] = (0, 1)) -> Tensor:
        targets, where = batch.targets, batch.where

        def fill(logits: Tensor) -> Tensor:  # the critic's sequence: own sample where masked, truth elsewhere
            probs = torch.softmax(logits.float(), dim=-1)  # [B, L, K]
            sampled = torch.multinomial(probs.flatten(0, 1), 1).view_as(targets)
            return torch.where(where, sampled, targets)

        logits, aux = net(batch.inputs, feats, mask, fill=fill)
        loss = masked_loss(logits, targets, where, label_smoothing, total=None if share[1] == 1 else batch.total)
        if "critic_logits" in aux:
            aux = dict(aux)
            aux["loss/critic"] = aux["critic_weight"] * critic_loss(aux["critic_logits"], aux["critic_fill"] == targets,
                                                                    where)
        return with_aux(loss, aux, share)

    def sample(self, net: Any, feats: Tensor, mask: Tensor, null_feats: Tensor, null_mask: Tensor,
               spec: SampleSpec, generator: Optional[torch.Generator] = None) -> Tensor:
        return sample_tokens(net, feats, mask, null_feats, null_mask, spec, generator)
