"""`mamba-text-A|B|C|D` and `mamba-critic`: exact equivalences with the plain Mamba stack, the
hooks each variant feeds (and where), pooling, the critic's labels, loss, gate and sampling."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ValidationError

from ablate.config import SampleSpec, TextSpec
from ablate.model import Generator
from ablate.paradigm import sample_tokens
from ablate.model.mamba import Mamba
from ablate.model.scan_order import inverse, permute
from ablate.registry import VariantContext, load_registry
from ablate.text import build_text_encoder
from variants.mamba_critic import MambaCritic
from variants.mamba_prefix import MambaPrefix
from variants.mamba_text_abcd import MambaTextA, MambaTextB, MambaTextC, MambaTextD

F64 = torch.float64
B, T, D, K = 3, 5, 16, 8
GRID = (3, 4)
L = GRID[0] * GRID[1]
CTX = VariantContext(width=D, depth=2, heads=2, grid=GRID, text_len=T)
TEXT = [MambaTextA, MambaTextB, MambaTextC, MambaTextD]


def build(cls, seed=0, ctx=CTX, **params):
    torch.manual_seed(seed)
    return cls(ctx, cls.Config(**params)).double().eval()


def inputs(seed=0, n_real=(3, 5, 1), garbage=True):
    """Right-padded captions; pads hold NaN / huge values unless ``garbage`` is False."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g, dtype=F64)
    text = torch.randn(B, T, D, generator=g, dtype=F64)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(n_real).unsqueeze(1)
    text = torch.where(mask.unsqueeze(-1), text, torch.full_like(text, float("nan") if garbage else 0.0))
    if garbage:
        text[0, -1] = 1e6
    return x, text, mask


def plain_stack(layers, perms, x, hooks=None):
    """The reference image-only Mamba stack ``s + sum_k unscan_k(Mamba_k(scan_k(LN(s))))`` on the
    given layers' own modules; ``hooks(layer, direction, perm)`` may add Mamba hook kwargs."""
    s = x
    for i, layer in enumerate(layers):
        u = layer.norm(s)
        out = 0
        for k, (mixer, p) in enumerate(zip(layer.mix.mixers, perms)):
            kw = hooks(i, k, p) if hooks else {}
            out = out + permute(mixer(permute(u, p), None, **kw), inverse(p))
        s = s + out
    return s


def real_mean(text, mask, i):
    return text[i, mask[i]].mean(0)


# ------------------------------------------------------------------------------ mamba-text-*

def test_registered_and_config_validation():
    reg = load_registry()
    for cls in TEXT:
        assert reg.get(cls.name) is cls and cls.family == "mamba" and cls.Config().scan == "bidirectional"
        with pytest.raises(ValidationError):
            cls.Config(no_such_key=1)
        with pytest.raises(ValidationError):
            cls.Config(pool="max")
        with pytest.raises(ValidationError):
            cls.Config(init_std=0)
    assert MambaTextB.Config(pool="token").pool == "token" and MambaTextC.Config(pool="token")
    for cls in (MambaTextA, MambaTextD):  # their hooks are per sample only
        with pytest.raises(ValidationError):
            cls.Config(pool="token")
    assert MambaTextA.Config().a_form == "channel"
    with pytest.raises(ValidationError):
        MambaTextA.Config(a_form="full")
    with pytest.raises(ValidationError):
        MambaTextB.Config(a_form="channel")


TEXT_CASES = ([(c, {"pool": p, "scan": s}) for c in TEXT for p in ("mean", "attention")
               for s in ("forward", "cross4")]
              + [(c, {"pool": "token", "scan": "bidirectional"}) for c in (MambaTextB, MambaTextC)]
              + [(MambaTextA, {"a_form": "separable"})])


@pytest.mark.parametrize("cls,params", TEXT_CASES,
                         ids=[f"{c.name}-{'-'.join(p.values())}" for c, p in TEXT_CASES])
def test_zeroed_projection_is_the_plain_mamba_stack(cls, params):
    m = build(cls, **params)
    x, text, mask = inputs()
    h = m(x, text, mask)
    ref = plain_stack(m.layers, m.perms, x)
    assert (h - ref).abs().amax(dim=(1, 2)).min() > 1e-6, "the hook changes nothing"
    with torch.no_grad():
        for layer in m.layers:
            for p in layer.proj:
                p.weight.zero_()
                p.bias.zero_()
    torch.testing.assert_close(m(x, text, mask), ref, atol=1e-12, rtol=0)


