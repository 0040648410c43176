"""VQ-VAE tokenizer: shapes and dtypes, learning (EMA and straight-through), dead-code restarts,
the EMA update rule, determinism, and the tokenizer / token caches."""
from __future__ import annotations

import torch
import pytest

import ablate.tokenizer.vqvae as vqvae
from ablate.config import TokenizerSpec
from ablate.tokenizer import VQVAE, evaluate_vqvae, get_tokenizer, tokenize_cached, train_vqvae
from ablate.tokenizer.vqvae import Quantizer

COLOURS = torch.tensor([[220, 40, 40], [40, 170, 60], [40, 90, 230], [235, 215, 40]], dtype=torch.uint8)


def squares(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """uint8 [n, 3, size, size]: one coloured 6x6 square in one of four quadrants on dark grey."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.full((n, 3, size, size), 24, dtype=torch.uint8)
    colour = torch.randint(0, len(COLOURS), (n,), generator=g)
    quad = torch.randint(0, 4, (n,), generator=g)
    half = size // 2
    for i in range(n):
        y, x = 1 + half * (int(quad[i]) // 2), 1 + half * (int(quad[i]) % 2)
        imgs[i, :, y:y + 6, x:x + 6] = COLOURS[colour[i]][:, None, None]
    return imgs


TINY = dict(codebook_size=32, code_dim=8, hidden=16, res_blocks=1, steps=400, batch_size=16,
            lr=5e-3, warmup_steps=10, restart_after=10)


def tiny(**kw) -> TokenizerSpec:
    return TokenizerSpec(**{**TINY, **kw})


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return squares(512, seed=0), squares(64, seed=1)


def test_encode_decode_shapes_and_dtypes():
    vq = VQVAE(tiny(), (16, 24))
    assert vq.grid == (4, 6) and vq.codebook_size == 32
    vq.train()
    codes = vq.encode(squares(5, 0, 24)[..., :16, :])  # [5, 3, 16, 24]
    assert codes.dtype == torch.long and codes.shape == (5, 4, 6)
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    assert vq.training, "encode must restore the module's mode"
    out = vq.decode(codes)
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 16, 24)
    with pytest.raises(ValueError, match="uint8"):
        vq.encode(torch.zeros(2, 3, 16, 24))
    with pytest.raises(ValueError, match="codes"):
        vq.decode(codes[:, :3])
    with pytest.raises(ValueError, match="tokenizer.downsample"):
        VQVAE(tiny(), (18, 16))


def test_codes_are_per_position():
    """A code must describe its own patch: changing one patch changes only codes within the
    encoder's receptive field around it (a swapped h/w axis or a wrong reshape moves the change)."""
    torch.manual_seed(0)
    vq = VQVAE(tiny(codebook_size=128), (32, 32)).eval()
    a = torch.full((1, 3, 32, 32), 24, dtype=torch.uint8)
    b = a.clone()
    b[0, :, 24:28, 0:4] = 200  # the patch of token (row 6, col 0)
    with torch.no_grad():  # codebook = every encoder output of both images: each finds itself
        z = vq.encoder(vq.to_input(torch.cat([a, b])))
        vq.quantizer.embed.copy_(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    ca, cb = vq.encode(a)[0], vq.encode(b)[0]
    changed = {tuple(rc) for rc in (ca != cb).nonzero().tolist()}
    assert (6, 0) in changed
    # receptive field of a token: pixels 4j-7 .. 4j+10, so only rows >= 4 and columns <= 2 can see it
    assert all(r >= 4 and c <= 2 for r, c in changed), changed


@pytest.mark.parametrize("quantizer", ["ema", "st"])
def test_both_quantizers_learn_to_reconstruct(data, quantizer):
    train, val = data
    baseline = (val.float() / 255 - val.float().mean((0,), keepdim=True) / 255).pow(2).mean().item()
    vq = train_vqvae(tiny(quantizer=quantizer), train, log=lambda s: None)
    m = evaluate_vqvae(vq, val)
    assert m["tok_recon_mse"] < 0.1 * baseline, (m, baseline)
    assert m["tok_recon_mse"] < 0.001, m
    assert 0 < m["tok_codebook_usage"] <= 1 and m["tok_perplexity"] > 4
    # colours survive: the mean colour of each reconstructed square matches the original's
    rec = vq.decode(vq.encode(val)).float()
    obj = (val.float() - 24).abs().amax(1, keepdim=True) > 60
    mean = lambda x: (x * obj).sum((2, 3)) / obj.sum((2, 3))  # noqa: E731
    assert (mean(rec) - mean(val.float())).abs().max() < 25


def test_straight_through_gradients_reach_encoder_and_codebook():
    for kind in ("ema", "st"):
        vq = VQVAE(tiny(quantizer=kind), (16, 16)).train()
        x = squares(4, 0).float() / 127.5 - 1
        recon, _, vq_loss = vq(x, torch.Generator().manual_seed(0))
        ((recon - (x + 1) / 2).pow(2).mean() + vq_loss).backward()
        first = vq.encoder.net[0].weight.grad
        assert first is not None and first.abs().sum() > 0, kind
        if kind == "st":
            assert vq.quantizer.embed.grad.abs().sum() > 0
        else:
            assert not any(p is vq.quantizer.embed for p in vq.parameters())


def test_ema_update_moves_codes_to_cluster_means():
    q = Quantizer(tiny(codebook_size=2, code_dim=2, ema_decay=1e-6, dead_code_restart=False)).train()
    q.initialised.fill_(True)
    q.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 8.0], [11.0, 10.0]])  # two clusters
    q(z.t().reshape(1, 2, 2, 2).contiguous())  # [1, C, h, w]; rows of z are the h*w positions
    assert torch.allclose(q.embed, torch.tensor([[0.5, 0.5], [10.0, 9.0]]), atol=1e-3), q.embed


