"""Properties of the built-in datasets: determinism, disjoint splits, captions that say what the
pixels show, the shuffled-caption control, digits labels, and the folder loader's contract."""
from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import pytest
import torch

from ablate.config import DataSpec
from ablate.data import data_key, load_dataset, parse_caption
from ablate.data.shapes import BACKGROUND, COLOURS, POSITIONS, SHAPES, generate, heldout_combos, relation_holds

SMALL = dict(n_train=600, n_val=100, n_test=200)


def _hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images}


@pytest.fixture(scope="module")
def two_obj():
    return load_dataset(DataSpec(name="shapes", max_objects=2, seed=3, **SMALL))


def test_shapes_deterministic_by_seed():
    a = load_dataset(DataSpec(name="shapes", seed=1, **SMALL))
    b = load_dataset(DataSpec(name="shapes", seed=1, **SMALL))
    c = load_dataset(DataSpec(name="shapes", seed=2, **SMALL))
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s).images, getattr(b, s).images)
        assert getattr(a, s).captions == getattr(b, s).captions
    assert a.key == b.key and a.key != c.key
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape == (600, 3, 32, 32) and a.train.images.dtype == torch.uint8


def test_splits_disjoint_streams():
    d = load_dataset(DataSpec(name="shapes", n_train=2000, n_val=200, n_test=400))
    tr, va, te = _hashes(d.train.images), _hashes(d.val.images), _hashes(d.test.images)
    assert len(tr) == 2000 and not (tr & te) and not (tr & va) and not (va & te)
    # the streams differ from the first image on (a split is not a shifted copy of another)
    assert d.train.captions[:50] != d.test.captions[:50]


def test_one_object_captions_parse_back_to_attrs():
    d = load_dataset(DataSpec(name="shapes", **SMALL))
    seen = set()
    for cap, objs in zip(d.test.captions, d.test.attrs):
        parsed = parse_caption("shapes", cap)
        assert parsed is not None and parsed["relation"] is None
        assert parsed["objects"] == objs
        assert cap.endswith(POSITIONS[objs[0]["row"]][objs[0]["col"]])
        seen.add((objs[0]["row"], objs[0]["col"]))
    assert len(seen) == 9  # every cell is used


def test_two_object_captions_consistent(two_obj):
    n_two = 0
    for cap, objs in zip(two_obj.train.captions, two_obj.train.attrs):
        parsed = parse_caption("shapes", cap)
        assert parsed is not None and len(parsed["objects"]) == len(objs)
        if len(objs) == 1:
            assert parsed["objects"] == objs
            continue
        n_two += 1
        a, b = objs
        assert [{k: o[k] for k in ("colour", "shape", "size")} for o in objs] == parsed["objects"]
        assert (a["row"], a["col"]) != (b["row"], b["col"])
        assert [a[k] for k in ("colour", "shape", "size")] != [b[k] for k in ("colour", "shape", "size")]
        assert relation_holds(parsed["relation"], (a["row"], a["col"]), (b["row"], b["col"]))
    assert 0.4 < n_two / len(two_obj.train) < 0.6


# ---- held-out combinations (compositional generalisation) ---------------------------------------

# run_key(RunSpec()) before data.heldout existed: the training data changed, so must the key
PRE_HELDOUT_DEFAULT_KEY = "30ab606bee32ce29"


def _pairs(objs: list[dict]) -> tuple[set, set]:
    cs = {(o["colour"], o["shape"]) for o in objs}
    sp = {(o["shape"], POSITIONS[o["row"]][o["col"]]) for o in objs}
    return cs, sp


