"""`ablate bench layers` and `breakdown`: a row for every registered variant, the ops told apart by
the model's labels, forward and backward."""
from __future__ import annotations

import contextlib
import textwrap

import torch

from ablate.bench.layers import OPS, bench_breakdown, bench_layers, cells_from_grid
from ablate.cli import main
from ablate.db import Database
from ablate.registry import load_registry

SMALL = dict(width=16, depth=2, heads=2, grid=(2, 3), text_len=4, batch=2, passes=1, warmup=0)


def test_rows_for_every_variant_with_the_ops_they_use():
    rows = bench_layers(**SMALL)
    reg = load_registry()
    assert [r["variant"] for r in rows] == list(reg.variants)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        assert r["full_ms"] > 0 and r["layer_ms"] > 0 and r["params"] > 0, r["variant"]
        assert r["L"] == 6 and r["T"] == 4 and r["depth"] == 2
        assert all(r[f"{op}_ms"] >= 0 for op in OPS)
        if reg.variants[r["variant"]].family == "mamba":
            assert r["ssm_scan_calls"] >= 1, r["variant"]
    tr = by["transformer"]  # one block: one self- and one cross-attention, no scan
    assert (tr["self_attn_calls"], tr["cross_attn_calls"], tr["ssm_scan_calls"]) == (1, 1, 0)
    assert tr["self_attn_ms"] > 0 and tr["cross_attn_ms"] > 0
    mp = by["mamba-prefix"]  # bidirectional by default: two scans and two convs per layer, no attention
    assert (mp["ssm_scan_calls"], mp["conv1d_calls"], mp["self_attn_calls"], mp["cross_attn_calls"]) == (2, 2, 0, 0)


def test_labels_cost_nothing_outside_a_profile_and_attribute_forward_and_backward():
    """Nested labels give paths and self times that add up to the pass; each backward op lands
    on the label of the forward op that made it; outside a profile a label is a no-op."""
    from ablate.bench.profile import OTHER, label_times
    from ablate.model.labels import label

    assert isinstance(label("x"), contextlib.nullcontext)
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(256, 64)

    def forward():
        with label("outer"):
            h = x @ w  # outer's own op
            with label("inner"):
                h = (h @ w).tanh() @ w  # twice the outer's matmuls, forward and backward
        return h.relu()  # unlabelled

    times = label_times(forward, passes=3, device=torch.device("cpu"), backward=True)
    assert set(times) == {"outer", "outer > inner", OTHER}
    assert times["outer"]["calls"] == 1 and times["outer > inner"]["calls"] == 1
    assert times["outer > inner"]["bwd_ms"] > times["outer"]["bwd_ms"] > 0
    assert times["outer > inner"]["fwd_ms"] > 0 and times["outer"]["fwd_ms"] > 0
    assert all(t["fwd_ms"] >= 0 and t["bwd_ms"] >= 0 for t in times.values())


