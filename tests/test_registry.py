"""Variant discovery through entry points: plugins, broken plugins, unknown names."""
from __future__ import annotations

import sys
import textwrap

import pytest

from ablate.registry import UnknownVariant, load_registry

PLUGIN = '''
import torch.nn as nn
from pydantic import BaseModel, ConfigDict


class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gain: float = 1.0


class Echo(nn.Module):
    name = "echo-plugin"
    description = "returns its input scaled"
    family = "transformer"
    Config = Cfg
    scan_orders = ()

    def __init__(self, ctx, cfg):
        super().__init__()
        self.gain = cfg.gain

    def forward(self, x, text, text_mask):
        return x * self.gain
'''


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A distribution on sys.path with one good and two broken entry points."""
    (tmp_path / "echo_plugin.py").write_text(PLUGIN)
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('needs a GPU library')\n")
    (tmp_path / "half_plugin.py").write_text("class NotAVariant:\n    name = 'half'\n")
    dist = tmp_path / "echo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [ablate.variants]
        echo = echo_plugin:Echo
        broken = broken_plugin:Thing
        half = half_plugin:NotAVariant
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    load_registry(refresh=True)
    for mod in ("echo_plugin", "broken_plugin", "half_plugin"):
        sys.modules.pop(mod, None)


def test_plugins_are_found_and_broken_ones_skipped(plugin_path):
    reg = load_registry(refresh=True)
    assert "echo-plugin" in reg.variants
    assert reg.resolve_params("echo-plugin", {}) == {"gain": 1.0}
    assert any("needs a GPU library" in e for e in reg.errors.values())
    assert any("lacks `description`" in e for e in reg.errors.values())
    assert {"transformer", "mamba-prefix"} <= set(reg.variants), "built-ins survive a broken plugin"


def test_unknown_variant_lists_known_ones():
    reg = load_registry(refresh=True)
    with pytest.raises(UnknownVariant) as info:
        reg.get("mamba-nope")
    assert "known variants:" in str(info.value) and "transformer" in str(info.value)
    with pytest.raises(ValueError, match=r"model.params.nope: unknown key for variant 'transformer'"):
        reg.resolve_params("transformer", {"nope": 1})