def test_heldout_combinations_never_in_train_or_val(two_obj):
    held = two_obj.test.heldout
    assert len(held.colour_shape) == 4 and len(held.shape_position) == 5  # a fifth of 18 and of 27
    for split in (two_obj.train, two_obj.val):
        assert split.heldout == held
        for objs in split.attrs:
            cs, sp = _pairs(objs)
            assert not (cs & held.colour_shape) and not (sp & held.shape_position)
    # every colour, shape and position still occurs in training
    train = [o for objs in two_obj.train.attrs for o in objs]
    assert {o["colour"] for o in train} == set(COLOURS)
    assert {o["shape"] for o in train} == set(SHAPES)
    assert {(o["row"], o["col"]) for o in train} == {(r, c) for r in range(3) for c in range(3)}
    # test: every third caption names a held-out combination, the others show none at all
    for i, (cap, objs) in enumerate(zip(two_obj.test.captions, two_obj.test.attrs)):
        named = held.names_heldout(parse_caption("shapes", cap))
        assert named == (i % 3 == 2), cap
        cs, sp = _pairs(objs)
        if not named:
            assert not (cs & held.colour_shape) and not (sp & held.shape_position)
    kinds = {(len(objs), i % 3 == 2) for i, objs in enumerate(two_obj.test.attrs)}
    assert kinds == {(1, False), (1, True), (2, False), (2, True)}  # both kinds, one and two objects


def test_heldout_set_is_seeded_and_keeps_every_attribute():
    sets = [heldout_combos(seed, 0.2) for seed in range(40)]
    assert heldout_combos(3, 0.2) == sets[3] and len(set(sets)) > 30
    for h in sets + [heldout_combos(s, 0.5) for s in range(20)]:
        seen_cs = {(c, s) for c in COLOURS for s in SHAPES} - h.colour_shape
        seen_sp = {(s, p) for s in SHAPES for row in POSITIONS for p in row} - h.shape_position
        assert {c for c, _ in seen_cs} == set(COLOURS) and {s for _, s in seen_cs} == set(SHAPES)
        assert {s for s, _ in seen_sp} == set(SHAPES) and len({p for _, p in seen_sp}) == 9
    assert not heldout_combos(0, 0.0)
    none = load_dataset(DataSpec(name="shapes", heldout=0.0, **SMALL))
    assert none.test.heldout is None
    with pytest.raises(ValueError, match="heldout"):
        DataSpec(heldout=0.6)
    with pytest.raises(ValueError, match="data.heldout"):
        heldout_combos(0, 0.6)


def test_heldout_changes_the_keys():
    from ablate.config import RunSpec, run_key

    assert run_key(RunSpec()) != PRE_HELDOUT_DEFAULT_KEY
    assert run_key(RunSpec(data={"heldout": 0.1})) != run_key(RunSpec())
    a, b = DataSpec(name="shapes", **SMALL), DataSpec(name="shapes", heldout=0.1, **SMALL)
    assert data_key(a)[0] != data_key(b)[0] and data_key(a)[1] != data_key(b)[1]  # caches too
    assert load_dataset(a).test.captions != load_dataset(b).test.captions


def test_judge_and_reference_sets(two_obj):
    """The judge learns from every combination (held-out ones included); the floors' reference
    is a second sample of the test distribution."""
    held = two_obj.test.heldout
    shown = [_pairs(objs) for objs in two_obj.judge_train.attrs]
    assert any(cs & held.colour_shape for cs, _ in shown) and any(sp & held.shape_position for _, sp in shown)
    assert len(two_obj.judge_train) == len(two_obj.train) and not (_hashes(two_obj.judge_train.images)
                                                                     & _hashes(two_obj.train.images))
    ref = two_obj.reference
    assert len(ref) == len(two_obj.test) and ref.captions != two_obj.test.captions
    assert [held.names_heldout(parse_caption("shapes", c)) for c in ref.captions] == \
        [i % 3 == 2 for i in range(len(ref))]
    digits = load_dataset(DataSpec(name="digits", n_train=16, n_val=8, n_test=8))
    assert digits.judge_train is digits.train and digits.reference is digits.val


def _object_mask(img: np.ndarray, obj: dict, size: int) -> np.ndarray:
    """Pixels of ``obj``'s cell closer to its colour than to the background: bool [cell, cell]."""
    cell = size / 3
    r0, r1 = round(obj["row"] * cell), round((obj["row"] + 1) * cell)
    c0, c1 = round(obj["col"] * cell), round((obj["col"] + 1) * cell)
    patch = img[:, r0:r1, c0:c1].astype(float).transpose(1, 2, 0)
    col, bg = np.array(COLOURS[obj["colour"]], float), np.array(BACKGROUND, float)
    return np.linalg.norm(patch - col, axis=-1) < np.linalg.norm(patch - bg, axis=-1)


