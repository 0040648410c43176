"""Several codebooks per token location (seed 004): the channels split into groups, each snapped
to its own codebook; a location's codes side by side in an h x (w * c) grid; encode/decode and the
training forward agree; bad settings are one-line errors; a whole AR run on them trains, samples
and leaves its temperature sheet."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError

from ablate.config import RunSpec, TokenizerSpec
from ablate.tokenizer.vqvae import VQVAE, GroupQuantizer
from test_precision import _losses
from test_trust_jobs import TINY


def _vq(c: int = 2) -> VQVAE:
    torch.manual_seed(0)
    vq = VQVAE(TokenizerSpec(codebooks=c, code_dim=8, codebook_size=6, hidden=16, downsample=4), (8, 12))
    return vq.eval()


def test_settings_are_checked():
    with pytest.raises(ValidationError, match="must divide tokenizer.code_dim"):
        TokenizerSpec(codebooks=3, code_dim=8)
    with pytest.raises(ValidationError, match="codebooks: 2 codebooks need the vqvae"):
        TokenizerSpec(kind="diffusers", path="/x", codebooks=2)
    assert TokenizerSpec().codebooks == 1


def test_a_locations_codes_sit_side_by_side_each_from_its_own_codebook():
    vq = _vq()
    q = vq.quantizer
    assert isinstance(q, GroupQuantizer) and vq.grid == (2, 6) and len(q.groups) == 2
    z = torch.randn(2, 8, 2, 3)  # [n, C, h, w]
    _, idx, _ = q(z)
    assert idx.shape == (2, 2, 6)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    for j, g in enumerate(q.groups):  # codebook j reads channels 4j..4j+3 and lands at column x*2 + j
        want = g.codes(flat[:, 4 * j:4 * j + 4]).view(2, 2, 3)
        assert torch.equal(idx[..., j::2], want)
    back = q.lookup(idx)  # [n, h, w, C]
    assert back.shape == (2, 2, 3, 8)
    torch.testing.assert_close(back[..., :4], q.groups[0].lookup(idx[..., 0::2]))
    torch.testing.assert_close(back[..., 4:], q.groups[1].lookup(idx[..., 1::2]))


def test_encode_decode_agree_with_the_forward():
    vq = _vq()
    images = torch.randint(0, 256, (3, 3, 8, 12), dtype=torch.uint8)
    with torch.no_grad():
        rec, idx, _ = vq(vq.to_input(images))
    codes = vq.encode(images)
    assert torch.equal(codes, idx)
    want = rec.clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(vq.decode(codes), want)


def test_one_codebook_is_the_plain_quantizer():
    vq = _vq(1)
    assert not isinstance(vq.quantizer, GroupQuantizer) and vq.grid == (2, 3)


def test_an_ar_run_on_two_codebooks_trains_samples_and_leaves_its_temperature_sheet(tmp_path):
    from PIL import Image

    from ablate.prepare import prepare
    from ablate.train import Trainer

    d = copy.deepcopy(TINY)
    d["tokenizer"].update(codebooks=2, downsample=8)
    d["model"].update(paradigm="ar", width=32, depth=2, heads=2)
    d["train"].update(steps=20, ema_decay=0.0, log_every=50, eval_every=50, checkpoint_every=50)
    d["eval"].update(clip_judge=False, temperature_sheet=[0.5, 2.0], sheet_prompts=2)
    spec = RunSpec.model_validate(d)
    prep = prepare(spec, tmp_path, torch.device("cpu"), lambda m: None)
    assert prep.store.grid == (2, 4)  # 16 px / 8 = 2x2 locations, two codes each
    tr = Trainer(spec, prep, torch.device("cpu"), tmp_path / "runs" / "c2", say=lambda m: None)
    losses = _losses(tr, 20)
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    metrics = tr.evaluate()
    assert metrics["sample_s_per_image"] > 0 and 0 <= metrics["align_acc"] <= 1
    sheet = tmp_path / "runs" / "c2" / "temperatures.png"
    meta = json.loads((tmp_path / "runs" / "c2" / "temperatures.json").read_text())
    assert meta["temperatures"] == [0.5, 2.0] and len(meta["prompts"]) == 8
    w, h = Image.open(sheet).size
    assert (w, h) == (8 * (16 + 2), 2 * (16 + 2))  # 8 prompts per row, one row per temperature
    assert ("temperatures", str(sheet)) in tr.artifacts()