def _shift(cls, mixer: Mamba, a: torch.Tensor, a_form: str) -> None:
    """Move a per-sample hook value ``a`` into the mixer's own parameters."""
    E, N, R = mixer.d_inner, mixer.d_state, mixer.dt_rank
    with torch.no_grad():
        if cls is MambaTextA:
            mixer.A_log += a[:E, None] + (a[None, E:] if a_form == "separable" else 0)
        elif cls is MambaTextD:
            mixer.D += a
        else:  # B or C: a bias on x_proj's B or C rows
            lin = nn.Linear(E, R + 2 * N, bias=True).double()
            lin.weight.copy_(mixer.x_proj.weight)
            lin.bias.zero_()
            lin.bias[R:R + N] = a if cls is MambaTextB else 0
            lin.bias[R + N:] = a if cls is MambaTextC else 0
            mixer.x_proj = lin


@pytest.mark.parametrize("cls,a_form", [(MambaTextA, "channel"), (MambaTextA, "separable"),
                                        (MambaTextB, None), (MambaTextC, None), (MambaTextD, None)])
def test_per_sample_hook_is_the_sample_run_with_its_shifted_parameter(cls, a_form):
    """Sample i's output = the plain stack run on sample i alone, with every layer's and
    direction's parameter shifted by proj(mean of sample i's real caption tokens)."""
    params = {"a_form": a_form} if a_form else {}
    m = build(cls, scan="cross4", **params)
    x, text, mask = inputs()
    h = m(x, text, mask)
    for i in range(B):
        shifted = copy.deepcopy(m)
        pooled = real_mean(text, mask, i)
        for layer in shifted.layers:
            for mixer, proj in zip(layer.mix.mixers, layer.proj):
                _shift(cls, mixer, proj(pooled).detach(), a_form)
        ref = plain_stack(shifted.layers, shifted.perms, x[i:i + 1])
        torch.testing.assert_close(h[i:i + 1], ref, atol=1e-11, rtol=0)


@pytest.mark.parametrize("cls,params,hook,shape", [
    (MambaTextA, {}, "A_log_add", (B, 32)), (MambaTextA, {"a_form": "separable"}, "A_log_add", (B, 32, 16)),
    (MambaTextB, {}, "B_add", (B, 16)), (MambaTextB, {"pool": "token"}, "B_add", (B, 16, L)),
    (MambaTextC, {}, "C_add", (B, 16)), (MambaTextC, {"pool": "token"}, "C_add", (B, 16, L)),
    (MambaTextD, {}, "D_add", (B, 32))])
def test_each_variant_feeds_only_its_own_hook(cls, params, hook, shape, monkeypatch):
    seen = []
    forward = Mamba.forward

    def spy(self, x, mask=None, **kw):
        seen.append({k: tuple(v.shape) for k, v in kw.items() if v is not None})
        return forward(self, x, mask, **kw)

    monkeypatch.setattr(Mamba, "forward", spy)
    m = build(cls, **params)
    m(*inputs())
    assert len(seen) == 2 * 2  # depth x directions
    assert all(s == {hook: shape} for s in seen), seen


