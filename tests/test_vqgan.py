"""The VQGAN recipe of issue 19: LPIPS from local weights, PatchGAN + hinge + adaptive weight, EMA
weights that encode and are saved and loaded as such, progressive stages with an exact resume
inside a stage, codebook collapse as a loud error, and the new settings' keys (old keys stand)."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import ablate.tokenizer.vqvae as vqvae
from ablate.config import RunSpec, TokenizerSpec, format_validation_error, run_key
from ablate.tokenizer import VQVAE, get_tokenizer, tokenizer_key
from ablate.tokenizer.health import CodebookCollapse
from ablate.tokenizer.stages import _Run, fit, resize, schedule
from ablate.tokenizer.vqgan import (LPIPS, PatchGAN, WeightsEMA, adaptive_weight, hinge_d_loss, load_lpips,
                                    lpips_state_from)
from ablate.utils import torch_load
from test_tokenizer import TINY, squares, tiny

WIDTHS = (4, 8, 8, 8, 8)  # a narrow VGG16-layout LPIPS: same keys as the real one, ~10k weights
CONVS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))


def staged(stages: list[dict], **kw) -> TokenizerSpec:
    """The tiny tokenizer of test_tokenizer with a stage schedule (steps and batch are per stage)."""
    base = {k: v for k, v in TINY.items() if k not in ("steps", "batch_size")}
    return TokenizerSpec(**{**base, **kw, "stages": stages})


def random_lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out, c_in = {}, 3
    for s, (convs, c) in enumerate(zip(CONVS, WIDTHS)):
        for idx in convs:
            out[f"net.slice{s + 1}.{idx}.weight"] = torch.randn(c, c_in, 3, 3, generator=g) / (3 * c_in ** 0.5)
            out[f"net.slice{s + 1}.{idx}.bias"] = torch.randn(c, generator=g) * 0.1
            c_in = c
        out[f"lin{s}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g)
    return out


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.pt"
    torch.save(random_lpips_state(), path)
    return path


def test_old_tokenizer_and_run_keys_stand_and_every_new_setting_changes_the_key(lpips_file, tmp_path):
    # keys computed by the code before issue 19 (the new fields are LATER and left out at default)
    assert tokenizer_key(TokenizerSpec(), "d", (32, 32)) == "7fa181058c303931"
    assert tokenizer_key(tiny(), "d", (16, 16)) == "d1378498ff7a9a2f"
    assert run_key(RunSpec()) == "0a82c84c6033ce11"
    base = tokenizer_key(TokenizerSpec(), "d", (32, 32))
    changed = dict(act="silu", lookup="cosine", l1_weight=1.0, l2_weight=0.5, lpips_weights=str(lpips_file),
                   perceptual_weight=0.5, disc_weight=0.1, disc_start=5, disc_layers=2, disc_channels=8,
                   ema_weights=0.99, stages=[{"image_size": 32, "batch_size": 4, "steps": 3}])
    keys = {name: tokenizer_key(TokenizerSpec(**{name: v}), "d", (32, 32)) for name, v in changed.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys), keys
    # LPIPS weights are named by content: a copy elsewhere is the same tokenizer, other weights are not
    copy = tmp_path / "elsewhere.pt"
    copy.write_bytes(lpips_file.read_bytes())
    assert tokenizer_key(TokenizerSpec(lpips_weights=str(copy)), "d", (32, 32)) == keys["lpips_weights"]
    torch.save(random_lpips_state(seed=1), copy)
    assert tokenizer_key(TokenizerSpec(lpips_weights=str(copy)), "d", (32, 32)) != keys["lpips_weights"]
    with pytest.raises(FileNotFoundError, match="tokenizer.lpips_weights: no file"):
        tokenizer_key(TokenizerSpec(lpips_weights=str(tmp_path / "missing.pt")), "d", (32, 32))


def test_stage_settings_are_checked_with_one_line_errors():
    stage = {"image_size": 16, "batch_size": 4, "steps": 3}
    with pytest.raises(ValidationError, match="tokenizer.steps is set per stage"):
        TokenizerSpec(steps=10, stages=[stage])
    with pytest.raises(ValidationError, match=r"stages\[0\].image_size \(12\) must be a multiple"):
        TokenizerSpec(downsample=8, stages=[{**stage, "image_size": 12}])
    with pytest.raises(ValidationError, match="grad_accum"):
        TokenizerSpec(stages=[{**stage, "grad_accum": 0}])
    tree = {"data": {"image_size": 32}, "tokenizer": {"stages": [stage]}}
    with pytest.raises(ValidationError) as err:
        RunSpec.model_validate(tree)
    line = format_validation_error(err.value)
    assert "must end at data.image_size (32)" in line and "\n" not in line
    spec = RunSpec.model_validate({**tree, "tokenizer": {"stages": [stage, {**stage, "image_size": 32}]}})
    assert spec.tokenizer.total_steps == 6
    assert spec.tokenizer.images_drawn == 24 and tiny().images_drawn == 400 * 16
    accum = TokenizerSpec(stages=[stage, {**stage, "grad_accum": 2}])
    assert accum.images_drawn == 12 + 24, "streamed data: the head of the split the stages can see"
    st = schedule(spec.tokenizer, (32, 32))
    assert [(s.image_size, s.start, s.end) for s in st] == [((16, 16), 0, 3), ((32, 32), 3, 6)]
    assert [(s.batch_size, s.grad_accum, s.steps) for s in schedule(tiny(), (16, 24))] == [(16, 1, 400)]


def test_resize_is_an_exact_box_filter():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    y = resize(x, (4, 4))
    want = x.float().reshape(3, 3, 4, 2, 4, 2).mean((3, 5)).round()
    assert y.dtype == torch.uint8 and torch.equal(y.float(), want)
    assert resize(x, (8, 8)) is x


# ------------------------------------------------------------------------------------------ LPIPS

def test_lpips_loads_local_weights_and_is_a_differentiable_distance(lpips_file, tmp_path):
    net = load_lpips(lpips_file)
    assert [lin.weight.shape[1] for lin in net.lins] == list(WIDTHS)  # widths read from the file
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(4, 3, 16, 16, generator=g)).clamp(-1, 1)
    assert torch.allclose(net(x, x), torch.zeros(4), atol=1e-6)
    d = net(x, y)
    assert d.shape == (4,) and (d > 0).all() and torch.allclose(d, net(y, x), rtol=1e-5)
    # more noise, larger distance (on average over the batch)
    assert net(x, (x + torch.randn(4, 3, 16, 16, generator=g)).clamp(-1, 1)).mean() > d.mean()
    y.requires_grad_(True)
    net(x, y).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())
    net.train()
    assert not net.training, "LPIPS stays frozen when a parent module trains"
    # the same weights via safetensors, and via torchvision + lpips files (lpips_state_from)
    from safetensors.torch import save_file

    state = random_lpips_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_lpips(tmp_path / "w.safetensors")(x, y.detach()), net(x, y.detach()))
    features = {f"features.{k.split('.', 2)[2]}": v for k, v in state.items() if k.startswith("net.")}
    lins = {k: v for k, v in state.items() if k.startswith("lin")}
    assert torch.equal(LPIPS(lpips_state_from(features, lins))(x, y.detach()), net(x, y.detach()))
    del state["net.slice3.12.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken.pt: not an LPIPS VGG16 state dict.*net.slice3.12.weight"):
        load_lpips(tmp_path / "broken.pt")


# ------------------------------------------------------------------------------------ GAN pieces

def test_patchgan_hinge_and_adaptive_weight():
    d = PatchGAN(channels=8, layers=2)
    assert d.min_size() == 12 and d(torch.zeros(2, 3, 12, 12)).shape == (2, 1, 1, 1)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # one logit per overlapping patch
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -2.0)) == 0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == pytest.approx(1.0)
    # ||d rec/d w|| / ||d g/d w|| for rec = <w, a>, g = <w, b>: |a| / |b|
    w = torch.randn(5, requires_grad=True)
    a, b = torch.randn(5), torch.randn(5)
    got = adaptive_weight((w * a).sum(), (w * b).sum(), w)
    assert got.item() == pytest.approx((a.norm() / (b.norm() + 1e-4)).item(), rel=1e-5)
    assert not got.requires_grad


def test_discriminator_switches_on_after_disc_start(data16):
    """Up to disc_start steps the VQGAN run is the plain run bit for bit; after it they part."""
    train, _ = data16
    plain = dict(steps=6, batch_size=8, warmup_steps=2)
    gan = dict(plain, disc_weight=0.5, disc_start=4, disc_layers=1, disc_channels=8)
    before = [fit(tiny(**{**kw, "steps": 4}), train, log=lambda s: None).model.state_dict() for kw in (plain, gan)]
    after = [fit(tiny(**kw), train, log=lambda s: None).model.state_dict() for kw in (plain, gan)]
    assert all(torch.equal(before[0][k], before[1][k]) for k in before[0])
    assert not torch.equal(after[0]["decoder.net.0.weight"], after[1]["decoder.net.0.weight"])


def _stop_at(step: int):
    class Killed(Exception):
        pass

    def hook(s: int) -> None:
        if s == step:
            raise Killed(f"killed at step {s}")
    hook.exc = Killed
    return hook


@pytest.fixture(scope="module")
def data16() -> tuple[torch.Tensor, torch.Tensor]:
    return squares(64, seed=0), squares(16, seed=1)


def test_micro_batches_accumulate_to_the_full_batch_gradient(lpips_file, data16):
    """grad_accum = 2 on two halves gives the gradient of the whole batch (losses are means)."""
    train, _ = data16
    spec = tiny(quantizer="st", dead_code_restart=False, l1_weight=1.0, lpips_weights=str(lpips_file))
    grads = []
    for halves in (False, True):
        run = _Run(spec, (16, 16), torch.device("cpu"), 64, 16)
        run.model.quantizer.initialised.fill_(True)  # no data-dependent codebook init
        run.opt.zero_grad()
        if halves:
            run.micro_step(train[:8], 2, False)
            run.micro_step(train[8:16], 2, False)
        else:
            run.micro_step(train[:16], 1, False)
        grads.append([p.grad.clone() for p in run.model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(*grads))


# ------------------------------------------------------------------------------------ EMA weights

def test_weights_ema_update_rule():
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = WeightsEMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # warm-up decay min(0.5, 1/10) = 0.1: 0.1 * 0 + 0.9 * 1
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9))
    for _ in range(20):
        ema.update(m)
    assert torch.allclose(ema.module.weight, torch.ones(1, 2), atol=1e-5)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m)  # decay now 0.5
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 2.0), atol=1e-4)


def test_ema_weights_are_saved_loaded_and_used(data16, tmp_path, monkeypatch):
    """The seed's bug was loading the raw weights where the EMA ones belonged: the cached state
    is the EMA one, it differs from the raw one, and it is what a reload encodes with."""
    train, val = data16
    spec = tiny(steps=30, batch_size=8, ema_weights=0.9)
    vq1, m1, key = get_tokenizer(spec, "sq", train, val, tmp_path, log=lambda s: None)
    blob = torch_load(tmp_path / "cache" / "tokenizer" / key / "vqvae.pt")
    ema, raw = blob["state"], blob["raw_state"]
    assert ema.keys() == raw.keys()
    assert not torch.equal(ema["decoder.net.0.weight"], raw["decoder.net.0.weight"])
    assert all(torch.equal(ema[k], v) for k, v in vq1.state_dict().items()), "trained model = EMA weights"
    monkeypatch.setattr(vqvae, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    vq2, m2, _ = get_tokenizer(spec, "sq", train, val, tmp_path, log=lambda s: None)
    assert m2 == m1 and all(torch.equal(ema[k], v) for k, v in vq2.state_dict().items())
    as_raw = VQVAE(spec, (16, 16))
    as_raw.load_state_dict(raw)
    assert torch.equal(vq2.encode(val), vq1.encode(val))
    assert not torch.equal(vq2.decode(vq2.encode(val)), as_raw.decode(as_raw.encode(val)))


# ------------------------------------------------------------------- stages and resume in a stage

def test_killed_training_resumes_inside_its_stage_exactly(lpips_file, data16, tmp_path):
    """Two stages (16 then 32 px, accumulation in the second), GAN from step 2, LPIPS, EMA: a run
    killed at step 11 resumes from its step-9 checkpoint, inside stage 1, and ends bit for bit
    where the uninterrupted run ends."""
    train = torch.nn.functional.interpolate(data16[0].float(), scale_factor=2).to(torch.uint8)  # 32 px
    val = torch.nn.functional.interpolate(data16[1].float(), scale_factor=2).to(torch.uint8)
    spec = staged([{"image_size": 16, "batch_size": 8, "steps": 6},
                   {"image_size": 32, "batch_size": 4, "grad_accum": 2, "steps": 6}],
                  warmup_steps=2, l1_weight=1.0, lpips_weights=str(lpips_file), disc_weight=0.5,
                  disc_start=2, disc_layers=1, disc_channels=8, ema_weights=0.9)
    whole = fit(spec, train, val_images=val, log=lambda s: None)
    state = tmp_path / "train_state.pt"
    kill = _stop_at(11)
    with pytest.raises(kill.exc):
        fit(spec, train, val_images=val, log=lambda s: None, state_file=state, checkpoint_every=3, after_step=kill)
    saved = torch_load(state)
    assert (saved["step"], saved["stage"], saved["stage_step"]) == (9, 1, 3)
    lines: list[str] = []
    resumed = fit(spec, train, val_images=val, log=lines.append, state_file=state, checkpoint_every=3)
    assert any("resuming at step 9/12 (stage 1, 32x32, step 3 of 6)" in s for s in lines), lines
    for got, want in ((resumed.model.state_dict(), whole.model.state_dict()), (resumed.raw, whole.raw)):
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.stages == whole.stages
    assert [r["image_size"] for r in whole.stages] == [16, 32]
    assert resumed.restarts == whole.restarts


def test_stage_health_is_reported_per_stage(data16, tmp_path):
    train, val = data16
    spec = staged([{"image_size": 8, "batch_size": 8, "steps": 5}, {"image_size": 16, "batch_size": 8, "steps": 5}],
                  warmup_steps=2, restart_after=2)
    _, m, _ = get_tokenizer(spec, "sq", train, val, tmp_path, log=lambda s: None)
    for i in (0, 1):
        assert 0 < m[f"tok_stage{i}_codebook_usage"] <= 1 and m[f"tok_stage{i}_perplexity"] >= 1
        assert m[f"tok_stage{i}_recon_mse"] > 0 and m[f"tok_stage{i}_restarts"] >= 0
    assert m["tok_restarts"] == m["tok_stage0_restarts"] + m["tok_stage1_restarts"]
    assert m["tok_stage1_codebook_usage"] == m["tok_codebook_usage"]  # last stage = the final model
    assert not list((tmp_path / "cache" / "tokenizer").glob("*/train_state.pt")), "checkpoint removed"


# ------------------------------------------------------------------------------------ collapse

def test_collapsed_tokenizer_fails_loudly_also_from_the_cache(tmp_path, monkeypatch):
    """One token per image and identical images: one code in use, so preparation must stop with
    the settings and the remedy, not hand the generator a tokenizer that says nothing."""
    same = torch.full((32, 3, 16, 16), 90, dtype=torch.uint8)
    spec = tiny(downsample=16, steps=4, warmup_steps=2)
    lines: list[str] = []
    get_tokenizer(tiny(downsample=16, steps=2, warmup_steps=2), "flat", same, same[:16], tmp_path, log=lines.append)
    assert "not checked for collapse" in lines[-1], "a smoke-test tokenizer (no step past warmup) is only logged"
    with pytest.raises(CodebookCollapse) as err:
        get_tokenizer(spec, "flat", same, same[:16], tmp_path, log=lambda s: None)
    msg = str(err.value)
    assert "collapsed: 1 of 32 codes" in msg and "downsample: 16" in msg and "tokenizer.act: silu" in msg
    assert "\n" not in msg
    monkeypatch.setattr(vqvae, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    with pytest.raises(CodebookCollapse):
        get_tokenizer(spec, "flat", same, same[:16], tmp_path, log=lambda s: None)


def test_cosine_lookup_keeps_codes_and_inputs_on_the_unit_sphere(data16):
    train, val = data16
    vq = fit(tiny(lookup="cosine", steps=20, batch_size=8, warmup_steps=2), train, log=lambda s: None).model
    assert torch.allclose(vq.quantizer.lookup(torch.arange(32)).norm(dim=1), torch.ones(32), atol=1e-5)
    z = vq.encoder(vq.to_input(val)).permute(0, 2, 3, 1).reshape(-1, 8)
    # the nearest code by angle, whatever the vector's length
    assert torch.equal(vq.quantizer.codes(z), vq.quantizer.codes(3.0 * z))
    e = torch.nn.functional.normalize(vq.quantizer.embed, dim=1)
    assert torch.equal(vq.quantizer.codes(z), (torch.nn.functional.normalize(z, dim=1) @ e.t()).argmax(1))
