"""The ``ar`` paradigm: generation orders, logit filtering, the causality every variant that
declares a causal paradigm must keep (checked for each, automatically), recurrent / KV-cache
decoding equal to the parallel forward (float64), the bad-input error for a pair a variant
cannot do, and a tiny run that trains and samples."""
from __future__ import annotations

import copy

import pytest
import torch

from ablate.config import RunSpec, SampleSpec, run_key
from ablate.grid import GridError, load_grid
from ablate.model import Generator
from ablate.paradigm import AR, generation_order
from ablate.paradigm.ar import filter_logits
from ablate.registry import load_registry, paradigm_problem
from test_contract import GRID, K, L, T
from test_precision import _losses
from test_trust_jobs import TINY

REGISTRY = load_registry(refresh=True)
D = 16


def pairs_for(paradigm: str) -> list[tuple[str, dict]]:
    """Every (variant, params) that declares ``paradigm``, with params that make it causal."""
    out = []
    for name in sorted(REGISTRY.variants):
        cls = REGISTRY.get(name)
        if paradigm not in getattr(cls, "paradigms", ("masked",)):
            continue
        params = {"scan": "forward"} if "scan" in cls.Config.model_fields else {}
        assert paradigm_problem(cls, cls.Config(**params), paradigm) is None, name
        out.append((name, params))
    return out


PAIRS = pairs_for("ar")


class FeatText(torch.nn.Module):
    """A stand-in frozen text encoder: float features in, the same out."""

    out_dim = D

    def forward(self, feats, mask):  # noqa: ANN001
        return feats


def generator(name: str, params: dict, order=None, seed: int = 0) -> Generator:
    cls = REGISTRY.get(name)
    torch.manual_seed(seed)
    g = Generator(cls, cls.Config(**params), FeatText(), codebook_size=K, grid=GRID, width=D, depth=2, heads=2,
                  text_len=T, causal=True, order=order)
    return g.double().eval()


def text_batch(b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, T, D, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.tensor([3, T, 0][:b])[:, None]  # padded, full, empty caption
    return feats, mask


def test_generation_orders():
    assert generation_order("raster", (2, 3)).tolist() == [0, 1, 2, 3, 4, 5]
    assert generation_order("snake", (3, 3)).tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    with pytest.raises(ValueError, match="model.order"):
        generation_order("spiral", (2, 2))


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.01)).tolist() == [[False, True, True, True]], \
        "the most likely token always stays"
    assert torch.equal(filter_logits(logits), logits)


def test_some_variants_of_each_kind_declare_ar():
    names = [n for n, _ in PAIRS]
    assert {"transformer", "uvit", "mamba-prefix"} <= set(names), names


@pytest.mark.parametrize("name,params", PAIRS, ids=[n for n, _ in PAIRS])
@pytest.mark.parametrize("t", [0, 5, L - 1])
def test_causal_backbone_sees_no_later_token(name, params, t):
    """Perturb input token t: no output before t moves; the output at t does (it reads it)."""
    gen = generator(name, params)
    feats, mask = text_batch()
    tokens = torch.randint(0, K + 1, (3, L), generator=torch.Generator().manual_seed(3))
    other = tokens.clone()
    other[:, t] = (tokens[:, t] + 1) % (K + 1)
    a, b = gen(tokens, feats, mask)[0], gen(other, feats, mask)[0]
    assert torch.allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-12), f"{name}: position < {t} changed"
    assert not torch.allclose(a[:, t], b[:, t]), f"{name}: position {t} ignores its own input"


@pytest.mark.parametrize("name,params", PAIRS, ids=[n for n, _ in PAIRS])
@pytest.mark.parametrize("order", ["raster", "snake"])
def test_cached_decoding_gives_the_parallel_logits(name, params, order):
    """Feeding the tokens one at a time through the backbone's decoder (recurrent state, KV
    cache) gives the logits of one parallel forward at every position, in float64."""
    gen = generator(name, params, order=generation_order(order, GRID))
    feats, mask = text_batch()
    tokens = torch.randint(0, K + 1, (3, L), generator=torch.Generator().manual_seed(4))
    full = gen(tokens, feats, mask)[0]
    dec = gen.decoder(feats, mask)
    if not hasattr(gen.backbone, "decoder"):  # a plugin may have none: sampling then runs the full sequence
        assert dec is None
        return
    assert dec is not None, f"{name}: declares a decoder that gives none for a causal prefix build"
    steps = torch.stack([dec.step(tokens[:, i]) for i in range(L)], dim=1)
    assert torch.allclose(steps, full, rtol=1e-9, atol=1e-10), float((steps - full).abs().max())