@pytest.mark.parametrize("cls", [MambaTextA, MambaTextC])
def test_attention_pool_with_zero_query_is_the_mean_pool(cls):
    att = build(cls, pool="attention", scan="forward")
    with torch.no_grad():
        for layer in att.layers:
            layer.pool.query.zero_()  # uniform attention over the real tokens
    mean = build(cls, pool="mean", scan="forward", seed=1)
    missing, unexpected = mean.load_state_dict(att.state_dict(), strict=False)
    assert not missing and unexpected and all(".pool." in k for k in unexpected)
    x, text, mask = inputs()
    torch.testing.assert_close(att(x, text, mask), mean(x, text, mask), atol=1e-12, rtol=0)
    null = torch.zeros(B, T, dtype=torch.bool)
    null[:, 0] = True  # the null caption: one real token
    torch.testing.assert_close(att(x, text, null), mean(x, text, null), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", [MambaTextB, MambaTextC])
def test_token_hook_is_each_tokens_own_text_read_in_each_directions_order(cls):
    """pool: token, against an explicit per-sample, per-token loop: position t of direction k's
    sequence (raster token p_k[t]) gets proj_k(sum_j softmax_j(q(u_p) . key(text_j) / sqrt(D)) text_j)."""
    m = build(cls, pool="token", scan="cross4")
    x, text, mask = inputs()
    h = m(x, text, mask)
    name = f"{cls.hook}_add"
    for i in range(B):
        real = text[i, mask[i]]  # [n, D]

        def hooks(li, k, p, i=i, real=real):
            layer = m.layers[li]
            u = layer.norm(s_in[li])[0]  # [L, D] raster
            reads = []
            for pos in range(L):
                w = torch.softmax(layer.pool.key(real) @ layer.pool.q(u[pos]) / D ** 0.5, 0)
                reads.append(w @ real)
            a = layer.proj[k](torch.stack(reads))  # [L, N] raster
            return {name: a[p].t().unsqueeze(0)}  # [1, N, L] in direction k's order

        # the stack's input per layer, recorded from the reference run itself
        s_in, s = [], x[i:i + 1]
        for li in range(len(m.layers)):
            s_in.append(s)
            s = plain_stack(m.layers[li:li + 1], m.perms, s,
                            hooks=lambda _, k, p, li=li: hooks(li, k, p))
        torch.testing.assert_close(h[i:i + 1], s, atol=1e-11, rtol=0)


# ------------------------------------------------------------------------------ mamba-critic

def sharp_logits(argmax: torch.Tensor, scale: float = 1e3) -> torch.Tensor:
    """Logits ``[B, L, K]`` whose softmax sample is ``argmax [B, L]`` (for a large ``scale``)."""
    return F.one_hot(argmax, K).to(F64) * scale - 1.0


class StubGenerator:
    """Stands in for the generator in the masked paradigm's loss: fixed logits, and what a
    generator with a critic pass returns; records the fill it was given and what it filled."""

    def __init__(self, logits: torch.Tensor, critic_logits: list, weight: float):
        self.logits, self.critic_logits, self.weight = logits, critic_logits, weight
        self.filled = None

    def __call__(self, inputs, feats, mask, fill=None):
        self.filled = fill(self.logits.detach())
        return self.logits, {"critic_logits": self.critic_logits, "critic_fill": self.filled,
                             "critic_weight": self.weight}


def some_masked(seed=1):
    """``[B, L]`` bool: a random half of each row, never empty."""
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(B, L, generator=g) < 0.5
    masked[:, 0] = True
    return masked


def test_critic_config_validation_and_registration():
    assert load_registry().get("mamba-critic") is MambaCritic and hasattr(MambaCritic, "critic")
    assert not hasattr(MambaCritic, "wants_targets"), "a variant never sees the true codes"
    cfg = MambaCritic.Config()
    assert (cfg.text, cfg.gate, cfg.critic_weight, cfg.scan) == ("hooks", "sigmoid", 0.1, "bidirectional")
    for bad in ({"gate": "tanh"}, {"text": "middle"}, {"critic_weight": -1.0}, {"critic_on": "masked"}):
        with pytest.raises(ValidationError):
            MambaCritic.Config(**bad)


def test_masked_paradigm_judges_the_filled_in_sequence_at_masked_positions_on_a_hand_example():
    """The head predicts position % K everywhere (sharply: its sample is its argmax); the truth
    agrees except at hand-picked places, some masked, some not. The paradigm fills the masked
    positions with the head's sample, the truth elsewhere, and scores the critics there only."""
    from ablate.paradigm import Batch, Masked, masked_loss

    pred = (torch.arange(L) % K).expand(B, L)
    targets = pred.clone()
    targets[0, [1, 4, 7]] = (targets[0, [1, 4, 7]] + 1) % K  # sample 0: three wrong
    targets[1, 0] = (targets[1, 0] + 3) % K  # sample 1: one wrong
    targets[2] = (targets[2] + 1) % K  # sample 2: all wrong
    masked = torch.zeros(B, L, dtype=torch.bool)
    masked[0, [1, 2, 4]] = True  # two of sample 0's wrong predictions masked, one right one
    masked[1, [0, 5]] = True
    masked[2, :] = True
    g = torch.Generator().manual_seed(0)
    critic = [torch.randn(B, L, generator=g, dtype=F64) for _ in range(2)]
    stub = StubGenerator(sharp_logits(pred), critic, 0.25)
    inputs_ = torch.where(masked, torch.full_like(targets, K), targets)
    loss = Masked(K).loss(stub, Batch(inputs_, targets, masked), None, None)
    fill = torch.where(masked, pred, targets)
    assert torch.equal(stub.filled, fill)
    labels = torch.zeros(B, L, dtype=F64)  # 1 = the token is the true one; read at masked places only
    labels[0, 2] = 1
    labels[1, 5] = 1
    assert torch.equal(labels.bool() & masked, (fill == targets) & masked)
    bce = [-(labels * F.logsigmoid(z) + (1 - labels) * F.logsigmoid(-z))[masked].mean() for z in critic]
    want = masked_loss(sharp_logits(pred), targets, masked) + 0.25 * (bce[0] + bce[1]) / 2
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=0)
    # the critic at the unmasked positions is not what the loss reads: their labels are 1 by
    # construction, and a loss over every position is a different number
    every = [-(((fill == targets).to(F64)) * F.logsigmoid(z) + (fill != targets) * F.logsigmoid(-z)).mean()
             for z in critic]
    assert abs(loss - masked_loss(sharp_logits(pred), targets, masked) - 0.25 * (every[0] + every[1]) / 2) > 1e-6


