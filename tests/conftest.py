"""Shared fixtures: a tiny registry of fake variants for config tests, tmp results folders."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ablate.registry import Registry

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = 0.5
    mode: str = "a"


class FakeVariant(nn.Module):
    """Mixes the mean text state into every image token (enough to test the plumbing)."""

    name = "fake"
    description = "a fake variant for tests"
    family = "transformer"
    Config = _Cfg
    scan_orders = ()

    def __init__(self, ctx, cfg):
        super().__init__()
        self.lin = nn.Linear(ctx.width, ctx.width)

    def forward(self, x, text, text_mask):
        pooled = (text * text_mask.unsqueeze(-1)).sum(1) / text_mask.sum(1, keepdim=True).clamp_min(1)
        return self.lin(x + pooled.unsqueeze(1))


class OtherVariant(FakeVariant):
    name = "other"
    description = "another fake"


@pytest.fixture
def fake_registry() -> Registry:
    return Registry({"fake": FakeVariant, "other": OtherVariant}, {"fake": "tests", "other": "tests"}, {})