def test_pixels_show_what_attrs_say(two_obj):
    """Colour at the object's cell centre, size by area, shape by how it fills its box, and
    empty cells are background: catches swapped rows/cols, sizes or shape names."""
    images = two_obj.train.images.numpy()
    palette = {k: np.array(v, float) for k, v in COLOURS.items()}
    areas: dict[tuple, list[int]] = {}
    fills: dict[str, list[float]] = {}
    for img, objs in zip(images, two_obj.train.attrs):
        taken = {(o["row"], o["col"]) for o in objs}
        for o in objs:
            # around the cell centre sits a pixel of exactly the object's colour (up to rounding)
            y, x = int((o["row"] + 0.5) * 32 / 3), int((o["col"] + 0.5) * 32 / 3)
            near = img[:, y - 1:y + 2, x - 1:x + 2].reshape(3, -1).T.astype(float)
            assert (np.linalg.norm(near - palette[o["colour"]], axis=1) < 2).any()
            m = _object_mask(img, o, 32)
            ys, xs = np.nonzero(m)
            areas.setdefault((o["shape"], o["size"]), []).append(int(m.sum()))
            fills.setdefault(o["shape"], []).append(m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
        for r in range(3):
            for c in range(3):
                if (r, c) not in taken:
                    cell = img[:, r * 11 + 1:r * 11 + 10, c * 11 + 1:c * 11 + 10]
                    assert (np.abs(cell.astype(int) - np.array(BACKGROUND)[:, None, None]) < 8).all()
    for shape in ("circle", "square", "triangle"):
        assert max(areas[(shape, "small")]) < min(areas[(shape, "large")])
    assert min(fills["square"]) > 0.99
    assert max(fills["triangle"]) < 0.8
    assert np.median(fills["triangle"]) < np.median(fills["circle"]) < np.median(fills["square"])


def test_shuffle_captions_permutes_only_train():
    base = load_dataset(DataSpec(name="shapes", **SMALL))
    shuf = load_dataset(DataSpec(name="shapes", shuffle_captions=True, **SMALL))
    assert torch.equal(base.train.images, shuf.train.images)
    assert sorted(base.train.captions) == sorted(shuf.train.captions)
    assert np.mean([a != b for a, b in zip(base.train.captions, shuf.train.captions)]) > 0.9
    for cap, objs in zip(shuf.train.captions, shuf.train.attrs):
        assert parse_caption("shapes", cap)["objects"] == objs  # attrs move with their captions
    assert shuf.train.labels == base.train.attrs  # what the images really show is kept
    for s in ("val", "test"):
        assert getattr(shuf, s).captions == getattr(base, s).captions
        assert torch.equal(getattr(shuf, s).images, getattr(base, s).images)
    assert shuf.key != base.key and shuf.image_key == base.image_key


def test_cache_roundtrip(tmp_path):
    spec = DataSpec(name="shapes", max_objects=2, **SMALL)
    a = load_dataset(spec, cache_root=tmp_path)
    file = tmp_path / "cache" / "data" / a.image_key / "splits.npz"
    assert file.is_file()
    b = load_dataset(spec, cache_root=tmp_path)
    assert torch.equal(a.test.images, b.test.images)
    assert a.train.captions == b.train.captions and a.train.attrs == b.train.attrs


def test_generation_is_fast():
    t = time.perf_counter()
    images, captions, _ = generate(20000, 32, 2, [0, 0])
    assert images.shape == (20000, 3, 32, 32) and len(captions) == 20000
    assert time.perf_counter() - t < 10.0


def test_image_size_is_configurable():
    d = load_dataset(DataSpec(name="shapes", image_size=48, n_train=16, n_val=8, n_test=8))
    assert d.train.images.shape[-2:] == (48, 48)


def test_digits_captions_match_real_labels(caplog):
    from sklearn.datasets import load_digits

    with caplog.at_level(logging.WARNING):
        d = load_dataset(DataSpec(name="digits", n_val=100, n_test=200))
    assert "capped" in caplog.text  # n_train=20000 asks for more than the 1797 that exist
    assert (len(d.train), len(d.val), len(d.test)) == (1797 - 300, 100, 200)
    assert not (_hashes(d.train.images) & _hashes(d.test.images))
    raw = load_digits()
    ref = torch.from_numpy(raw.images.reshape(len(raw.images), -1)).float()  # [1797, 64], 0..16
    # Shrink each 32x32 image back to 8x8 and find its source: its label must be the caption's.
    small = torch.nn.functional.avg_pool2d(d.test.images[:, :1].float(), 4).flatten(1) * (16 / 255)
    nearest = torch.cdist(small, ref).argmin(1)
    for cap, attrs, j in zip(d.test.captions, d.test.attrs, nearest):
        digit = parse_caption("digits", cap)["digit"]
        assert digit == attrs[0]["digit"] == int(raw.target[j])
    assert (d.test.images[:, 0] == d.test.images[:, 2]).all()  # grey as RGB


def test_digits_caps_never_empty():
    d = load_dataset(DataSpec(name="digits", n_train=16, n_val=8, n_test=8))
    assert (len(d.train), len(d.val), len(d.test)) == (16, 8, 8)


# ---- folder -------------------------------------------------------------------------------------

def _make_folder(root, n=12):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        # wide image: a 40-px centre square of colour (i*20, 100, 200) flanked by white bars that
        # the centre crop must remove
        arr = np.full((40, 60, 3), 255, np.uint8)
        arr[:, 10:50] = (i * 20, 100, 200)
        name = f"img{i}.{['png', 'jpg', 'webp'][i % 3]}"
        Image.fromarray(arr).save(root / name, quality=100) if i % 3 else Image.fromarray(arr).save(root / name)
        lines.append(json.dumps({"file": name, "caption": f"picture number {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_folder_happy_path(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    spec = DataSpec(name="folder", path=str(root), image_size=16, n_train=100, n_val=8, n_test=8)
    d = load_dataset(spec)
    assert (len(d.train), len(d.val), len(d.test)) == (9, 1, 2) and d.train.attrs is None
    for part in (d.train, d.val, d.test):
        assert part.images.shape[1:] == (3, 16, 16)
        for img, cap in zip(part.images, part.captions):
            i = int(cap.split()[-1])
            assert abs(int(img[0].float().mean()) - i * 20) <= 6  # the caption belongs to this image
            assert img[1:].float().mean(dim=(1, 2)).sub(torch.tensor([100.0, 200.0])).abs().max() < 8
    again = load_dataset(spec)
    assert again.train.captions == d.train.captions
    assert parse_caption("folder", d.train.captions[0]) is None


@pytest.mark.parametrize("breakage, error", [
    ("no_dir", FileNotFoundError), ("no_index", FileNotFoundError), ("missing_file", FileNotFoundError),
    ("empty", ValueError), ("bad_json", ValueError), ("too_few", ValueError), ("not_image", ValueError),
])
def test_folder_errors_name_data_path(tmp_path, breakage, error):
    root = _make_folder(tmp_path / "imgs")
    index = root / "captions.jsonl"
    if breakage == "no_dir":
        root = tmp_path / "nope"
    elif breakage == "no_index":
        index.unlink()
    elif breakage == "missing_file":
        index.write_text(index.read_text() + json.dumps({"file": "gone.png", "caption": "x"}) + "\n")
    elif breakage == "empty":
        index.write_text("\n")
    elif breakage == "bad_json":
        index.write_text("{not json\n")
    elif breakage == "too_few":
        index.write_text("\n".join(index.read_text().splitlines()[:4]))
    elif breakage == "not_image":
        (root / "notes.txt").write_text("hi")
        index.write_text(json.dumps({"file": "notes.txt", "caption": "x"}))
    with pytest.raises(error) as info:
        load_dataset(DataSpec(name="folder", path=str(root)))
    msg = str(info.value)
    assert "data.path" in msg and "\n" not in msg