def test_breakdown_names_every_mamba_op_forward_and_backward(capsys, tmp_path):
    rows = bench_breakdown(["mamba-prefix", "transformer"], width=16, depth=2, heads=2, grid=(2, 3), text_len=4,
                           batch=2, passes=1, warmup=1, params=None)
    by = {(r["variant"], r["op"]): r for r in rows}
    for op in ("mamba.in_proj", "mamba.conv1d", "mamba.x_proj", "mamba.dt_proj", "mamba.scan", "mamba.out_proj",
               "scan_order.permute", "norm"):
        r = by[("mamba-prefix", op)]
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0, op
    assert by[("mamba-prefix", "mamba.scan")]["calls"] == 4  # bidirectional, two layers
    assert ("transformer", "attn.self > attn.sdpa") in by and ("transformer", "mamba.scan") not in by
    total = by[("mamba-prefix", "(total)")]
    parts = [r for r in rows if r["variant"] == "mamba-prefix" and r["op"] != "(total)"]
    assert abs(sum(r["fwd_ms"] for r in parts) - total["fwd_ms"]) < 1e-6
    assert main(["bench", "breakdown", "--variants", "mamba-prefix", "--params", '{"scan": "forward"}',
                 "--width", "16", "--depth", "1", "--heads", "2", "--tokens", "2x2", "--text-len", "3",
                 "--batch", "2", "--passes", "1", "--warmup", "0", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mamba-prefix | 4 | 2 | mamba.scan |" in out and "| 1 |" in out


def test_cli_stores_rows_and_takes_a_grid(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(textwrap.dedent("""
        name: g
        base:
          data: {name: shapes, image_size: 16}
          tokenizer: {downsample: 8}
          text: {max_len: 5}
          model: {width: 16, depth: 3, heads: 2}
        axes:
          model.variant: [transformer, mamba-prefix]
          model.params.scan: [forward]
        seeds: [0, 1]
        exclude:
          - {model.variant: transformer}
        zip: []
    """))
    cells = cells_from_grid(grid)
    assert [(c["variant"], c["params"]["scan"], c["width"], c["depth"], c["grid"], c["text_len"])
            for c in cells] == [("mamba-prefix", "forward", 16, 3, (2, 2), 5)]
    assert main(["bench", "layers", "--grid", str(grid), "--passes", "1", "--warmup", "0", "--batch", "2",
                 "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mamba-prefix |" in out and "full fwd ms" in out
    db = Database(f"sqlite:///{tmp_path / 'ablate.db'}", create=False)
    rows = [r.row for r in db.bench_results("layers")]
    assert len(rows) == 1 and rows[0]["ssm_scan_calls"] == 1 and rows[0]["depth"] == 3  # forward: one scan
    db.close()
    assert main(["bench", "layers", "--variants", "nope", "--no-store"]) == 2
    assert "--variants: unknown variant 'nope'" in capsys.readouterr().err


def test_like_seed_001_sets_the_seed_ratios_beside_ours(tmp_path, capsys):
    """`--like-seed 001` takes the seed's variants (and size, unless an option is given) and
    prints the seed's A100 ratios beside this run's, each computed from the rows it printed."""
    small = ["--depth", "2", "--width", "32", "--heads", "2", "--batch", "2", "--tokens", "4x4", "--text-len", "6",
             "--passes", "2", "--warmup", "0"]
    rc = main(["bench", "layers", "--like-seed", "001", *small, "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "seed 001 (1 A100) against this run" in out
    db = Database(f"sqlite:///{tmp_path / 'ablate.db'}", create=False)
    try:
        rows = [b.row for b in db.bench_results("layers")]
    finally:
        db.close()
    ops_rows = {r["variant"]: r for r in rows if r["variant"] != "seed 001 ratio"}
    assert set(ops_rows) == {"uvit", "m-mamba"} and ops_rows["uvit"]["depth"] == 2 and ops_rows["uvit"]["L"] == 16
    ratios = {r["what"]: r for r in rows if r["variant"] == "seed 001 ratio"}
    whole = ratios["M-Mamba / UViT, whole backbone forward"]
    assert abs(whole["seed"] - 217 / 137) < 1e-9
    assert abs(whole["here"] - ops_rows["m-mamba"]["full_ms"] / ops_rows["uvit"]["full_ms"]) < 1e-9
    scan = ratios["SSM scan / self-attention, one call"]
    assert abs(scan["seed"] - 0.233 / 1.19) < 1e-9
    mm, uv = ops_rows["m-mamba"], ops_rows["uvit"]
    assert abs(scan["here"] - (mm["ssm_scan_ms"] / mm["ssm_scan_calls"]) / (uv["self_attn_ms"] / uv["self_attn_calls"])) < 1e-9
    assert f"| {scan['what']} | {scan['seed']:.3f} | {scan['here']:.3f} |" in out


def test_like_seed_defaults_are_the_seeds_size():
    import argparse

    from ablate.cli.bench import _layers_size

    args = argparse.Namespace(like_seed="001", variants=None, batch=None, width=None, depth=3, heads=None,
                              tokens=None, text_len=None, passes=None, warmup=None)
    size = _layers_size(args)
    assert size == dict(variants=["uvit", "m-mamba"], batch=32, width=1024, depth=3, heads=16, tokens=(16, 16),
                        text_len=77, passes=50, warmup=5)
    args.like_seed = None
    assert _layers_size(args)["tokens"] == (4, 4) and _layers_size(args)["variants"] is None
