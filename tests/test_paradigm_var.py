"""The ``var`` paradigm and its multiscale tokenizer: parents across scales, the residual
quantizer's encode/decode, block-causality of every variant that declares ``var`` (perturb the
inputs of scale k: nothing at coarser scales moves), the bad-input errors, and a tiny run that
trains and samples in as many forwards as there are scales."""
from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from ablate.config import RunSpec, SampleSpec, TokenizerSpec
from ablate.grid import GridError, load_grid
from ablate.model import Generator
from ablate.paradigm import VAR
from ablate.paradigm.var import parents
from ablate.tokenizer.vqvae import VQVAE
from test_contract import K, T
from test_paradigm_ar import REGISTRY, FeatText, pairs_for, text_batch
from test_precision import _losses
from test_trust_jobs import TINY

D = 16
SCALES = [1, 2, 3]
BLOCKS = (1, 4, 9)
L = sum(BLOCKS)


PAIRS = pairs_for("var")


def generator(name: str, params: dict, seed: int = 0) -> Generator:
    cls = REGISTRY.get(name)
    torch.manual_seed(seed)
    g = Generator(cls, cls.Config(**params), FeatText(), codebook_size=K, grid=(1, L), width=D, depth=2, heads=2,
                  text_len=T, causal=True, blocks=BLOCKS)
    return g.double().eval()


def test_parents_are_the_nearest_coarser_tokens():
    p = parents([1, 2, 3]).tolist()
    assert p[:5] == [-1, 0, 0, 0, 0]  # scale 2 reads the single token of scale 1
    # scale 3 (3x3) from scale 2 (2x2, positions 1..4): rows/cols (i * 2) // 3 = 0, 0, 1
    assert p[5:] == [1, 1, 2, 1, 1, 2, 3, 3, 4]
    var = VAR(K, [1, 2, 3])
    codes = torch.arange(L)[None] % K
    batch = var.make_batch(codes, None, share=(0, 2))
    assert batch.inputs[0, 0] == K and torch.equal(batch.inputs[0, 1:], codes[0, torch.tensor(p[1:])])
    assert torch.equal(batch.targets, codes) and bool(batch.where.all()) and batch.total == 2 * L


def test_declared_by_the_causal_backbones():
    assert {"transformer", "uvit", "mamba-prefix", "mamba-adaln", "hybrid-gsa"} <= {n for n, _ in PAIRS}


@pytest.mark.parametrize("name,params", PAIRS, ids=[n for n, _ in PAIRS])
@pytest.mark.parametrize("k", [1, 2])
def test_block_causal_backbone_sees_no_finer_scale(name, params, k):
    """Perturb every input of scale k: no output of a coarser scale moves; scale k's do."""
    gen = generator(name, params)
    feats, mask = text_batch()
    tokens = torch.randint(0, K + 1, (3, L), generator=torch.Generator().manual_seed(3))
    lo, hi = sum(BLOCKS[:k]), sum(BLOCKS[:k + 1])
    other = tokens.clone()
    other[:, lo:hi] = (tokens[:, lo:hi] + 1) % (K + 1)
    a, b = gen(tokens, feats, mask)[0], gen(other, feats, mask)[0]
    assert torch.allclose(a[:, :lo], b[:, :lo], rtol=0, atol=1e-12), f"{name}: a coarser scale saw scale {k}"
    assert not torch.allclose(a[:, lo:hi], b[:, lo:hi])


def test_transformer_attends_within_its_scale():
    """Block-causal, not merely causal: the first token of a scale reads its scale's last one."""
    gen = generator("transformer", {})
    feats, mask = text_batch()
    tokens = torch.randint(0, K + 1, (3, L), generator=torch.Generator().manual_seed(5))
    other = tokens.clone()
    other[:, L - 1] = (tokens[:, L - 1] + 1) % (K + 1)
    first = sum(BLOCKS[:-1])
    assert not torch.allclose(gen(tokens, feats, mask)[0][:, first], gen(other, feats, mask)[0][:, first])


def test_sampling_takes_one_forward_per_scale():
    gen = generator("transformer", {})
    calls = []
    gen.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    feats, mask = text_batch()
    null_f, null_m = torch.zeros(1, T, D, dtype=torch.float64), torch.zeros(1, T, dtype=torch.bool)
    out = VAR(K, SCALES).sample(gen, feats, mask, null_f, null_m, SampleSpec(guidance=2.0, top_k=4, decode="full"),
                                torch.Generator().manual_seed(0))
    assert out.shape == (3, L) and int(out.max()) < K
    assert calls == [(6, L)] * 3  # conditional and null caption stacked, once per scale


def test_multiscale_tokenizer_encode_decode_agree_with_its_forward():
    torch.manual_seed(0)
    vq = VQVAE(TokenizerSpec(kind="multiscale", scales=[1, 2, 4], code_dim=8, codebook_size=16, hidden=16,
                             downsample=4), (16, 16)).eval()
    assert vq.grid == (1, 21)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        rec, idx, _ = vq(vq.to_input(images))
    codes = vq.encode(images)
    assert codes.shape == (3, 1, 21) and torch.equal(codes, idx)
    assert torch.equal(vq.decode(codes), rec.clamp(0, 1).mul(255).round().to(torch.uint8))
    # coarse to fine: the first code alone already decodes to an image (the map's mean)
    only_first = codes.clone()
    only_first[..., 1:] = codes[..., :1]
    assert vq.decode(only_first).shape == (3, 3, 16, 16)


