"""MaskGIT iterative parallel decoding with classifier-free guidance (Muse).

At step s of S (ratio r = (s+1)/S) every still-masked token is sampled; the least confident
``floor(L * cos(pi/2 * r))`` of the newly sampled ones are masked again. Confidence is the log
probability of the sampled token plus Gumbel noise scaled by ``choice_temperature * (1 - r)``,
so early steps explore and the last step is greedy. Tokens once decided never change.
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
from typing import Optional

import torch

from ..config import SampleSpec


def guidance_at(spec: SampleSpec, step: int) -> float:
    """Guidance scale ``t`` at decoding step ``step`` (0-based)."""
    r = (step + 1) / spec.steps
    if spec.guidance_schedule == "constant":
        return spec.guidance
    if spec.guidance_schedule == "linear":
        return spec.guidance * r
    return spec.guidance * 0.5 * (1 - math.cos(math.pi * r))


def gumbel(shape: torch.Size, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device).to(device)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))


@torch.no_grad()
def guided_logits(model, tokens: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor,
                  null_feats: torch.Tensor, null_mask: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 + t) l_c - t l_u`` in one batched forward (conditional and null caption stacked)."""
    if t == 0:
        return model(tokens, feats, mask)[0]
    b = tokens.shape[0]
    nf = null_feats.to(feats.dtype).expand(b, *feats.shape[1:])
    nm = null_mask.expand(b, -1)
    logits = model(torch.cat([tokens, tokens]), torch.cat([feats, nf]), torch.cat([mask, nm]))[0]
    cond, uncond = logits[:b], logits[b:]
    return (1 + t) * cond - t * uncond


@torch.no_grad()
def critic_confidence(model, tokens: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The backbone's logit that each token of ``tokens [B, L]`` is the true one, given the
    others and the caption: ``[B, L]``. Pass the filled-in sequence (no ``[MASK]`` where the
    tokens to rank are): the critic judges the token it sees."""
    _, aux = model(tokens, feats, mask)
    if "confidence" not in aux:
        raise ValueError("sample.remask: 'critic' needs a variant whose backbone returns "
                         "aux['confidence'] (e.g. mamba-critic); use remask: confidence")
    return aux["confidence"].float()


@torch.no_grad()
def sample_tokens(model, feats: torch.Tensor, mask: torch.Tensor, null_feats: torch.Tensor,
                  null_mask: torch.Tensor, spec: SampleSpec, generator: Optional[torch.Generator] = None,
                  init: Optional[torch.Tensor] = None) -> torch.Tensor:
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
