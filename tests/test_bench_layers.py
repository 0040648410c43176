"""`ablate bench layers`: a row for every registered variant, the ops told apart, the patches undone."""
from __future__ import annotations

import textwrap

import torch
import torch.nn.functional as F

from ablate import ops
from ablate.bench_layers import OPS, bench_layers, cells_from_grid, op_timer
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


def test_op_timer_classifies_and_restores():
    sdpa, scan = F.scaled_dot_product_attention, ops.selective_scan
    q, kv_text, kv_img = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    with op_timer(text_len=4, device=torch.device("cpu")) as acc:
        assert F.scaled_dot_product_attention is not sdpa and ops.selective_scan is not scan
        F.scaled_dot_product_attention(q, kv_text, kv_text)
        F.scaled_dot_product_attention(q, kv_img, kv_img)
        F.scaled_dot_product_attention(q, kv_img, kv_img)
    assert acc["cross_attn"][1] == 1 and acc["self_attn"][1] == 2 and acc["ssm_scan"][1] == 0
    assert F.scaled_dot_product_attention is sdpa and ops.selective_scan is scan
    from ablate.model import mamba
    assert mamba.selective_scan is scan


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