def test_critic_loss_ignores_unmasked_positions():
    from ablate.paradigm.masked import critic_loss

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(B, L, generator=g, dtype=F64) for _ in range(2)]
    label = torch.rand(B, L, generator=g) < 0.5
    masked = some_masked()
    loss = critic_loss(logits, label, masked)
    want = sum(F.binary_cross_entropy_with_logits(z[masked], label[masked].to(F64)) for z in logits) / 2
    torch.testing.assert_close(loss, want, atol=1e-14, rtol=0)
    # anything at unmasked positions: same loss, bit for bit
    other = [torch.where(masked, z, torch.randn(B, L, generator=g, dtype=F64) * 100) for z in logits]
    assert torch.equal(critic_loss(other, torch.where(masked, label, ~label), masked), loss)
    # at a masked position it counts
    flipped = label.clone()
    flipped[0, 0] = ~flipped[0, 0]
    assert critic_loss(logits, flipped, masked) != loss
    # no masked position at all: 0, not NaN
    assert critic_loss(logits, label, torch.zeros(B, L, dtype=torch.bool)) == 0


def test_critic_pass_and_confidence():
    """``forward`` gives the stack's state and the last critic's confidence; ``critic`` every
    critic's logits on another input (the filled-in sequence), as the stack would give them."""
    m = build(MambaCritic, critic_weight=0.3)
    x, text, mask = inputs()
    h, aux = m(x, text, mask)
    h_ref, _, logits_ref = m.run(x, text, mask)
    assert set(aux) == {"confidence"} and aux["confidence"].shape == (B, L)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(aux["confidence"], logits_ref[-1], atol=0, rtol=0)
    x2 = torch.randn_like(x)
    got, want = m.critic(x2, text, mask), m.run(x2, text, mask)[2]
    assert len(got) == 2 and all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(got, want))
    assert m.critic_weight == 0.3


def test_the_generator_fills_embeds_and_runs_the_critic_pass():
    """With a ``fill``, the generator embeds the filled-in sequence with its own token embedding
    (no gradient) and returns the critics' logits on it; the logits never depend on it."""
    enc = build_text_encoder(TextSpec(encoder="learned", max_len=T, width=D), ["a red circle"], None)
    torch.manual_seed(0)
    gen = Generator(MambaCritic, MambaCritic.Config(), enc, codebook_size=K, grid=GRID, width=D, depth=2,
                    heads=2, text_len=T).double().eval()
    feats, tmask = enc.featurize(["a red circle"] * B)
    tokens = torch.randint(0, K + 1, (B, L), generator=torch.Generator().manual_seed(2))
    fill_to = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(3))
    seen = []
    logits, aux = gen(tokens, feats, tmask, fill=lambda lg: seen.append(lg) or fill_to)
    assert len(seen) == 1 and not seen[0].requires_grad and torch.equal(seen[0], logits.detach())
    assert torch.equal(aux["critic_fill"], fill_to) and aux["critic_weight"] == 0.1
    text = gen.encode_text(feats, tmask)
    want = gen.backbone.critic(gen.embed(fill_to), text, tmask)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(aux["critic_logits"], want))
    torch.testing.assert_close(gen(tokens, feats, tmask)[0], logits, atol=0, rtol=0)


