"""Masking, loss, caption dropout and the MaskGIT sampler's invariants."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ablate.config import SampleSpec
from ablate.paradigm import drop_text, guidance_at, mask_ratio, masked_loss, random_mask, sample_tokens


def test_random_mask_counts_follow_cosine_schedule():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 10, (4000, 64), generator=g)
    inp, masked = random_mask(codes, mask_id=10, generator=g)
    assert masked.sum(1).min() >= 1
    assert torch.equal(inp[masked], torch.full_like(inp[masked], 10))
    assert torch.equal(inp[~masked], codes[~masked])
    # E[cos(pi/2 u)] = 2/pi ~ 0.64 (Muse)
    assert abs(masked.float().mean().item() - 2 / math.pi) < 0.02
    assert mask_ratio(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_masked_loss_ignores_unmasked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    codes = torch.randint(0, 7, (2, 5))
    masked = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    a = masked_loss(logits, codes, masked)
    logits2 = logits.clone()
    logits2[~masked] = torch.randn_like(logits2[~masked]) * 100
    assert masked_loss(logits2, codes, masked) == pytest.approx(a.item())
    logits3 = logits.clone()
    logits3[0, 0, codes[0, 0]] += 5
    assert masked_loss(logits3, codes, masked) != pytest.approx(a.item())


def test_drop_text():
    feats = torch.arange(6).view(3, 2)
    mask = torch.ones(3, 2, dtype=torch.bool)
    nf, nm = torch.full((1, 2), -1), torch.tensor([[True, False]])
    f0, m0 = drop_text(feats, mask, nf, nm, 0.0)
    assert torch.equal(f0, feats) and torch.equal(m0, mask)
    f1, m1 = drop_text(feats, mask, nf, nm, 1.0)
    assert (f1 == -1).all() and torch.equal(m1, nm.expand(3, 2))
    g = torch.Generator().manual_seed(0)
    fb, _ = drop_text(torch.zeros(10000, 1), torch.ones(10000, 1, dtype=torch.bool), torch.ones(1, 1),
                      torch.ones(1, 1, dtype=torch.bool), 0.1, generator=g)
    assert abs(fb.mean().item() - 0.1) < 0.01


class Toy(nn.Module):
    """Prefers code (caption id + position) % K; the null caption (id -1) prefers code 0."""

    def __init__(self, k=16, length=12):
        super().__init__()
        self.codebook_size, self.mask_id, self.seq_len = k, k, length
        self.calls = []

    def forward(self, tokens, feats, mask):
        self.calls.append(tokens.clone())
        b, length = tokens.shape
        target = torch.where(feats[:, :1] >= 0, feats[:, :1] + torch.arange(length), torch.zeros(1, length).long()) % self.codebook_size
        logits = torch.nn.functional.one_hot(target, self.codebook_size).float() * 3.0
        return logits, {}


def test_sampler_invariants():
    toy = Toy()
    spec = SampleSpec(steps=6, guidance=2.0)
    feats = torch.tensor([[1], [5], [9]])
    mask = torch.ones(3, 1, dtype=torch.bool)
    nf, nm = torch.tensor([[-1]]), torch.ones(1, 1, dtype=torch.bool)
    init = torch.full((3, 12), toy.mask_id)
    init[:, 3] = 7  # a known token must survive every step
    out = sample_tokens(toy, feats, mask, nf, nm, spec, torch.Generator().manual_seed(0), init=init)
    assert out.shape == (3, 12)
    assert (out != toy.mask_id).all(), "every token decided at the end"
    assert (out[:, 3] == 7).all()
    masked_counts = []
    for tokens in toy.calls[::1]:
        masked_counts.append(int((tokens[:3] == toy.mask_id).sum(1)[0]))
    # decided tokens never change and the masked count never grows
    prev = None
    for tokens in toy.calls:
        t = tokens[:3]
        if prev is not None:
            decided = prev != toy.mask_id
            assert torch.equal(t[decided], prev[decided])
        prev = t
    assert masked_counts == sorted(masked_counts, reverse=True) and len(set(masked_counts)) == len(masked_counts)
    # with strong guidance the conditional preference wins everywhere except the pinned token
    expect = (feats + torch.arange(12)) % 16
    agree = (out == expect)
    agree[:, 3] = True
    assert agree.float().mean() > 0.95
    # deterministic under a seed
    toy2 = Toy()
    out2 = sample_tokens(toy2, feats, mask, nf, nm, spec, torch.Generator().manual_seed(0), init=init)
    assert torch.equal(out, out2)


def test_guidance_schedules():
    lin = SampleSpec(steps=4, guidance=2.0, guidance_schedule="linear")
    assert [guidance_at(lin, s) for s in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    const = SampleSpec(steps=4, guidance=2.0, guidance_schedule="constant")
    assert guidance_at(const, 0) == 2.0
    cos = SampleSpec(steps=4, guidance=2.0, guidance_schedule="cosine")
    vals = [guidance_at(cos, s) for s in range(4)]
    assert vals == sorted(vals) and vals[-1] == pytest.approx(2.0)


class CriticToy(nn.Module):
    """Logits prefer code 1 everywhere; the critic trusts only even positions."""
    codebook_size, mask_id, seq_len = 4, 4, 8

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, tokens, feats, mask):
        self.calls += 1
        b, length = tokens.shape
        logits = torch.zeros(b, length, 4)
        logits[..., 1] = 5.0
        conf = torch.where(torch.arange(length) % 2 == 0, 10.0, -10.0).expand(b, length)
        return logits, {"confidence": conf}


def _critic_sampling():
    """Two greedy decoding steps ranked by the critic, for one-token captions and a null caption:
    (spec, feats, mask, null feats, null mask)."""
    spec = SampleSpec(steps=2, guidance=0.0, choice_temperature=0.0, remask="critic")
    return (spec, torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool), torch.zeros(1, 1),
            torch.ones(1, 1, dtype=torch.bool))


def test_sampler_critic_remask_uses_the_backbones_confidence():
    spec, feats, mask, nf, nm = _critic_sampling()
    toy = CriticToy()
    # after step 1 of 2 the schedule keeps floor(8 cos(pi/4)) = 5 masked: the 4 odd positions
    # (critic -10) and one even one; a second pass per step asks the critic
    sample_tokens(toy, feats, mask, nf, nm, spec, torch.Generator().manual_seed(0))
    assert toy.calls == 4
    toy2 = CriticToy()
    seen = []
    orig = toy2.forward
    toy2.forward = lambda t, f, m: (seen.append(t.clone()), orig(t, f, m))[1]
    sample_tokens(toy2, feats, mask, nf, nm, spec, torch.Generator().manual_seed(0))
    after_first = seen[2]  # the state entering step 2
    still = after_first == toy2.mask_id
    assert still[:, 1::2].all() and int(still.sum(1)[0]) == 5
    # a variant without a critic gets a clear error
    with pytest.raises(ValueError, match="remask"):
        sample_tokens(Toy(), torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([[-1]]),
                      torch.ones(1, 1, dtype=torch.bool), spec)


class TokenCriticToy(nn.Module):
    """The head samples code 1 at even positions and code 2 at odd ones (by a wide margin); the
    critic trusts code 1 (+10), distrusts code 2 (-10), and, where it is shown [MASK], says the
    opposite of the truth (+20 at odd positions, -20 at even ones): a sampler that scores the
    tokens before filling in re-masks the wrong half. Records every input."""
    codebook_size, mask_id, seq_len = 4, 4, 8

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, tokens, feats, mask):
        self.seen.append(tokens.clone())
        b, length = tokens.shape
        pos = torch.arange(length).expand(b, length)
        logits = torch.zeros(b, length, 4)
        logits[..., 1] = torch.where(pos % 2 == 0, 50.0, 0.0)
        logits[..., 2] = torch.where(pos % 2 == 1, 50.0, 0.0)
        conf = torch.where(tokens == 1, 10.0, -10.0)
        conf = torch.where(tokens == self.mask_id, torch.where(pos % 2 == 1, 20.0, -20.0), conf)
        return logits, {"confidence": conf}


def test_sampler_critic_scores_the_filled_in_tokens():
    spec, feats, mask, nf, nm = _critic_sampling()
    toy = TokenCriticToy()
    out = sample_tokens(toy, feats, mask, nf, nm, spec, torch.Generator().manual_seed(0))
    guided, critic_in, second = toy.seen[0], toy.seen[1], toy.seen[2]
    assert (guided == toy.mask_id).all()
    # the critic's call: every position just sampled is filled in, with the sampled token
    assert not (critic_in == toy.mask_id).any()
    assert torch.equal(critic_in[:, ::2], torch.ones_like(critic_in[:, ::2]))
    assert torch.equal(critic_in[:, 1::2], torch.full_like(critic_in[:, 1::2], 2))
    # after step 1 of 2, floor(8 cos(pi/4)) = 5 stay masked: the 4 distrusted odd tokens and
    # one even one; the 3 decided tokens are the critic-trusted code 1
    still = second == toy.mask_id
    assert still[:, 1::2].all() and int(still.sum(1)[0]) == 5
    assert (second[~still] == 1).all()
    # step 2 fills in again before scoring: decided tokens as they were, the rest sampled
    critic_in2 = toy.seen[3]
    assert not (critic_in2 == toy.mask_id).any() and torch.equal(critic_in2[~still], second[~still])
    assert torch.equal(out, critic_in2)
