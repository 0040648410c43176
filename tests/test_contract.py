"""The variant contract, checked over every registered variant automatically.

A new file under ``variants/`` (or an installed plugin) is picked up here without editing this
file: output shape; determinism under a seed; gradients reach every parameter; the caption
matters and the null caption works; padded caption positions are ignored; the true codes
(``targets``) never reach the prediction; the parameter count; every scan order it declares;
a forward+backward at tiny size within a second.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from ablate.model import Generator
from ablate.paradigm import aux_losses
from ablate.registry import VariantContext, load_registry
from ablate.text import build_text_encoder

F64 = torch.float64
B, T, D, K = 3, 5, 16, 8
GRID = (3, 4)
L = GRID[0] * GRID[1]
CTX = VariantContext(width=D, depth=2, heads=2, grid=GRID, text_len=T)

REGISTRY = load_registry(refresh=True)
NAMES = sorted(REGISTRY.variants)
SCANNED = [(n, s) for n in NAMES for s in REGISTRY.variants[n].scan_orders]


def build(name: str, seed: int = 0, ctx: VariantContext = CTX, **params) -> nn.Module:
    cls = REGISTRY.get(name)
    torch.manual_seed(seed)
    return cls(ctx, cls.Config(**params)).double().eval()


def readout_head(seed: int = 7) -> nn.Module:  # stands in for the generator's final norm and head
    torch.manual_seed(seed)
    return nn.Sequential(nn.LayerNorm(D), nn.Linear(D, K)).double()


def call(m: nn.Module, x, text, mask, targets=None, readout=None):
    """The generator's calling convention; returns ``(h, aux)``. With ``targets`` (training), a
    backbone with a critic pass also runs it (on ``x``, standing for the embedded filled-in
    sequence), its logits' mean added as an auxiliary loss, as the masked paradigm's critic loss
    would be."""
    out = m(x, text, mask)
    h, aux = out if isinstance(out, tuple) else (out, {})
    if targets is not None and hasattr(m, "critic"):
        aux = dict(aux, **{"loss/critic_pass": sum(z.mean() for z in m.critic(x.detach(), text, mask))})
    return h, aux


def inputs(seed: int = 0, n_real=(3, 5, 1)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g, dtype=F64)
    text = torch.randn(B, T, D, generator=g, dtype=F64)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(n_real).unsqueeze(1)  # right-padded
    text = text * mask.unsqueeze(-1)  # what Generator.encode_text hands over
    targets = torch.randint(0, K, (B, L), generator=g)
    return x, text, mask, targets


def test_registry_has_no_errors_and_every_variant_is_described():
    assert not REGISTRY.errors, REGISTRY.errors
    for name in NAMES:
        cls = REGISTRY.get(name)
        assert cls.name == name and cls.description and "\n" not in cls.description
        assert isinstance(cls.scan_orders, tuple)
        if cls.family in ("mamba", "hybrid"):
            assert set(cls.scan_orders) == {"forward", "bidirectional", "cross4"}, \
                f"{name}: every Mamba variant takes scan: forward | bidirectional | cross4"
            assert "scan" in cls.Config.model_fields


@pytest.mark.parametrize("name", NAMES)
def test_shape_determinism_and_parameter_count(name):
    m1, m2 = build(name, seed=3), build(name, seed=3)
    for (k1, p1), (k2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(p1, p2), f"{name}: parameter {k1} differs under one seed"
    x, text, mask, targets = inputs()
    h1, aux1 = call(m1, x, text, mask, targets)
    h2, _ = call(m2, x, text, mask, targets)
    assert h1.shape == (B, L, D) and h1.dtype == F64 and torch.isfinite(h1).all()
    assert torch.equal(h1, h2), f"{name}: not deterministic under a seed"
    for k, v in aux1.items():
        assert k.startswith("loss/") or k == "confidence", f"{name}: unknown aux entry {k!r}"
        if k == "confidence":
            assert v.shape == (B, L)
    n = sum(p.numel() for p in m1.parameters())
    assert n > 0
    # fair comparisons: within a factor of 4 of the transformer at the same width and depth
    ref = sum(p.numel() for p in build("transformer").parameters())
    assert ref / 4 <= n <= 4 * ref, f"{name}: {n} parameters vs transformer {ref}"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    m = build(name).train()
    x, text, mask, targets = inputs(n_real=(5, 5, 5))
    x.requires_grad_()
    text.requires_grad_()
    head = readout_head()
    h, aux = call(m, x, text, mask, targets, readout=head)
    loss = head(h).logsumexp(-1).mean() + sum(aux_losses(aux).values(), torch.zeros((), dtype=F64))
    loss.backward()
    missing = [k for k, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"{name}: no gradient reaches {missing}"
    assert x.grad.abs().sum() > 0 and text.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_caption_matters_null_caption_works_and_pads_are_ignored(name):
    m = build(name)
    x, text, mask, targets = inputs()
    h, _ = call(m, x, text, mask, targets)
    text2 = (text + torch.randn_like(text)) * mask.unsqueeze(-1)
    h2, _ = call(m, x, text2, mask, targets)
    assert ((h2 - h).abs().amax(dim=(1, 2)) > 1e-6).all(), f"{name}: the caption does not change every sample"
    # the null caption of classifier-free guidance: one real token (the NULL id) per row
    null_mask = torch.zeros(B, T, dtype=torch.bool)
    null_mask[:, 0] = True
    hn, _ = call(m, x, text * null_mask.unsqueeze(-1), null_mask, targets)
    assert torch.isfinite(hn).all() and (hn - h).abs().max() > 1e-6
    # values at padded positions never matter, not even NaN or huge ones
    garbage = text.clone()
    garbage[~mask] = float("nan")
    garbage[0, -1] = 1e6
    hg, _ = call(m, x, garbage, mask, targets)
    torch.testing.assert_close(hg, h, atol=1e-10, rtol=0, msg=f"{name}: padded caption positions leak")


@pytest.mark.parametrize("name", NAMES)
def test_true_codes_never_reach_the_prediction(name):
    """In a generator, a masked position's logits cannot depend on its true code: the input
    there is [MASK], and the training-time ``fill`` (the critic's filled-in sequence, which holds
    the true codes elsewhere) may only shape losses."""
    torch.manual_seed(0)
    cls = REGISTRY.get(name)
    enc = build_text_encoder(_text_spec(), ["a red circle", "two blue squares"], None)
    gen = Generator(cls, cls.Config(), enc, codebook_size=K, grid=GRID, width=D, depth=2, heads=2,
                    text_len=T).eval()
    feats, tmask = enc.featurize(["a red circle", "two blue squares", "a red circle"])
    codes = torch.randint(0, K, (B, L))
    inputs_ = codes.clone()
    inputs_[:, ::2] = gen.mask_id
    logits, _ = gen(inputs_, feats, tmask, fill=lambda lg: codes)
    other = codes.clone()
    other[:, ::2] = (codes[:, ::2] + 1) % K  # different truth at the masked positions only
    logits2, aux2 = gen(inputs_, feats, tmask, fill=lambda lg: other)
    torch.testing.assert_close(logits2, logits, atol=0, rtol=0)
    logits3, _ = gen(inputs_, feats, tmask)  # sampling: no fill at all
    torch.testing.assert_close(logits3, logits, atol=0, rtol=0)
    if hasattr(gen.backbone, "critic"):
        assert torch.equal(aux2["critic_fill"], other) and len(aux2["critic_logits"]) == 2
    for v in aux_losses(aux2).values():
        assert v.dim() == 0 and torch.isfinite(v)


def _text_spec():
    from ablate.config import TextSpec
    return TextSpec(encoder="learned", max_len=T, width=D)


@pytest.mark.parametrize("name,scan", SCANNED)
def test_every_scan_order_runs(name, scan):
    m = build(name, scan=scan)
    x, text, mask, targets = inputs()
    h, _ = call(m, x, text, mask, targets)
    assert h.shape == (B, L, D) and torch.isfinite(h).all()


@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward_backward_within_a_second(name):
    """Float32 at tiny size, best of three after a warm-up (kernels compile on first use)."""
    m = build(name).float().train()
    x, text, mask, targets = (t.float() if t.is_floating_point() else t for t in inputs())
    head = readout_head().float()
    best = float("inf")
    for _ in range(4):
        t0 = time.perf_counter()
        h, aux = call(m, x, text, mask, targets, readout=head)
        (h.square().mean() + sum(aux_losses(aux).values(), torch.zeros(()))).backward()
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0, f"{name}: forward+backward took {best:.2f} s at tiny size"
