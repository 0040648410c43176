"""Failure cases: exactly the images the judge scored wrong are saved, with what it read."""
from __future__ import annotations

import json

import torch

from ablate.data import shapes
from ablate.eval.failures import describe_read, write_failures


class StubJudge:
    """Reads image i as its caption's object when i is even, as nothing when odd."""

    def __init__(self, attrs):
        self.attrs = attrs

    def read(self, images):
        return [[{**a[0], "conf": 0.9}] if i % 2 == 0 else [] for i, a in enumerate(self.attrs[:len(images)])]


def test_only_wrong_images_are_saved_with_the_judges_reading(tmp_path):
    images, captions, attrs = shapes.generate(6, 16, 1, [0, 1], None, 0)
    images = torch.from_numpy(images)
    folder = write_failures(tmp_path / "failures", "shapes", images, captions, attrs, None, StubJudge(attrs))
    meta = json.loads((folder / "failures.json").read_text())
    assert [it["file"] for it in meta["items"]] == ["0001.png", "0003.png", "0005.png"]
    assert [it["caption"] for it in meta["items"]] == [captions[1], captions[3], captions[5]]
    assert all(it["read"] == "nothing" for it in meta["items"])
    assert sorted(p.name for p in folder.glob("*.png")) == ["0001.png", "0003.png", "0005.png"]
    o = attrs[0][0]
    assert describe_read([{**o, "conf": 0.97}]).startswith(f"{o['size']} {o['colour']} {o['shape']}")
    # a judge that reads every image right: no folder
    all_right = StubJudge(attrs)
    all_right.read = lambda ims: [[{**a[0], "conf": 0.9}] for a in attrs[:len(ims)]]
    assert write_failures(tmp_path / "none", "shapes", images, captions, attrs, None, all_right) is None
    assert not (tmp_path / "none").exists()
    assert write_failures(tmp_path / "x", "folder", images, captions, None, None, None) is None