def test_cached_and_full_sampling_draw_the_same_tokens():
    gen = generator("mamba-prefix", {"scan": "forward"})
    feats, mask = text_batch()
    null_f, null_m = torch.zeros(1, T, D, dtype=torch.float64), torch.zeros(1, T, dtype=torch.bool)
    ar = AR(K, torch.arange(L))
    out = {}
    for decode in ("cached", "full"):
        spec = SampleSpec(guidance=1.5, temperature=0.9, top_k=5, top_p=0.95, decode=decode)
        out[decode] = ar.sample(gen, feats, mask, null_f, null_m, spec, torch.Generator().manual_seed(0))
    assert out["cached"].shape == (3, L) and int(out["cached"].max()) < K
    assert torch.equal(out["cached"], out["full"])


def test_ar_batch_shifts_in_generation_order():
    order = generation_order("snake", (2, 3))
    codes = torch.tensor([[10, 11, 12, 13, 14, 15]])
    batch = AR(99, order).make_batch(codes, None, share=(0, 2))
    assert batch.targets.tolist() == [[10, 11, 12, 15, 14, 13]]
    assert batch.inputs.tolist() == [[99, 10, 11, 12, 15, 14]]
    assert bool(batch.where.all()) and batch.total == 12


def _grid(tmp_path, axes: str):
    path = tmp_path / "g.yaml"
    path.write_text(f"name: g\nbase: {{data: {{name: shapes}}}}\naxes:\n{axes}")
    return path


def test_a_pair_a_variant_cannot_do_is_bad_input_naming_both(tmp_path):
    with pytest.raises(GridError, match=r"model.paradigm: variant 'm-mamba' cannot generate with 'ar'"):
        load_grid(_grid(tmp_path, "  model.paradigm: [masked, ar]\n  model.variant: [transformer, m-mamba]\n"))
    with pytest.raises(GridError, match=r"'mamba-prefix' cannot generate with 'ar': model.params.scan: "
                                        r"bidirectional"):
        load_grid(_grid(tmp_path, "  model.paradigm: [ar]\n  model.variant: [mamba-prefix]\n"))
    grid = load_grid(_grid(tmp_path, "  model.paradigm: [masked, ar]\n  model.variant: [transformer]\n"))
    assert sorted(c.spec.model.paradigm for c in grid.cells) == ["ar", "masked"]


def test_masked_keeps_every_stored_key():
    """``model.paradigm`` defaults to masked and is left out of the key at its default."""
    d = copy.deepcopy(TINY)
    plain = RunSpec.model_validate(d)
    d["model"]["paradigm"] = "masked"
    assert run_key(RunSpec.model_validate(d)) == run_key(plain)
    d["model"]["paradigm"] = "ar"
    assert run_key(RunSpec.model_validate(d)) != run_key(plain)


def test_a_tiny_ar_run_learns_and_samples(tmp_path):
    from ablate.prepare import prepare
    from ablate.train import Trainer

    d = copy.deepcopy(TINY)
    d["model"].update(paradigm="ar", variant="mamba-prefix", params={"scan": "forward"}, width=32, depth=2, heads=2)
    d["train"].update(steps=30, ema_decay=0.0, log_every=50, eval_every=50, checkpoint_every=50)
    d["eval"].update(clip_judge=False)
    spec = RunSpec.model_validate(d)
    prep = prepare(spec, tmp_path, torch.device("cpu"), lambda m: None)
    tr = Trainer(spec, prep, torch.device("cpu"), tmp_path / "runs" / "ar", say=lambda m: None)
    losses = _losses(tr, 30)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    images = tr.generate(4)
    assert images.shape[0] == 4 and images.dtype == torch.uint8


def test_the_table_gets_a_paradigm_column_where_rows_generate_differently(tmp_path):
    """Rows are configurations: one per (variant, paradigm), with a Paradigm column; a table of
    masked runs only keeps the columns it had."""
    from ablate.db import Database
    from ablate.report import build_table, render

    db = Database(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        cells = []
        for paradigm in ("masked", "ar"):
            for seed in (0, 1):
                spec = RunSpec.model_validate({"model": {"variant": "transformer", "paradigm": paradigm},
                                               "seed": seed}).model_dump(mode="json")
                cells.append((f"{paradigm}-{seed}", "transformer", seed, spec, {"model.paradigm": paradigm}))
        db.register("p", cells)
        for i, (key, *_rest) in enumerate(cells):
            db.finish(key, {"align_acc": 0.5 + 0.1 * i}, token=db.claim(key))
        table = build_table(db, "p")
        assert table["Paradigm"].tolist() == ["masked", "ar"] or table["Paradigm"].tolist() == ["ar", "masked"]
        md = render(table, "markdown")
        assert "| Method | Paradigm |" in md and "| transformer | ar |" in md
        db.register("q", cells[:2])
        assert "Paradigm" not in build_table(db, "q").columns
    finally:
        db.close()