@pytest.mark.parametrize("gate", ["none", "sigmoid"])
def test_critic_pass_trains_the_critics_not_the_layers(gate):
    """The critic pass runs the layers without gradient: a loss on it reaches every critic and
    the caption, never a Mamba layer or the (filled-in) input states."""
    from ablate.paradigm.masked import critic_loss

    m = build(MambaCritic, gate=gate).train()
    x, text, mask = inputs(n_real=(5, 5, 5), garbage=False)
    x.requires_grad_()
    text.requires_grad_()
    label = torch.rand(B, L, generator=torch.Generator().manual_seed(4)) < 0.5
    critic_loss(m.critic(x, text, mask), label, some_masked()).backward()
    assert all(p.grad is None for p in m.layers.parameters())
    assert x.grad is None or x.grad.abs().sum() == 0
    for c in m.critics:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in c.parameters())
    assert text.grad.abs().sum() > 0

@pytest.mark.parametrize("scan", ["forward", "cross4"])
def test_gate_none_with_prefix_text_is_mamba_prefix(scan):
    m = build(MambaCritic, text="prefix", gate="none", scan=scan)
    ref = build(MambaPrefix, scan=scan, seed=5)
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("layers.")})
    x, text, mask = inputs()
    h, _ = m(x, text, mask)
    torch.testing.assert_close(h, ref(x, text, mask), atol=1e-12, rtol=0)


def test_gate_none_with_hooks_is_the_plain_stack_with_mean_pooled_b_c_hooks():
    m = build(MambaCritic, text="hooks", gate="none", scan="cross4")
    x, text, mask = inputs()
    h, _ = m(x, text, mask)
    for i in range(B):
        pooled = real_mean(text, mask, i).unsqueeze(0)

        def hooks(li, k, p):
            b_add, c_add = m.layers[li].proj[k](pooled).split(16, dim=-1)
            return {"B_add": b_add, "C_add": c_add}
        torch.testing.assert_close(h[i:i + 1], plain_stack(m.layers, m.orders, x[i:i + 1], hooks),
                                   atol=1e-12, rtol=0)


@pytest.mark.parametrize("text_mode", ["hooks", "prefix"])
def test_sigmoid_gate_scales_the_next_layers_input(text_mode):
    m = build(MambaCritic, text=text_mode)
    none = copy.deepcopy(m)
    none.cfg = none.cfg.model_copy(update={"gate": "none"})
    x, text, mask = inputs()
    h, states, logits = m.run(x, text, mask)
    assert (h - none.run(x, text, mask)[0]).abs().amax(dim=(1, 2)).min() > 1e-8, "the gate does nothing"
    # the critic's logit at 0 makes the gate exactly 1: identical to gate: none
    with torch.no_grad():
        for c in m.critics:
            c.out.weight.zero_()
            c.out.bias.zero_()
    torch.testing.assert_close(m.run(x, text, mask)[0], none.run(x, text, mask)[0], atol=0, rtol=0)
    # hooks mode, layer 2 by hand: its input is h_1 * 2 sigmoid(z_1)
    if text_mode == "hooks":
        m2 = build(MambaCritic, text="hooks")
        h, states, logits = m2.run(x, text, mask)
        gated = states[0] * 2 * torch.sigmoid(logits[0]).unsqueeze(-1)
        for i in range(B):
            pooled = real_mean(text, mask, i).unsqueeze(0)

            def hooks(li, k, p):
                b_add, c_add = m2.layers[1].proj[k](pooled).split(16, dim=-1)
                return {"B_add": b_add, "C_add": c_add}
            ref = plain_stack(m2.layers[1:], m2.orders, gated[i:i + 1], hooks)
            torch.testing.assert_close(states[1][i:i + 1], ref, atol=1e-12, rtol=0)


