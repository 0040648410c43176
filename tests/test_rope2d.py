"""``model.positions: rope2d`` (seed 002): 2D rotary positions in the attention blocks. Scores
depend on coordinate differences only; no absolute position embedding is left (var keeps one
per scale); decoding with a KV cache still equals the parallel forward, var stays block-causal;
a backbone without attention cannot take it."""
from __future__ import annotations

import pytest
import torch

from ablate.grid import GridError, load_grid
from ablate.model import Generator
from ablate.model.attention import apply_rope, image_coords, rope_tables
from test_contract import GRID, K, L, T
from test_paradigm_ar import REGISTRY, FeatText, text_batch

D = 16
ROPE = ["transformer", "uvit", "hybrid-gsa"]


def gen(name: str, blocks=(), grid=GRID, order=None) -> Generator:
    cls = REGISTRY.get(name)
    params = {"scan": "forward"} if "scan" in cls.Config.model_fields else {}
    torch.manual_seed(0)
    g = Generator(cls, cls.Config(**params), FeatText(), codebook_size=K, grid=grid, width=D, depth=2, heads=2,
                  text_len=T, causal=True, blocks=blocks, positions="rope2d", order=order)
    return g.double().eval()


def test_positions_reach_the_output():
    """With no absolute embedding, the rotation alone tells positions apart: the same tokens in
    another order give other outputs than the permuted ones."""
    g = gen("transformer")
    feats, mask = text_batch()
    tokens = torch.randint(0, K, (3, L), generator=torch.Generator().manual_seed(6))
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(1))
    g.backbone.causal = False  # bidirectional: without positions it would be permutation-equivariant
    with torch.no_grad():  # sharp attention (at init the scores are nearly flat)
        for blk in g.backbone.blocks:
            blk.self_attn.q.weight.mul_(30)
            blk.self_attn.kv.weight.mul_(30)
    a = g(tokens, feats, mask)[0]
    b = g(tokens[:, perm], feats, mask)[0]
    assert (a[:, perm] - b).abs().max() > 1e-2


def test_scores_depend_on_coordinate_differences_only():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 8, generator=g,
                                                                                      dtype=torch.float64)
    def score(a, b):
        ra, rb = rope_tables(torch.tensor([a]), 8), rope_tables(torch.tensor([b]), 8)
        return float((apply_rope(q, ra) * apply_rope(k, rb)).sum())
    assert score((1.0, 2.0), (3.0, 5.0)) == pytest.approx(score((4.0, 0.0), (6.0, 3.0)), abs=1e-6)
    assert score((1.0, 2.0), (3.0, 5.0)) != pytest.approx(score((1.0, 2.0), (3.0, 6.0)), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_tables(torch.zeros(3, 2), 6)


def test_coordinates_of_rasters_orders_and_scales():
    assert image_coords((2, 3)).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert image_coords((2, 2), torch.tensor([0, 1, 3, 2])).tolist() == [[0, 0], [0, 1], [1, 1], [1, 0]]
    c = image_coords((1, 5), blocks=(1, 4))  # scale 1 sits at the centre of the 2x2 map
    assert c[0].tolist() == [0.5, 0.5] and c[1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


@pytest.mark.parametrize("name", ROPE)
def test_no_absolute_positions_and_kv_decoding_still_equals_the_forward(name):
    g = gen(name)
    assert g.pos_emb is None and g.level_emb is None
    feats, mask = text_batch()
    tokens = torch.randint(0, K + 1, (3, L), generator=torch.Generator().manual_seed(4))
    full = g(tokens, feats, mask)[0]
    dec = g.decoder(feats, mask)
    steps = torch.stack([dec.step(tokens[:, i]) for i in range(L)], dim=1)
    assert torch.allclose(steps, full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["transformer", "hybrid-gsa"])
def test_var_with_rope_is_block_causal_and_has_a_level_embedding(name):
    blocks = (1, 4, 9)
    g = gen(name, blocks=blocks, grid=(1, 14))
    assert g.level_emb.shape == (3, D)
    feats, mask = text_batch()
    tokens = torch.randint(0, K + 1, (3, 14), generator=torch.Generator().manual_seed(3))
    other = tokens.clone()
    other[:, 5:] = (tokens[:, 5:] + 1) % (K + 1)
    a, b = g(tokens, feats, mask)[0], g(other, feats, mask)[0]
    assert torch.allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-12)


def test_a_backbone_without_attention_cannot_take_it(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbase: {model: {positions: rope2d}}\naxes:\n  model.variant: [transformer, mamba-prefix]\n")
    with pytest.raises(GridError, match="model.positions: rope2d rotates attention's queries and keys; variant "
                                        "'mamba-prefix' has no attention block"):
        load_grid(path)


@pytest.mark.parametrize("name", ["transformer", "hybrid-gsa"])
def test_var_decoding_with_rope_equals_the_forward(name):
    blocks = (1, 4, 9)
    g = gen(name, blocks=blocks, grid=(1, 14))
    feats, mask = text_batch()
    tokens = torch.randint(0, K + 1, (3, 14), generator=torch.Generator().manual_seed(8))
    full = g(tokens, feats, mask)[0]
    dec = g.decoder(feats, mask)
    steps = torch.cat([dec.step(tokens[:, a:a + n]) for a, n in ((0, 1), (1, 4), (5, 9))], dim=1)
    assert torch.allclose(steps, full, rtol=1e-9, atol=1e-10)