def test_bad_settings_are_one_line_errors(tmp_path):
    from ablate.config import paradigm_problem

    assert "var predicts the scales of a multiscale tokenizer" in paradigm_problem(
        RunSpec.model_validate({"model": {"paradigm": "var"}}))
    assert "must end at the grid side 8" in paradigm_problem(RunSpec.model_validate(
        {"model": {"paradigm": "var"}, "data": {"image_size": 32},
         "tokenizer": {"kind": "multiscale", "scales": [1, 2, 4], "downsample": 4}}))
    with pytest.raises(ValidationError, match="increasing token map sides"):
        TokenizerSpec(kind="multiscale", scales=[2, 1])
    with pytest.raises(ValidationError, match="only for kind: multiscale"):
        TokenizerSpec(scales=[1, 2])
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbase: {data: {image_size: 32}, model: {paradigm: var}, "
                    "tokenizer: {kind: multiscale, scales: [1, 2, 4, 8], downsample: 4}}\n"
                    "axes:\n  model.variant: [transformer, m-mamba]\n")
    with pytest.raises(GridError, match="variant 'm-mamba' cannot generate with 'var'"):
        load_grid(path)
    # the base may set the tokenizer and an axis the paradigm: checked per cell
    path.write_text("name: g\nbase: {data: {image_size: 32}, "
                    "tokenizer: {kind: multiscale, scales: [1, 2, 4, 8], downsample: 4}}\n"
                    "axes:\n  model.paradigm: [var]\n")
    assert [c.spec.model.paradigm for c in load_grid(path).cells] == ["var"]
    path.write_text("name: g\nbase: {data: {image_size: 32}, "
                    "tokenizer: {kind: multiscale, scales: [1, 2, 4, 8], downsample: 4}}\n"
                    "axes:\n  model.paradigm: [var, ar]\n")
    with pytest.raises(GridError, match="set both or neither \\(paradigm ar, tokenizer.kind multiscale\\)"):
        load_grid(path)


def test_a_tiny_var_run_learns_and_samples(tmp_path):
    from ablate.prepare import prepare
    from ablate.train import Trainer

    d = copy.deepcopy(TINY)
    d["tokenizer"].update(kind="multiscale", scales=[1, 2, 4])
    d["model"].update(paradigm="var", variant="mamba-prefix", params={"scan": "forward"}, width=32, depth=2, heads=2)
    d["train"].update(steps=20, ema_decay=0.0, log_every=50, eval_every=50, checkpoint_every=50)
    d["eval"].update(clip_judge=False)
    spec = RunSpec.model_validate(d)
    prep = prepare(spec, tmp_path, torch.device("cpu"), lambda m: None)
    assert prep.store.grid == (1, 21)
    tr = Trainer(spec, prep, torch.device("cpu"), tmp_path / "runs" / "var", say=lambda m: None)
    losses = _losses(tr, 20)
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    images = tr.generate(4)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8


@pytest.mark.parametrize("name,params", PAIRS, ids=[n for n, _ in PAIRS])
def test_cached_scale_by_scale_decoding_gives_the_parallel_logits(name, params):
    """Feeding one scale at a time through the backbone's decoder (attention: a whole scale per
    call on the key/value cache; Mamba: its positions in scan order) gives the logits of one
    parallel forward, in float64."""
    gen = generator(name, params)
    feats, mask = text_batch()
    tokens = torch.randint(0, K + 1, (3, L), generator=torch.Generator().manual_seed(4))
    full = gen(tokens, feats, mask)[0]
    dec = gen.decoder(feats, mask)
    assert dec is not None, f"{name}: no cached decoder"
    at, parts = 0, []
    for n in BLOCKS:
        parts.append(dec.step(tokens[:, at:at + n]))
        at += n
    steps = torch.cat(parts, dim=1)
    assert torch.allclose(steps, full, rtol=1e-9, atol=1e-10), float((steps - full).abs().max())


@pytest.mark.parametrize("name", ["transformer", "mamba-prefix"])
def test_cached_and_full_var_sampling_draw_the_same_tokens(name):
    gen = generator(name, {"scan": "forward"} if name != "transformer" else {})
    feats, mask = text_batch()
    null_f, null_m = torch.zeros(1, T, D, dtype=torch.float64), torch.zeros(1, T, dtype=torch.bool)
    out = {}
    for decode in ("cached", "full"):
        spec = SampleSpec(guidance=1.5, temperature=0.9, top_k=5, decode=decode)
        out[decode] = VAR(K, SCALES).sample(gen, feats, mask, null_f, null_m, spec, torch.Generator().manual_seed(0))
    assert torch.equal(out["cached"], out["full"])
