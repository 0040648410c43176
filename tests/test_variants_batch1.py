"""`uvit`, `mamba-seqlin-in`, `mamba-seqlin-out`, `mamba-skip-E`, `mamba-parallel`: exact
equivalences with the baselines they extend, reference twins of their forward passes, padding,
information flow and gradients. Float64 throughout."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import variants
from ablate.registry import VariantContext, _walk
from variants.mamba_parallel import MambaParallel
from variants.mamba_prefix import MambaPrefix
from variants.mamba_seqlin import MambaSeqLinIn, MambaSeqLinOut
from variants.mamba_skip_e import MambaSkipE
from variants.transformer import Transformer
from variants.uvit import UViT

import variant_case
from variant_case import B, D, F64, GRID, L, T, inputs  # noqa: F401


def ctx(depth=2, text_len=T):
    return VariantContext(width=D, depth=depth, heads=2, grid=GRID, text_len=text_len)


def build(cls, depth=2, text_len=T, seed=0, **params):
    return variant_case.build(cls, ctx(depth, text_len), seed, **params)


def left_padded(text, mask):
    """The same captions with their pads moved to the front."""
    t2, m2 = torch.zeros_like(text), torch.zeros_like(mask)
    for b in range(text.shape[0]):
        n = int(mask[b].sum())
        t2[b, T - n:] = text[b, :n]
        m2[b, T - n:] = True
    return t2, m2


def plain_stack(model, depth, scan):
    """The plain image-only Mamba stack (mamba-prefix with no text) carrying ``model``'s
    per-layer ``norm`` and ``mix`` weights."""
    ref = build(MambaPrefix, depth=depth, text_len=0, scan=scan)
    for lr, lm in zip(ref.layers, model.layers):
        lr.norm.load_state_dict(lm.norm.state_dict())
        lr.mix.load_state_dict(lm.mix.state_dict())
    no_text = torch.zeros(B, 0, D, dtype=F64), torch.zeros(B, 0, dtype=torch.bool)
    return lambda x: ref(x, *no_text)


def assert_all_grads(m, x, text, mask):
    x, text = x.clone().requires_grad_(), text.clone().requires_grad_()
    m.train()
    m(x, text, mask).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert x.grad.abs().sum() > 0 and text.grad[mask].abs().sum() > 0
    assert torch.equal(text.grad[~mask], torch.zeros_like(text.grad[~mask]))


def test_discovery_names_families_and_configs():
    errors: dict[str, str] = {}
    found = {cls.name: cls for cls, _ in _walk(variants, errors)}
    expect = {"uvit": (UViT, "transformer"), "mamba-seqlin-in": (MambaSeqLinIn, "mamba"),
              "mamba-seqlin-out": (MambaSeqLinOut, "mamba"), "mamba-skip-E": (MambaSkipE, "mamba"),
              "mamba-parallel": (MambaParallel, "mamba")}
    for name, (cls, family) in expect.items():
        assert found[name] is cls and cls.family == family
        with pytest.raises(ValidationError):
            cls.Config(no_such_key=1)
        for f in cls.Config.model_fields.values():
            assert f.description
    for bad in ({"skip": "mul"}, {"mlp_ratio": 0}):
        with pytest.raises(ValidationError):
            UViT.Config(**bad)
    with pytest.raises(ValidationError):
        MambaSkipE.Config(e_form="dense")
    with pytest.raises(ValidationError):
        MambaParallel.Config(combine="max")
    with pytest.raises(ValidationError):
        MambaParallel.Config(text_layers="two")
    assert MambaParallel.Config().scan == "bidirectional" and MambaSkipE.Config().d_state == 16


# --------------------------------------------------------------------------------------- uvit

def _as_transformer(u: UViT, depth: int) -> Transformer:
    t = build(Transformer, depth=depth)
    t.blocks.load_state_dict(u.blocks.state_dict())
    return t


def test_uvit_with_identity_skips_is_the_transformer():
    u = build(UViT, depth=3)
    x, text, mask = inputs()
    h = u(x, text, mask)
    t = _as_transformer(u, 3)
    assert (h - t(x, text, mask)).abs().max() > 1e-6  # the N(0, 0.02) skip half is read
    with torch.no_grad():
        u.skips[0].weight[:, D:] = 0  # [I | 0]: the long skip is ignored
    torch.testing.assert_close(u(x, text, mask), t(x, text, mask), atol=1e-12, rtol=0)
    # depth 1 is a single mid block: no skips at all
    u1 = build(UViT, depth=1)
    assert len(u1.skips) == 0
    torch.testing.assert_close(u1(x, text, mask), _as_transformer(u1, 1)(x, text, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("depth", [5, 6])
def test_uvit_skip_pairing_matches_a_hand_written_u(depth):
    """Out blocks read the in blocks' outputs in reverse order (innermost first); odd depth has
    one mid block, even depth two (so no skip merges a block's input with itself)."""
    u = build(UViT, depth=depth, skip="add")
    assert u.n_skips == 2
    x, text, mask = inputs()
    ones = torch.ones(B, 1, 1, dtype=F64)
    blk = [lambda h, b=b: b(h, text, mask, ones) for b in u.blocks]
    o0 = blk[0](x)
    o1 = blk[1](o0)
    h = blk[2](o1)  # the mid block(s)
    if depth == 6:
        h = blk[3](h)
    k = depth - 2
    h = blk[k](h + o1)
    h = blk[k + 1](h + o0)
    torch.testing.assert_close(u(x, text, mask), h, atol=1e-12, rtol=0)
    assert build(UViT, depth=4).n_skips == 1 and build(UViT, depth=2).n_skips == 0


def test_uvit_parameter_count_and_gradients():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ref = n(build(Transformer, depth=5))
    assert n(build(UViT, depth=5, skip="add")) == ref
    assert n(build(UViT, depth=5)) == ref + 2 * (2 * D * D + D)
    x, text, mask = inputs()
    assert_all_grads(build(UViT, depth=3, qk_norm=True), x, text, mask)


def test_uvit_empty_caption_is_finite_and_value_free():
    u = build(UViT, depth=3)
    x, text, _ = inputs()
    none = torch.zeros(B, T, dtype=torch.bool)
    h = u(x, text, none)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(u(x, torch.randn_like(text), none), h, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------- seqlin

@pytest.mark.parametrize("scan", ["forward", "cross4"])
def test_seqlin_in_without_text_columns_is_the_plain_stack(scan):
    m = build(MambaSeqLinIn, scan=scan)
    assert torch.equal(m.seq.weight[:, T:], torch.eye(L, dtype=F64)) and not m.seq.bias.any()
    assert m.seq.weight[:, :T].abs().max() > 0
    x, text, mask = inputs()
    ref = plain_stack(m, 2, scan)
    assert (m(x, text, mask) - ref(x)).abs().max() > 1e-8
    with torch.no_grad():
        m.seq.weight[:, :T] = 0
    torch.testing.assert_close(m(x, text, mask), ref(x), atol=1e-12, rtol=0)


def test_seqlin_in_is_the_stack_on_the_mixed_sequence():
    """The input map is exactly ``W [text; x] + b`` over positions, the same for every channel."""
    m = build(MambaSeqLinIn)
    with torch.no_grad():
        m.seq.weight.normal_()
        m.seq.bias.normal_()
    x, text, mask = inputs()
    u = torch.einsum("ls,bsd->bld", m.seq.weight, torch.cat([text, x], 1)) + m.seq.bias[:, None]
    torch.testing.assert_close(m(x, text, mask), plain_stack(m, 2, "bidirectional")(u), atol=1e-12, rtol=0)


def test_seqlin_out_without_text_columns_is_mamba_prefix():
    m = build(MambaSeqLinOut, scan="cross4")
    ref = build(MambaPrefix, scan="cross4")
    ref.layers.load_state_dict(m.layers.state_dict())
    x, text, mask = inputs()
    assert (m(x, text, mask) - ref(x, text, mask)).abs().max() > 1e-8
    with torch.no_grad():
        m.seq.weight[:, :T] = 0
    torch.testing.assert_close(m(x, text, mask), ref(x, text, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", [MambaSeqLinIn, MambaSeqLinOut])
def test_seqlin_padding_values_never_matter_placement_does(cls):
    m = build(cls)
    x, text, mask = inputs()
    with torch.no_grad():
        m.seq.weight.normal_()  # every text column read with weight O(1)
    h = m(x, text, mask)
    garbage = text.clone()
    garbage[~mask] = float("nan")
    garbage[0, -1] = 1e6
    torch.testing.assert_close(m(x, garbage, mask), h, atol=1e-12, rtol=0)
    # the map is tied to positions: a left-padded caption is a different input (documented)
    assert (m(x, *left_padded(text, mask)) - h).abs().max() > 1e-6


@pytest.mark.parametrize("cls", [MambaSeqLinIn, MambaSeqLinOut])
def test_seqlin_checks_sizes_and_gradients(cls):
    m = build(cls, scan="cross4")
    x, text, mask = inputs()
    with pytest.raises(ValueError, match="built for T=5"):
        m(x, text[:, :4], mask[:, :4])
    assert_all_grads(m, x, text, mask)


# ------------------------------------------------------------------------------------- skip-E

def _skip_term(layer, n, p, form):
    """Hand-written E(n_t) LN_p(p) for one layer."""
    pn = layer.text_norm(p)
    s = layer.skip
    if form == "gated":
        g = torch.sigmoid(n @ s.gate.weight.t() + s.gate.bias)
        return g * (pn @ s.value.weight.t())[:, None]
    c = n @ s.coef.weight.t() + s.coef.bias  # [B, L, r]
    return torch.einsum("dr,blr->bld", s.value.weight, c * (pn @ s.text_in.weight.t())[:, None])


@pytest.mark.parametrize("form", ["gated", "lowrank"])
def test_skip_e_is_the_plain_stack_plus_the_hand_written_skip(form):
    m = build(MambaSkipE, depth=1, e_form=form, rank=3)
    x, text, mask = inputs()
    layer = m.layers[0]
    p = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expect = plain_stack(m, 1, "bidirectional")(x) + _skip_term(layer, layer.norm(x), p, form)
    torch.testing.assert_close(m(x, text, mask), expect, atol=1e-12, rtol=0)


def test_skip_e_without_the_skip_or_without_a_caption_is_the_plain_stack():
    m = build(MambaSkipE, depth=2, scan="cross4")
    x, text, mask = inputs()
    ref = plain_stack(m, 2, "cross4")
    none = torch.zeros(B, T, dtype=torch.bool)
    torch.testing.assert_close(m(x, text, none), ref(x), atol=1e-12, rtol=0)
    assert (m(x, text, mask) - ref(x)).abs().max() > 1e-8
    with torch.no_grad():
        for layer in m.layers:
            layer.skip.value.weight.zero_()
    torch.testing.assert_close(m(x, text, mask), ref(x), atol=1e-12, rtol=0)


def test_skip_e_text_reaches_every_token_even_with_a_causal_scan():
    m = build(MambaSkipE, depth=2, scan="forward", e_form="lowrank")
    x, text, mask = inputs()
    h = m(x, text, mask)
    d = (m(x, text + torch.randn_like(text) * mask[..., None], mask) - h).abs().amax(-1)  # [B, L]
    assert (d > 1e-9).all()
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert torch.equal(m(x2, text, mask)[:, :-1], h[:, :-1])  # the image scan stays causal


@pytest.mark.parametrize("form", ["gated", "lowrank"])
def test_skip_e_pad_placement_and_gradients(form):
    m = build(MambaSkipE, e_form=form)
    x, text, mask = inputs()
    torch.testing.assert_close(m(x, *left_padded(text, mask)), m(x, text, mask), atol=1e-12, rtol=0)
    assert_all_grads(m, x, text, mask)


# ----------------------------------------------------------------------------------- parallel

def _parallel_reference(m, x, text, mask, combine, text_scan):
    """mamba-parallel sample by sample, its text Mambas run over the real tokens only (no mask,
    no pads): the twin of the masked, pads-first batch path."""
    out = []
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        u = text[b:b + 1, :n]
        r = torch.arange(n)
        orders = torch.stack([r] if text_scan == "forward" else [r, r.flip(0)])
        h, q = x[b:b + 1], None
        for i, layer in enumerate(m.layers):
            if i < len(m.text_layers):
                tl = m.text_layers[i]
                v = tl.mix(tl.norm(u), orders)
                u = u + v
                q = v.mean(1)
            y = layer.mix(layer.norm(h), m.perms)
            z = {"sum": lambda: y + q[:, None], "mul": lambda: y * (1 + q[:, None]),
                 "concat": lambda: torch.cat([y, q[:, None].expand_as(y)], -1)}[combine]()
            h = h + layer.proj(z)
        out.append(h)
    return torch.cat(out)


@pytest.mark.parametrize("combine,text_layers,text_scan", [
    ("sum", "all", "forward"), ("mul", "all", "bidirectional"), ("concat", "one", "forward"),
    ("mul", "one", "bidirectional")])
def test_parallel_matches_its_per_sample_reference(combine, text_layers, text_scan):
    m = build(MambaParallel, depth=3, combine=combine, text_layers=text_layers, text_scan=text_scan)
    assert len(m.text_layers) == (3 if text_layers == "all" else 1)
    with torch.no_grad():  # move P off its identity init so the combine is really tested
        for layer in m.layers:
            layer.proj.weight.add_(0.1 * torch.randn_like(layer.proj.weight))
    x, text, mask = inputs(n_real=(1, 4))
    h = m(x, text, mask)
    torch.testing.assert_close(h, _parallel_reference(m, x, text, mask, combine, text_scan), atol=1e-12, rtol=0)
    torch.testing.assert_close(m(x, *left_padded(text, mask)), h, atol=1e-12, rtol=0)


@pytest.mark.parametrize("combine", ["sum", "mul", "concat"])
def test_parallel_with_a_silent_text_branch_is_the_plain_stack(combine):
    m = build(MambaParallel, combine=combine, scan="cross4")
    x, text, mask = inputs()
    ref = plain_stack(m, 2, "cross4")
    none = torch.zeros(B, T, dtype=torch.bool)
    torch.testing.assert_close(m(x, text, none), ref(x), atol=1e-12, rtol=0)  # q = 0: P(.) = y
    assert (m(x, text, mask) - ref(x)).abs().max() > 1e-8
    with torch.no_grad():
        for layer in m.text_layers:
            for mixer in layer.mix.mixers:
                mixer.out_proj.weight.zero_()
    torch.testing.assert_close(m(x, text, mask), ref(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("params", [{"combine": "mul", "text_layers": "one", "text_scan": "bidirectional"},
                                    {"combine": "concat", "scan": "forward", "text_expand": 1}])
def test_parallel_gradients(params):
    x, text, mask = inputs()
    assert_all_grads(build(MambaParallel, **params), x, text, mask)


def test_parallel_text_expand_and_length_check():
    m = build(MambaParallel, text_expand=1)
    assert m.text_layers[0].mix.mixers[0].d_inner == D and m.layers[0].mix.mixers[0].d_inner == 2 * D
    x, text, mask = inputs()
    with pytest.raises(ValueError, match="built for T=5"):
        m(x, text[:, :4], mask[:, :4])
