"""The `transformer` and `mamba-prefix` backbones: contract, information flow (what each image
token can see), text conditioning and padding, gradients."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import variants
from ablate.registry import VariantContext, _check_variant, _walk
from variants.mamba_prefix import MambaPrefix, pads_first, sequence_orders
from variants.transformer import Transformer

from variant_case import B, CTX, D, F64, L, T, build  # noqa: F401
from variant_case import inputs as _inputs


def inputs(seed=0, n_real=(3, 5)):
    """Padded caption states left random: these tests check that they never matter."""
    return _inputs(seed, n_real, zero_pads=False)


CASES = [(Transformer, {}), (Transformer, {"qk_norm": True, "mlp_ratio": 2.0})] + [
    (MambaPrefix, {"text_position": pos, "scan": scan})
    for pos in ("prefix", "middle") for scan in ("forward", "bidirectional", "cross4")]
IDS = [f"{c.name}-{'-'.join(map(str, p.values())) or 'default'}" for c, p in CASES]


def test_contract_and_discovery():
    errors: dict[str, str] = {}
    found = {cls.name: cls for cls, _ in _walk(variants, errors)}
    assert not errors
    assert found["transformer"] is Transformer and found["mamba-prefix"] is MambaPrefix
    for cls in (Transformer, MambaPrefix):
        assert _check_variant(cls, "test") is None
        assert isinstance(cls.scan_orders, tuple) and "\n" not in cls.description
        with pytest.raises(ValidationError):
            cls.Config(no_such_key=1)
    assert MambaPrefix.Config().scan == "bidirectional" and MambaPrefix.Config().d_state == 16
    with pytest.raises(ValidationError):
        MambaPrefix.Config(text_position="sideways")


@pytest.mark.parametrize("cls,params", CASES, ids=IDS)
def test_shape_text_matters_and_padding_is_ignored(cls, params):
    m = build(cls, **params)
    x, text, mask = inputs()
    h = m(x, text, mask)
    assert h.shape == (B, L, D) and torch.isfinite(h).all()
    # the caption conditions every sample
    text2 = text + torch.randn_like(text)
    assert ((m(x, text2, mask) - h).abs().amax(dim=(1, 2)) > 1e-6).all()
    # padded positions: garbage (even non-finite) changes nothing
    garbage = text.clone()
    garbage[~mask] = torch.tensor(float("nan"), dtype=F64)
    garbage[0, -1] = 1e6
    torch.testing.assert_close(m(x, garbage, mask), h, atol=1e-12, rtol=0)
    # where the pads sit does not matter either: move sample 0's pads to the front
    n0 = int(mask[0].sum())
    shifted, smask = text.clone(), mask.clone()
    shifted[0] = torch.cat([torch.zeros(T - n0, D, dtype=F64), text[0, :n0]])
    smask[0] = torch.arange(T) >= T - n0
    torch.testing.assert_close(m(x, shifted, smask), h, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls,params", CASES, ids=IDS)
def test_empty_caption_is_finite_and_value_free(cls, params):
    m = build(cls, **params)
    x, text, _ = inputs()
    none = torch.zeros(B, T, dtype=torch.bool)
    h = m(x, text, none)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(m(x, torch.randn_like(text), none), h, atol=1e-12, rtol=0)


def _bump(t):
    """A random perturbation (not a constant: LayerNorm would erase a constant shift)."""
    return t + torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=t.dtype)


def _depends(m, x, text, mask, out_pos, in_pos):
    x2 = x.clone()
    x2[:, in_pos] = _bump(x2[:, in_pos])
    return (m(x2, text, mask)[:, out_pos] - m(x, text, mask)[:, out_pos]).abs().max().item() > 1e-9


@pytest.mark.parametrize("scan", ["bidirectional", "cross4"])
def test_bidirectional_scans_see_the_whole_image(scan):
    m = build(MambaPrefix, scan=scan)
    x, text, mask = inputs()
    assert _depends(m, x, text, mask, out_pos=0, in_pos=L - 1)
    assert _depends(m, x, text, mask, out_pos=L - 1, in_pos=0)


def test_forward_scan_is_causal_over_the_image():
    m = build(MambaPrefix, scan="forward")
    x, text, mask = inputs()
    assert not _depends(m, x, text, mask, out_pos=0, in_pos=L - 1)
    assert not _depends(m, x, text, mask, out_pos=5, in_pos=6)
    assert _depends(m, x, text, mask, out_pos=L - 1, in_pos=0)


def test_transformer_sees_the_whole_image():
    m = build(Transformer)
    x, text, mask = inputs()
    assert _depends(m, x, text, mask, out_pos=0, in_pos=L - 1)


def _text_reaches(m, x, text, mask):
    """Per image position: does changing the caption change the output there?"""
    d = (m(x, _bump(text), mask) - m(x, text, mask)).abs().amax(dim=(0, 2))
    return (d > 1e-9).tolist()


def test_text_position_semantics():
    x, text, mask = inputs()
    # prefix: every direction reads the caption first, so even a forward scan conditions all
    assert all(_text_reaches(build(MambaPrefix, scan="forward"), x, text, mask))
    # middle + forward: only the second half of the raster comes after the caption
    reach = _text_reaches(build(MambaPrefix, scan="forward", text_position="middle"), x, text, mask)
    assert reach == [False] * (L // 2) + [True] * (L - L // 2)
    # middle + bidirectional: each half reads it in one of the two directions
    assert all(_text_reaches(build(MambaPrefix, text_position="middle"), x, text, mask))
    # suffix: the documented negative control, no image token ever reads the caption
    for scan in ("forward", "bidirectional", "cross4"):
        assert not any(_text_reaches(build(MambaPrefix, scan=scan, text_position="suffix"), x, text, mask))


def test_sequence_orders_and_pads_first():
    perms = torch.stack([torch.arange(4), torch.arange(4).flip(0)])  # L = 4 image tokens
    o = sequence_orders(perms, 2, "prefix")
    assert o.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 5, 4, 3, 2]]  # caption first in both directions
    assert sequence_orders(perms, 2, "middle").tolist() == [[2, 3, 0, 1, 4, 5], [5, 4, 0, 1, 3, 2]]
    mask = torch.tensor([[True, False] + [True] * 4, [False, False] + [True] * 4])
    po = pads_first(o, mask)  # [K, B, S]
    assert po[0, 0].tolist() == [1, 0, 2, 3, 4, 5]  # the pad moved to the front, order kept
    assert po[1, 1].tolist() == [0, 1, 5, 4, 3, 2]


@pytest.mark.parametrize("cls,params", [(Transformer, {"qk_norm": True}), (MambaPrefix, {}),
                                         (MambaPrefix, {"scan": "cross4", "text_position": "middle"})])
def test_gradients_reach_every_parameter(cls, params):
    m = build(cls, **params).train()
    x, text, mask = inputs()
    x.requires_grad_()
    text.requires_grad_()
    m(x, text, mask).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert text.grad[mask].abs().sum() > 0
    assert torch.equal(text.grad[~mask], torch.zeros_like(text.grad[~mask]))


def test_mamba_prefix_checks_text_length():
    m = build(MambaPrefix)
    x, text, mask = inputs()
    with pytest.raises(ValueError, match="built for T=5"):
        m(x, text[:, :4], mask[:, :4])


def test_mamba_prefix_float32_runs_and_matches_float64():
    m64 = build(MambaPrefix)
    x, text, mask = inputs()
    h64 = m64(x, text, mask)
    h32 = m64.float()(x.float(), text.float(), mask)
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h32.double(), h64, atol=1e-4, rtol=1e-4)
