"""`mamba-xattn`, `mamba-xattn-interleave`, `m-mamba`, `hybrid-gsa`: each checked against a
hand-written computation from its own submodules (float64, exact up to rounding), plus
information flow, weight tying, the text stream and config validation."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from ablate.model.scan_order import inverse, scan_permutations
from ablate.registry import VariantContext, load_registry
from variants.hybrid_gsa import HybridGSA
from variants.m_mamba import MMamba
from variants.mamba_prefix import pads_first
from variants.mamba_xattn import MambaXattn, MambaXattnInterleave

from variant_case import B, CTX, D, F64, GRID, L, T, build, inputs  # noqa: F401

ATOL = 1e-12


def influence(m, x, text, mask):
    """``[L_out, L_in]``: does image token ``in`` change the output at ``out`` (sample 0)?"""
    def f(x0):
        return m(x0.unsqueeze(0), text[:1], mask[:1])[0]
    jac = torch.autograd.functional.jacobian(f, x[0])  # [L, D, L, D]
    return jac.abs().sum(dim=(1, 3)) > 1e-12


def test_registered_with_the_contract_attributes():
    reg = load_registry()
    for cls, family in ((MambaXattn, "mamba"), (MambaXattnInterleave, "mamba"), (MMamba, "mamba"),
                        (HybridGSA, "hybrid")):
        assert reg.get(cls.name) is cls and cls.family == family
        assert cls.scan_orders == ("forward", "bidirectional", "cross4")
        cfg = cls.Config()
        assert (cfg.d_state, cfg.d_conv, cfg.expand) == (16, 4, 2)
        with pytest.raises(ValidationError):
            cls.Config(no_such_key=1)
        with pytest.raises(ValidationError):
            cls.Config(scan="diagonal")
    assert MambaXattn.Config().scan == MambaXattnInterleave.Config().scan == HybridGSA.Config().scan == "bidirectional"
    assert MMamba.Config().scan == "cross4"  # seed 001's cross-scan
    for cls, bad in ((MambaXattn, {"inject": "y"}), (MambaXattn, {"lift": "conv"}), (MMamba, {"text_merge": "max"}),
                     (HybridGSA, {"every": 0}), (MambaXattnInterleave, {"mlp_ratio": -1.0})):
        with pytest.raises(ValidationError):
            cls.Config(**bad)


# ------------------------------------------------------------------------------ mamba-xattn

def xattn_by_hand(m, x, text, mask, permute_hooks=True):
    """The docstring's equations from the model's own submodules, one direction at a time."""
    text = torch.where(mask.unsqueeze(-1), text, torch.zeros((), dtype=F64))
    h = x
    for layer in m.blocks:
        u = layer.norm(h)
        out = 0
        for k, (mixer, p) in enumerate(zip(layer.mixers, m.perms)):
            attn = layer.attn[0 if len(layer.attn) == 1 else k]
            read = attn(u, text, mask)  # raster order
            read = read[:, p] if permute_hooks else read
            y = layer.lift[k](read) if layer.lift_mode == "linear" else read.repeat(1, 1, layer.hook_width // D)
            e = mixer.d_inner
            kw = {"xz": lambda: {"x_add": y[..., :e], "z_add": y[..., e:]},
                  "x": lambda: {"x_add": y}, "z": lambda: {"z_add": y}}[layer.inject]()
            out = out + mixer(u[:, p], **kw)[:, inverse(p)]
        h = h + out
    return h


XATTN_CASES = [{"scan": "forward"}, {}, {"scan": "cross4"}, {"inject": "x"}, {"inject": "z", "scan": "cross4"},
               {"share_attention": True, "scan": "cross4"}, {"lift": "repeat"},
               {"lift": "repeat", "inject": "x", "share_attention": True}]


@pytest.mark.parametrize("params", XATTN_CASES, ids=lambda p: "-".join(map(str, p.values())) or "default")
def test_xattn_equals_hand_written_hooks_in_scan_order(params):
    m = build(MambaXattn, **params)
    with torch.no_grad():  # sharpen the attention: at init it is near-uniform, so every image
        for layer in m.blocks:  # token's read is nearly the same and a wrong order barely shows
            for attn in layer.attn:
                attn.q.weight.normal_(std=0.5)
                attn.kv.weight.normal_(std=0.5)
    x, text, mask = inputs()
    h = m(x, text, mask)
    torch.testing.assert_close(h, xattn_by_hand(m, x, text, mask), atol=ATOL, rtol=0)
    if m.perms.shape[0] > 1:  # handing every direction raster-ordered hooks is a different model
        assert (h - xattn_by_hand(m, x, text, mask, permute_hooks=False)).abs().max() > 1e-6


def test_xattn_structure_inject_widths_and_sharing():
    e = 2 * D
    for inject, width in (("xz", 2 * e), ("x", e), ("z", e)):
        layer = build(MambaXattn, inject=inject, scan="cross4").blocks[0]
        assert [lin.weight.shape for lin in layer.lift] == [(width, D)] * 4 and len(layer.attn) == 4
        assert all(lin.bias is None for lin in layer.lift)
    shared = build(MambaXattn, share_attention=True, scan="cross4")
    assert len(shared.blocks[0].attn) == 1
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(shared) < n(build(MambaXattn, scan="cross4"))
    assert not hasattr(build(MambaXattn, lift="repeat").blocks[0], "lift")


def test_xattn_with_zero_lift_is_the_plain_image_mamba_stack():
    m = build(MambaXattn, scan="cross4")
    with torch.no_grad():
        for layer in m.blocks:
            for lin in layer.lift:
                lin.weight.zero_()
    x, text, mask = inputs()
    h = x
    for layer in m.blocks:
        u = layer.norm(h)
        h = h + sum(mixer(u[:, p])[:, inverse(p)] for mixer, p in zip(layer.mixers, m.perms))
    torch.testing.assert_close(m(x, text, mask), h, atol=ATOL, rtol=0)
    # and then the caption does not matter at all
    torch.testing.assert_close(m(x, torch.randn_like(text), mask), h, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls", [MambaXattn, MambaXattnInterleave])
def test_xattn_empty_caption_reads_nothing(cls):
    m = build(cls)
    x, text, _ = inputs()
    none = torch.zeros(B, T, dtype=torch.bool)
    h = m(x, text, none)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(m(x, torch.randn_like(text) * float("nan"), none), h, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- mamba-xattn-interleave

@pytest.mark.parametrize("mlp_ratio", [0.0, 2.0])
def test_interleave_is_mamba_layer_then_cross_attention(mlp_ratio):
    m = build(MambaXattnInterleave, scan="cross4", mlp_ratio=mlp_ratio)
    x, text, mask = inputs()
    tz = torch.where(mask.unsqueeze(-1), text, torch.zeros((), dtype=F64))
    h = swapped = x
    for blk in m.blocks:
        assert (blk.mlp is None) == (mlp_ratio == 0) and (blk.norm3 is None) == (mlp_ratio == 0)
        mamba = lambda s: s + sum(mx(blk.norm1(s)[:, p])[:, inverse(p)]  # noqa: E731
                                  for mx, p in zip(blk.mix.mixers, m.perms))
        xattn = lambda s: s + blk.cross_attn(blk.norm2(s), tz, mask)  # noqa: E731
        mlp = (lambda s: s + blk.mlp(blk.norm3(s))) if blk.mlp is not None else (lambda s: s)  # noqa: E731
        h = mlp(xattn(mamba(h)))
        swapped = mlp(mamba(xattn(swapped)))
    out = m(x, text, mask)
    torch.testing.assert_close(out, h, atol=ATOL, rtol=0)
    assert (out - swapped).abs().max() > 1e-6  # the order is observable


# ------------------------------------------------------------------------------------ m-mamba

def m_mamba_by_hand(m, x, text, mask):
    """Per sample, with the pads *removed* (the variant moves them ahead and makes them inert,
    which must be the same thing) and the caption ahead of the image in every direction."""
    outs = []
    for b in range(x.shape[0]):
        t, h = text[b:b + 1, mask[b]], x[b:b + 1]
        n = t.shape[1]
        perms = scan_permutations("cross4" if m.orders.shape[0] == 4 else "bidirectional", GRID)
        perms = perms[:m.orders.shape[0]]
        for blk in m.blocks:
            u = blk.norm(torch.cat([t, h], 1))
            ys = [mx(torch.cat([u[:, :n], u[:, n:][:, p]], 1)) for mx, p in zip(blk.mixers, perms)]
            img = sum(y[:, n:][:, inverse(p)] for y, p in zip(ys, perms))
            if blk.merge is not None:
                texts = [y[:, :n] for y in ys]
                merged = blk.merge(torch.cat(texts, -1) if blk.merge_mode == "concat" else torch.stack(texts).mean(0))
                t = t + merged
            h = h + img
        outs.append(h)
    return torch.cat(outs)


@pytest.mark.parametrize("params", [{}, {"text_merge": "mean"}, {"scan": "bidirectional"}])
def test_m_mamba_equals_hand_written_blocks_with_pads_removed(params):
    ctx = VariantContext(width=D, depth=3, heads=2, grid=GRID, text_len=T)
    m = build(MMamba, ctx=ctx, **params)
    with torch.no_grad():  # move the merges off their mean init, so a wrong layout would show
        for blk in m.blocks[:-1]:
            blk.merge.weight.add_(0.1 * torch.randn_like(blk.merge.weight))
    x, text, mask = inputs(n_real=(2, 5))
    torch.testing.assert_close(m(x, text, mask), m_mamba_by_hand(m, x, text, mask), atol=ATOL, rtol=0)


def test_m_mamba_merge_starts_as_the_mean_and_last_block_has_none():
    for mode in ("concat", "mean"):
        m = build(MMamba, text_merge=mode)
        assert m.blocks[-1].merge is None and m.blocks[0].merge is not None
        ys = [torch.randn(B, T, D, dtype=F64) for _ in range(4)]
        inp = torch.cat(ys, -1) if mode == "concat" else torch.stack(ys).mean(0)
        torch.testing.assert_close(m.blocks[0].merge(inp), torch.stack(ys).mean(0), atol=ATOL, rtol=0)


def test_m_mamba_text_stream_is_updated_and_feeds_the_next_block():
    m = build(MMamba)
    x, text, mask = inputs()
    orders_mask = torch.cat([mask, torch.ones(B, L, dtype=torch.bool)], 1)
    orders = pads_first(m.orders, orders_mask)
    t1, h1 = m.blocks[0](text, x, orders, orders_mask)
    # block 1 changes every real text position and leaves the pads at zero
    assert ((t1 - text).abs().amax(-1)[mask] > 1e-6).all()
    assert torch.equal(t1[~mask], torch.zeros_like(t1[~mask]))
    _, h2 = m.blocks[1](t1, h1, orders, orders_mask)
    torch.testing.assert_close(m(x, text, mask), h2, atol=ATOL, rtol=0)
    _, h2_stale = m.blocks[1](text, h1, orders, orders_mask)  # block 2 fed the un-updated text
    assert ((h2 - h2_stale).abs().amax(dim=(1, 2)) > 1e-6).all()


def test_m_mamba_pad_placement_does_not_matter():
    m = build(MMamba)
    x, text, mask = inputs()
    n0 = int(mask[0].sum())
    shifted, smask = text.clone(), mask.clone()
    shifted[0] = torch.cat([torch.zeros(T - n0, D, dtype=F64), text[0, :n0]])
    smask[0] = torch.arange(T) >= T - n0
    torch.testing.assert_close(m(x, shifted, smask), m(x, text, mask), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------- hybrid-gsa

def _n(mod):
    return sum(p.numel() for p in mod.parameters())


def test_hybrid_gsa_weight_tying_and_parameter_count():
    ctx = VariantContext(width=D, depth=5, heads=2, grid=GRID, text_len=T)
    tied, untied = build(HybridGSA, ctx=ctx), build(HybridGSA, ctx=ctx, share=False)
    assert tied.n_applications == untied.n_applications == 3  # before layers 0, 2, 4
    assert len(tied.gsa) == 1 and len(untied.gsa) == 3
    blocks = [tied.attention_block(i) for i in range(5)]
    assert blocks[1] is None and blocks[3] is None
    assert blocks[0] is blocks[2] is blocks[4] is tied.gsa[0]
    ids = [id(p) for p in tied.parameters()]
    assert len(ids) == len(set(ids))
    block_n = _n(tied.gsa[0])
    assert _n(tied) == _n(tied.layers) + block_n
    assert _n(untied) == _n(tied) + 2 * block_n
    # every > depth: the block still runs once, before layer 0
    assert build(HybridGSA, ctx=ctx, every=9).n_applications == 1


def test_hybrid_gsa_schedule_and_tied_equals_untied_with_copied_weights():
    ctx = VariantContext(width=D, depth=5, heads=2, grid=GRID, text_len=T)
    tied, untied = build(HybridGSA, ctx=ctx), build(HybridGSA, ctx=ctx, share=False)
    calls = []
    names = {id(mod): name for name, mod in tied.named_modules() if name.count(".") == 1}
    hooks = [mod.register_forward_hook(lambda mod, i, o: calls.append(names[id(mod)]))
             for mod in list(tied.layers) + list(tied.gsa)]
    x, text, mask = inputs()
    h = tied(x, text, mask)
    for hk in hooks:
        hk.remove()
    assert calls == ["gsa.0", "layers.0", "layers.1", "gsa.0", "layers.2", "layers.3", "gsa.0", "layers.4"]
    assert (h - untied(x, text, mask)).abs().max() > 1e-6
    untied.layers.load_state_dict(tied.layers.state_dict())
    for blk in untied.gsa:
        blk.load_state_dict(tied.gsa[0].state_dict())
    torch.testing.assert_close(untied(x, text, mask), h, atol=ATOL, rtol=0)


def test_hybrid_gsa_global_attention_makes_even_a_forward_scan_see_the_whole_image():
    m = build(HybridGSA, scan="forward")
    x, text, mask = inputs()
    assert influence(m, x, text, mask).all()
    with torch.no_grad():  # without the attention's output only causal Mamba (and per-token MLP) remain
        m.gsa[0].attn.out.weight.zero_()
    assert torch.equal(influence(m, x, text, mask), torch.ones(L, L, dtype=torch.bool).tril())


# ------------------------------------------------------------------------- information flow

ALL = [(MambaXattn, {}), (MambaXattnInterleave, {}), (MMamba, {"scan": "bidirectional"}), (HybridGSA, {})]


@pytest.mark.parametrize("cls", [MambaXattn, MambaXattnInterleave, MMamba, HybridGSA], ids=lambda c: c.name)
@pytest.mark.parametrize("scan", ["bidirectional", "cross4"])
def test_every_image_token_sees_every_other(cls, scan):
    m = build(cls, ctx=VariantContext(width=D, depth=1, heads=2, grid=GRID, text_len=T), scan=scan)
    x, text, mask = inputs()
    assert influence(m, x, text, mask).all()


@pytest.mark.parametrize("cls", [MambaXattn, MambaXattnInterleave, MMamba], ids=lambda c: c.name)
def test_forward_scan_is_causal_over_the_image(cls):
    m = build(cls, scan="forward")
    x, text, mask = inputs()
    seen = influence(m, x, text, mask)
    assert torch.equal(seen, torch.ones(L, L, dtype=torch.bool).tril())


@pytest.mark.parametrize("cls,params", ALL, ids=lambda v: getattr(v, "name", ""))
def test_float32_matches_float64(cls, params):
    m = build(cls, **params)
    x, text, mask = inputs()
    h64 = m(x, text, mask)
    h32 = m.float()(x.float(), text.float(), mask)
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h32.double(), h64, atol=1e-4, rtol=1e-4)