def test_critic_gradient_reaches_the_critic_only_through_the_loss_when_ungated():
    m = build(MambaCritic, gate="none").train()
    x, text, mask = inputs(n_real=(5, 5, 5), garbage=False)
    h, _ = m(x, text, mask)
    h.square().sum().backward()
    assert all(p.grad is None for p in m.critics.parameters())
    m.zero_grad()
    m.cfg = m.cfg.model_copy(update={"gate": "sigmoid"})
    h, _ = m(x, text, mask)
    h.square().sum().backward()
    # through the gate: every critic but the last (its logit gates nothing)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.critics[0].parameters())
    assert all(p.grad is None for p in m.critics[-1].parameters())


@pytest.mark.parametrize("text_mode", ["hooks", "prefix"])
def test_sampling_with_critic_remasking_runs_through_a_generator(text_mode):
    torch.manual_seed(0)
    captions = ["a red circle", "two blue squares", "a green dot"]
    enc = build_text_encoder(TextSpec(encoder="learned", max_len=T, width=D), captions, None)
    gen = Generator(MambaCritic, MambaCritic.Config(text=text_mode), enc, codebook_size=K, grid=GRID,
                    width=D, depth=2, heads=2, text_len=T).eval()
    calls, seen = [], []
    gen.backbone.register_forward_hook(lambda mod, args, out: calls.append(out[1]["confidence"].shape))
    forward = gen.forward
    gen.forward = lambda tokens, *a, **k: (seen.append(tokens.clone()), forward(tokens, *a, **k))[1]
    feats, tmask = enc.featurize(captions)
    null = enc.null_features(1)
    spec = SampleSpec(steps=3, guidance=1.0, remask="critic")
    out = sample_tokens(gen, feats, tmask, *null, spec, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, L) and out.dtype == torch.long
    assert ((out >= 0) & (out < K)).all()
    # per step: the guided pass (conditional + null stacked) and the critic's own pass
    assert calls[:2] == [(6, L), (3, L)] and len(calls) == 2 * 3
    # the critic's pass reads the filled-in sequence: no [MASK] left, the decided tokens kept,
    # and every token the step keeps decided is the one the critic saw
    for step in range(3):
        before, critic_in = seen[2 * step][:3], seen[2 * step + 1]
        after = seen[2 * step + 2][:3] if step < 2 else out
        assert (before == gen.mask_id).any() and not (critic_in == gen.mask_id).any()
        kept = before != gen.mask_id
        assert torch.equal(critic_in[kept], before[kept])
        decided = after != gen.mask_id
        assert torch.equal(after[decided], critic_in[decided])
    # training through the masked paradigm: the critic loss is there, finite, and counts only the
    # masked positions
    from ablate.paradigm import Batch, Masked, masked_loss

    inputs_ = out.clone()
    inputs_[:, ::2] = gen.mask_id
    where = inputs_ == gen.mask_id
    loss = Masked(K).loss(gen, Batch(inputs_, out, where), feats, tmask)
    plain = masked_loss(gen(inputs_, feats, tmask)[0], out, where)
    assert torch.isfinite(loss) and loss > plain
    from ablate.paradigm.masked import critic_loss

    _, aux = gen(out, feats, tmask, fill=lambda lg: out)
    assert critic_loss(aux["critic_logits"], aux["critic_fill"] == out, torch.zeros_like(where)) == 0, \
        "nothing masked, nothing judged"


def test_critic_training_resumes_exactly(tmp_path):
    """The fill-in samples from the global RNG, which the trainer seeds per step: a run resumed
    from a checkpoint ends with the same weights as the uninterrupted run."""
    from ablate.config import RunSpec
    from ablate.prepare import prepare
    from variant_case import assert_resume_is_exact

    spec = RunSpec.model_validate({
        "data": {"name": "shapes", "image_size": 16, "n_train": 64, "n_val": 16, "n_test": 16},
        "tokenizer": {"codebook_size": 16, "code_dim": 8, "hidden": 16, "downsample": 4, "steps": 5,
                      "batch_size": 16},
        "text": {"max_len": 10, "width": 16, "heads": 2, "layers": 1},
        "model": {"variant": "mamba-critic", "width": 16, "depth": 2, "heads": 2},
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "log_every": 2, "eval_every": 2,
                  "checkpoint_every": 2, "throughput_warmup": 0, "ema_decay": 0.9},
        "eval": {"n_images": 8, "judge_steps": 5},
    })
    prep = prepare(spec, tmp_path, torch.device("cpu"), lambda m: None)
    assert_resume_is_exact(spec, prep, tmp_path, stop_at=2)
