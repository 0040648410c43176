"""A variant from a separately installed package: a tiny distribution (module + dist-info with an
`ablate.variants` entry point) built here, put on PYTHONPATH of a fresh process; it must appear in
`ablate variants` and train, sample and evaluate inside a grid like a built-in variant."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN = '''
"""`pooled-mlp`: an attention-free, scan-free baseline from outside ablate."""
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(2, ge=1, description="MLP hidden width as a multiple of D")


class PooledMLP(nn.Module):
    name = "pooled-mlp"
    description = "per-token MLP on the image tokens plus the caption's masked mean"
    family = "transformer"
    Config = Config
    scan_orders = ()

    def __init__(self, ctx, cfg):
        super().__init__()
        d = ctx.width
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.hidden * d), nn.GELU(), nn.Linear(cfg.hidden * d, d))
            for _ in range(ctx.depth))
        self.mix = nn.Linear(ctx.seq_len, ctx.seq_len)

    def forward(self, x, text, text_mask):
        m = text_mask.unsqueeze(-1).to(x.dtype)
        pooled = (torch.where(text_mask.unsqueeze(-1), text, 0.0) * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        h = x + pooled
        for block in self.blocks:
            h = h + block(h)
            h = h + self.mix(h.transpose(1, 2)).transpose(1, 2)
        return h


VARIANT = PooledMLP
'''

GRID = """
name: plugin-grid
base:
  data: {name: shapes, image_size: 16, n_train: 256, n_val: 32, n_test: 32}
  tokenizer: {codebook_size: 32, code_dim: 8, hidden: 16, downsample: 4, steps: 20, batch_size: 32}
  text: {encoder: learned, max_len: 10, width: 32}
  model: {width: 32, depth: 1, heads: 2, variant: pooled-mlp, params: {hidden: 3}}
  train: {steps: 4, batch_size: 8, warmup_steps: 1, log_every: 2, eval_every: 4, checkpoint_every: 4, throughput_warmup: 1}
  sample: {steps: 2, batch_size: 16}
  eval: {n_images: 16, judge_steps: 10}
seeds: [0]
launcher: {executor: debug, jobs: 1, timeout_min: 10}
"""


@pytest.fixture
def plugin_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "tiny_ablate_plugin.py").write_text(PLUGIN)
    dist = site / "tiny_ablate_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-ablate-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [ablate.variants]
        tiny = tiny_ablate_plugin
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return tmp_path, env


def _ablate(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "ablate.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_installed_plugin_is_listed_and_runs_in_a_grid(plugin_env):
    root, env = plugin_env
    listed = _ablate(["variants", "-v"], env, root)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("pooled-mlp"))
    assert "transformer" in line and "caption's masked mean" in line
    assert "tiny_ablate_plugin" in listed.stdout  # its origin, with -v
    (root / "g.yaml").write_text(GRID)
    run = _ablate(["run", "g.yaml", "--results", "res"], env, root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| pooled-mlp | Yes | Yes (1) |" in run.stdout
    # without the package on the path the same grid is bad input naming the variant
    env_without = dict(env, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    bad = _ablate(["run", "g.yaml", "--results", "res2"], env_without, root)
    assert bad.returncode == 2 and "unknown variant 'pooled-mlp'" in bad.stderr