def test_dead_code_restart_revives_codes():
    """All codes but one start far from the data: without restarts one code is ever used,
    with them the dead codes move onto encoder outputs within a few steps."""
    used = {}
    for restart in (False, True):
        q = Quantizer(tiny(codebook_size=16, code_dim=4, dead_code_restart=restart, restart_after=2)).train()
        q.initialised.fill_(True)
        q.embed.copy_(torch.full((16, 4), 100.0))
        q.embed[0] = 0.0
        q.embed_sum.copy_(q.embed)
        q.cluster_size.fill_(1.0)
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            z = torch.randn(8, 4, 4, 4, generator=g)  # [n, C, h, w]
            q(z, g)
        z = torch.randn(64, 4, 4, 4, generator=g).permute(0, 2, 3, 1).reshape(-1, 4)
        used[restart] = q.codes(z).unique().numel()
        if restart:
            assert q.restarts >= 15
            assert q.embed.abs().max() < 20, "restarted codes must sit on encoder outputs"
    assert used[False] == 1
    assert used[True] >= 12, used


def test_training_is_deterministic_by_seed(data):
    train, _ = data
    spec = tiny(steps=30)
    a = train_vqvae(spec, train, log=lambda s: None).state_dict()
    b = train_vqvae(spec, train, log=lambda s: None).state_dict()
    c = train_vqvae(tiny(steps=30, seed=1), train, log=lambda s: None).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.net.0.weight"], c["decoder.net.0.weight"])


def test_get_tokenizer_caches_and_reloads(data, tmp_path, monkeypatch):
    train, val = data
    spec = tiny(steps=40)
    lines: list[str] = []
    vq1, m1, key = get_tokenizer(spec, "squares-v1", train, val, tmp_path, "cpu", log=lines.append)
    assert any("training" in s for s in lines)
    assert set(m1) == {"tok_recon_mse", "tok_codebook_usage", "tok_perplexity", "tok_restarts", "tok_train_s"}
    assert m1["tok_train_s"] > 0
    assert (tmp_path / "cache" / "tokenizer" / key / "vqvae.pt").exists()

    def no_training(*a, **k):
        raise AssertionError("a cached tokenizer was retrained")

    monkeypatch.setattr(vqvae, "train_tokenizer", no_training)
    vq2, m2, key2 = get_tokenizer(spec, "squares-v1", train, val, tmp_path, "cpu", log=lines.append)
    assert key2 == key and m2 == m1
    assert not vq2.training
    assert torch.equal(vq1.encode(val), vq2.encode(val))
    assert torch.equal(vq1.decode(vq1.encode(val)), vq2.decode(vq2.encode(val)))
    # another dataset or another spec is another tokenizer
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer(spec, "squares-v2", train, val, tmp_path, "cpu", log=lines.append)
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer(tiny(steps=41), "squares-v1", train, val, tmp_path, "cpu", log=lines.append)


def test_tokenize_cached_hits_and_tracks_content(data, tmp_path, monkeypatch):
    train, val = data
    vq = VQVAE(tiny(codebook_size=40000), (16, 16))  # > 2**15 codes: stored as int32, not int16
    codes = tokenize_cached(vq, "k", "val", val, tmp_path)
    assert codes.dtype == torch.long and torch.equal(codes, vq.encode(val))
    calls = []
    real = VQVAE.encode
    monkeypatch.setattr(VQVAE, "encode", lambda self, x: calls.append(1) or real(self, x))
    again = tokenize_cached(vq, "k", "val", val, tmp_path)
    assert torch.equal(again, codes) and not calls, "second call must read the cache"
    other = tokenize_cached(vq, "k", "val", train[: len(val)], tmp_path)  # same split and n
    assert calls, "different images with the same split and n must not hit the old cache"
    assert torch.equal(other, real(vq, train[: len(val)]))
