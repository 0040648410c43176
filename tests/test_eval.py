"""Properties of the judge and the metrics: FID in the judge's space behaves like a distance,
alignment matches the judge's accuracy on real images and drops to chance with wrong captions,
blank and fragment rates separate real images from the failures they name, optional metrics
are absent unless configured, and the judge is cached."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from ablate.config import DataSpec, EvalSpec
from ablate.data import load_dataset, parse_caption
from ablate.eval import (alignment, check_eval_spec, count_components, evaluate_images, fid_domain,
                         get_judge, judge_report, kid_domain, precision_recall, train_judge)
from ablate.eval import judge as judge_mod
from ablate.eval import metrics as metrics_mod
from ablate.data.shapes import BACKGROUND, COLOURS, HeldOut
from clip_tiny import tiny_clip

CPU = torch.device("cpu")
# few judge steps keep the file fast; 300 steps of 64 reach ~0.9 all-correct on shapes
SPEC = EvalSpec(judge_steps=300, judge_batch_size=64)


@pytest.fixture(scope="module")
def shapes():
    torch.set_num_threads(1)
    d = load_dataset(DataSpec(name="shapes", n_train=3000, n_val=200, n_test=400))
    return d, train_judge(d, SPEC, CPU, log=lambda s: None)


@pytest.fixture(scope="module")
def digits():
    d = load_dataset(DataSpec(name="digits", n_val=100, n_test=300))
    return d, train_judge(d, EvalSpec(judge_steps=150, judge_batch_size=64), CPU, log=lambda s: None)


def _shuffled(captions: list[str]) -> list[str]:
    caps = list(captions)
    random.Random(0).shuffle(caps)
    return caps


def test_judge_features_and_read_shapes(shapes):
    d, judge = shapes
    f = judge.features(d.test.images[:10])
    assert f.shape == (10, judge.num_features) and torch.isfinite(f).all()
    # features do not depend on batch composition (eval-mode BatchNorm)
    assert torch.allclose(judge.features(d.test.images[:3]), f[:3], atol=1e-5)
    seen = judge.read(d.test.images)
    n_right = sum(len(s) == len(a) for s, a in zip(seen, d.test.attrs))
    assert n_right / len(seen) > 0.95
    assert all(s == sorted(s, key=lambda o: -o["conf"]) for s in seen)


def test_align_on_real_images_near_judge_accuracy(shapes):
    d, judge = shapes
    rep = judge_report(d, judge, SPEC, CPU)
    assert rep["judge_acc"] > 0.7
    assert abs(rep["align_acc_real"] - rep["judge_acc"]) < 0.05
    # the judge learns every combination (judge_train), so it reads held-out ones as well
    assert abs(rep["align_acc_heldout_real"] - rep["judge_acc"]) < 0.08
    assert rep["blank_rate_real"] == 0.0 and rep["fragment_rate_real"] == 0.0
    assert rep["fid_domain_real"] > 0


def test_judge_reads_soft_images(shapes):
    """A VQ decoder's output is softer than the data: mild blur and noise must not fool the judge."""
    d, judge = shapes
    x = d.test.images.float()
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 6
    soft = (0.5 * x + 0.5 * blur + noise).round().clamp(0, 255).to(torch.uint8)
    sharp = alignment("shapes", judge.read(d.test.images), d.test.captions)["align_acc"]
    assert alignment("shapes", judge.read(soft), d.test.captions)["align_acc"] > sharp - 0.06


def test_align_at_chance_with_shuffled_captions(shapes):
    d, judge = shapes
    m = evaluate_images(d.test.images, _shuffled(d.test.captions), None, d.test, judge, SPEC, CPU)
    assert m["align_acc"] < 0.03  # chance is 1/324
    assert m["align_colour"] < 0.35 and m["align_position"] < 0.25 and m["align_size"] < 0.65
    true = evaluate_images(d.test.images, d.test.captions, d.test.attrs, d.test, judge, SPEC, CPU)
    assert true["align_colour"] > 0.97 and true["align_position"] > 0.97
    assert true["align_acc"] > 0.7


def test_fid_is_a_distance(shapes):
    d, judge = shapes
    same = fid_domain(judge, d.test.images, d.test.images, CPU)
    real = fid_domain(judge, d.val.images, d.test.images, CPU)
    noise = torch.randint(0, 256, d.test.images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    far = fid_domain(judge, noise, d.test.images, CPU)
    flat = torch.full_like(d.test.images, 24)
    assert abs(same) < 1e-3
    assert real > 10 * abs(same) and far > 10 * real
    m = evaluate_images(flat, d.test.captions, None, d.test, judge, SPEC, CPU)
    assert m["fid_domain"] > 5 * real


# ---- honest FID: n on each side, KID, precision/recall ----------------------------------------

def test_precision_recall_properties():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 16, generator=g)
    assert precision_recall(real, real) == (1.0, 1.0)
    other = torch.randn(300, 16, generator=g)  # same distribution, new sample: both high
    p, r = precision_recall(other, real)
    assert p > 0.6 and r > 0.6
    far = torch.randn(300, 16, generator=g) + 100.0  # a disjoint, far-away cluster
    assert precision_recall(far, real) == (0.0, 0.0)
    # mode collapse: every fake is a copy of one real sample -> perfect quality, no coverage
    collapsed = real[7:8].repeat(300, 1)
    p, r = precision_recall(collapsed, real)
    assert p == 1.0 and r <= 3 / 300
    # half the modes dropped: precision stays, recall halves
    modes = torch.cat([torch.randn(150, 16, generator=g) * 0.1 + c for c in (0.0, 10.0)])
    p, r = precision_recall(modes[:150].repeat(2, 1) + torch.randn(300, 16, generator=g) * 0.01, modes)
    assert p > 0.9 and 0.4 < r < 0.6


def test_kid_is_unbiased_and_grows_with_a_shift(shapes):
    """Two real samples of one distribution (reference vs test: independent, as generated and
    real images are) score ~0 within the spread; a dimming shift scores more, and more so
    the stronger it is. (A set against *itself* scores a little below 0: random subsets of
    one pool share images, which the unbiased estimator counts as cross pairs.)"""
    d, judge = shapes
    x, y = d.reference.images[:200], d.test.images[:200]
    same, same_std = kid_domain(judge, x, y, CPU)
    assert abs(same) < 2 * same_std
    shifted = [kid_domain(judge, (x.float() * f).round().to(torch.uint8), y, CPU) for f in (0.7, 0.5)]
    assert shifted[0][0] > same + 3 * same_std and shifted[1][0] > shifted[0][0] + 3 * shifted[0][1]
    shifted = [k for k, _ in shifted]
    assert abs(kid_domain(judge, y, y, CPU)[0]) < shifted[0] / 2
    assert kid_domain(judge, x, y, CPU) == (same, same_std)  # fixed subsets: deterministic
    state = torch.get_rng_state()
    kid_domain(judge, x[:50], y[:50], CPU)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_distribution_metrics_use_the_first_n_real_images(shapes):
    """The generated set is compared with the real images of its own captions (the first n),
    not with the whole test split: the same images score as identical."""
    d, judge = shapes
    n = 60
    m = evaluate_images(d.test.images[:n], d.test.captions[:n], None, d.test, judge, SPEC, CPU)
    assert abs(m["fid_domain"]) < 1e-3 and m["precision_domain"] == m["recall_domain"] == 1.0
    assert fid_domain(judge, d.test.images[:n], d.test.images, CPU) > 1.0  # what it used to be


def test_floors_use_n_images_on_each_side(shapes, monkeypatch):
    d, judge = shapes
    spec = SPEC.model_copy(update={"n_images": 50})
    sizes: list[int] = []
    forward = metrics_mod.JudgeFeatures.forward
    monkeypatch.setattr(metrics_mod.JudgeFeatures, "forward", lambda self, x: sizes.append(len(x)) or forward(self, x))
    rep = judge_report(d, judge, spec, CPU)
    assert sizes == [50, 50, 50, 50]  # FID and KID: 50 real (test), 50 reference images
    monkeypatch.undo()
    assert rep["n_domain_real"] == 50
    ref, test = d.reference.images[:50], d.test.images[:50]
    assert rep["fid_domain_real"] == pytest.approx(fid_domain(judge, ref, test, CPU), rel=1e-5)
    assert (rep["precision_domain_real"], rep["recall_domain_real"]) == precision_recall(
        judge.features(ref), judge.features(test))
    assert rep["kid_domain_real"] == pytest.approx(kid_domain(judge, ref, test, CPU)[0])
    # the reference is a second sample of the *test* distribution (held-out captions included)
    kinds = [d.test.heldout.names_heldout(parse_caption("shapes", c)) for c in d.reference.captions]
    assert kinds[:9] == [False, False, True] * 3


def test_floor_n_capped_by_a_smaller_reference(digits):
    d, judge = digits
    assert d.reference is d.val and len(d.val) == 100 and len(d.test) == 300
    rep = judge_report(d, judge, EvalSpec(judge_steps=150, judge_batch_size=64, n_images=300), CPU)
    assert rep["n_domain_real"] == 100
    assert rep["fid_domain_real"] == pytest.approx(fid_domain(judge, d.val.images, d.test.images[:100], CPU), rel=1e-5)


def test_blank_rate():
    d = load_dataset(DataSpec(name="shapes", n_train=16, n_val=8, n_test=400, max_objects=2))
    spec = EvalSpec()
    real = evaluate_images(d.test.images, d.test.captions, None, d.test, None, spec, CPU)
    assert real["blank_rate"] == 0.0
    flat = torch.full((50, 3, 32, 32), 24, dtype=torch.uint8)
    flat[25:] = torch.tensor([200, 30, 90], dtype=torch.uint8)[:, None, None]  # flat, any colour
    flat[40:] += torch.randint(0, 3, (10, 3, 32, 32), dtype=torch.uint8)  # nearly flat
    m = evaluate_images(flat, d.test.captions[:50], None, d.test, None, spec, CPU)
    assert m["blank_rate"] == 1.0 and m["fragment_rate"] == 0.0
    assert not ({"align_acc", "fid_domain", "fid", "clip_score"} & set(m))  # no judge, nothing set


def _patchy(n: int, patches: int, seed: int = 0) -> torch.Tensor:
    """Background with ``patches`` scattered 3x3 coloured squares: an undertrained model's look."""
    g = np.random.default_rng(seed)
    img = np.broadcast_to(np.array(BACKGROUND, np.uint8)[:, None, None], (n, 3, 32, 32)).copy()
    palette = np.array(list(COLOURS.values()), np.uint8)
    for i in range(n):
        cells = g.choice(100, patches, replace=False)  # a 10x10 lattice keeps patches apart
        for c in cells:
            y, x = 3 * (c // 10) + 1, 3 * (c % 10) + 1
            img[i, :, y:y + 2, x:x + 2] = palette[g.integers(0, 6)][:, None, None]
    return torch.from_numpy(img)


def test_fragment_rate_discriminates():
    spec = EvalSpec()
    d = load_dataset(DataSpec(name="shapes", n_train=16, n_val=8, n_test=400, max_objects=2))
    assert count_components(d.test.images).max() <= 2
    patchy = _patchy(40, 8)
    assert (count_components(patchy) == 8).all()
    m_real = evaluate_images(d.test.images, d.test.captions, None, d.test, None, spec, CPU)
    m_patchy = evaluate_images(patchy, d.test.captions[:40], None, d.test, None, spec, CPU)
    m_two = evaluate_images(_patchy(40, 2), d.test.captions[:40], None, d.test, None, spec, CPU)
    assert m_real["fragment_rate"] == 0.0 and m_patchy["fragment_rate"] == 1.0
    assert m_two["fragment_rate"] == 0.0  # two patches could be two objects
    assert m_patchy["blank_rate"] == 0.0  # the failure a blank test misses


def test_two_object_alignment_logic():
    """Alignment on the ground truth itself is perfect; a false relation or a wrong colour fails."""
    d = load_dataset(DataSpec(name="shapes", max_objects=2, n_train=16, n_val=8, n_test=300))
    seen = [[dict(o, conf=1.0) for o in objs] for objs in d.test.attrs]
    m = alignment("shapes", seen, d.test.captions, d.test.attrs)
    assert m["align_acc"] == 1.0 and m["align_acc_two"] == 1.0 and m["align_position"] == 1.0
    flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    two = [i for i, a in enumerate(d.test.attrs) if len(a) == 2]
    wrong_rel = []
    for i in two:
        cap = d.test.captions[i]
        rel = next(r for r in flip if f" {r} " in cap)
        wrong_rel.append(cap.replace(f" {rel} ", f" {flip[rel]} "))
    assert alignment("shapes", [seen[i] for i in two], wrong_rel)["align_acc"] == 0.0
    # the same objects named in the other order with the relation flipped is still true
    swapped = []
    for i in two:
        a, b = d.test.attrs[i]
        rel = next(r for r in flip if f" {r} " in d.test.captions[i])
        swapped.append(f"a {b['size']} {b['colour']} {b['shape']} {flip[rel]} a {a['size']} {a['colour']} {a['shape']}")
    assert alignment("shapes", [seen[i] for i in two], swapped)["align_acc"] == 1.0
    recoloured = [[dict(o, colour="red" if o["colour"] != "red" else "blue") for o in s] for s in seen]
    assert alignment("shapes", recoloured, d.test.captions)["align_acc"] == 0.0
    with pytest.raises(ValueError, match="disagrees"):
        alignment("shapes", seen[:1], d.test.captions[1:2], d.test.attrs[:1])


def _obj(colour, shape, size, row, col, conf=0.9):
    return {"colour": colour, "shape": shape, "size": size, "row": row, "col": col, "conf": conf}


def test_extra_objects_fail_align_acc():
    """One-object caption: the right object plus any extra fails ``align_acc`` (the per-attribute
    scores still read the most confident object); nothing seen fails too."""
    cap = ["a large red circle in the top left"]
    right = _obj("red", "circle", "large", 0, 0, 0.99)
    assert alignment("shapes", [[right]], cap)["align_acc"] == 1.0
    m = alignment("shapes", [[right, _obj("blue", "square", "small", 2, 2, 0.7)]], cap)
    assert m["align_acc"] == 0.0
    assert m["align_colour"] == m["align_shape"] == m["align_size"] == m["align_position"] == 1.0
    assert alignment("shapes", [[]], cap)["align_acc"] == 0.0


def test_geneval_tasks_with_two_objects():
    cap = ["a small red circle left of a large blue square"]
    a, b = _obj("red", "circle", "small", 1, 0), _obj("blue", "square", "large", 1, 2)
    tasks = ("align_acc", "align_acc_two", "align_two_objects", "align_counting", "align_colour_binding",
             "align_relation")
    score = lambda seen: tuple(alignment("shapes", [seen], cap)[k] for k in tasks)  # noqa: E731
    assert score([a, b]) == (1, 1, 1, 1, 1, 1)
    # an extra object: everything is there, but the count is wrong -> a counting failure
    assert score([a, b, _obj("green", "triangle", "small", 0, 1)]) == (0, 0, 1, 0, 1, 1)
    # one object missing: neither both objects nor the count
    assert score([a]) == (0, 0, 0, 0, 0, 0)
    # colours swapped between the shapes: the objects are there, the colours bound wrongly
    swapped = [dict(a, colour="blue"), dict(b, colour="red")]
    assert score(swapped) == (0, 0, 1, 1, 0, 0)
    # right objects, relation reversed
    assert score([dict(a, col=2), dict(b, col=0)]) == (0, 0, 1, 1, 1, 0)
    # a one-object caption alongside: align_acc covers both kinds, the tasks only two-object ones
    m = alignment("shapes", [[a, b], [a]], cap + ["a small red circle in the left"])
    assert m["align_acc"] == 1.0 and m["align_counting"] == 1.0 and m["align_position"] == 1.0


def test_heldout_captions_scored_apart():
    """``align_acc`` scores only captions of seen combinations and ``align_acc_heldout`` only
    captions naming a held-out one: breaking the images of one kind moves only its score."""
    d = load_dataset(DataSpec(name="shapes", max_objects=2, n_train=16, n_val=8, n_test=300))
    held = d.test.heldout
    is_held = [held.names_heldout(parse_caption("shapes", c)) for c in d.test.captions]
    assert 0.3 < np.mean(is_held) < 0.36 and all(is_held[2::3]) and not any(is_held[0::3])
    truth = [[dict(o, conf=1.0) for o in objs] for objs in d.test.attrs]
    m = alignment("shapes", truth, d.test.captions, d.test.attrs, held)
    assert m["align_acc"] == m["align_acc_heldout"] == 1.0
    no_held = [[] if h else s for s, h in zip(truth, is_held)]
    m = alignment("shapes", no_held, d.test.captions, d.test.attrs, held)
    assert m["align_acc"] == 1.0 and m["align_acc_heldout"] == 0.0 and m["align_acc_two"] == 1.0
    no_seen = [s if h else [] for s, h in zip(truth, is_held)]
    m = alignment("shapes", no_seen, d.test.captions, d.test.attrs, held)
    assert m["align_acc"] == 0.0 and m["align_acc_heldout"] == 1.0
    assert "align_acc_heldout" not in alignment("shapes", truth, d.test.captions)  # no set given
    # a caption names a held-out pair by its colour x shape, or (one object) its shape x position
    custom = HeldOut(frozenset({("red", "circle")}), frozenset({("square", "top left")}))
    caps = ["a small red circle in the center", "a small red square in the top left",
            "a small blue square in the center", "a small red circle above a large blue square"]
    seen = [[_obj("red", "circle", "small", 1, 1)], [_obj("red", "square", "small", 0, 0)],
            [_obj("blue", "square", "small", 1, 1)], []]
    m = alignment("shapes", seen, caps, None, custom)
    assert m["align_acc_heldout"] == pytest.approx(2 / 3) and m["align_acc"] == 1.0


def test_digits_alignment(digits):
    d, judge = digits
    spec = EvalSpec(judge_steps=150, judge_batch_size=64)
    rep = judge_report(d, judge, spec, CPU)
    assert rep["judge_acc"] > 0.9 and rep["align_acc_real"] == pytest.approx(rep["judge_acc"])
    m = evaluate_images(d.test.images, _shuffled(d.test.captions), None, d.test, judge, spec, CPU)
    assert m["align_acc"] < 0.25 and set(m) >= {"fid_domain", "blank_rate", "fragment_rate"}
    assert "align_colour" not in m and rep["fragment_rate_real"] < 0.02


def test_get_judge_caches(tmp_path, monkeypatch):
    d = load_dataset(DataSpec(name="shapes", n_train=64, n_val=8, n_test=16))
    spec = EvalSpec(judge_steps=3, judge_batch_size=16)
    first = get_judge(d, spec, tmp_path, CPU, log=lambda s: None)
    files = list((tmp_path / "cache" / "judge").glob("*/judge.pt"))
    assert len(files) == 1

    def no_training(*a, **k):
        raise AssertionError("judge retrained despite the cache")

    monkeypatch.setattr(judge_mod, "train_judge", no_training)
    second = get_judge(d, spec, tmp_path, CPU, log=lambda s: None)
    assert torch.equal(first.features(d.test.images), second.features(d.test.images))
    shuffled = load_dataset(DataSpec(name="shapes", n_train=64, n_val=8, n_test=16, shuffle_captions=True))
    get_judge(shuffled, spec, tmp_path, CPU)  # the shuffled control shares the judge
    with pytest.raises(AssertionError):
        get_judge(d, spec.model_copy(update={"judge_steps": 4}), tmp_path, CPU)


def test_judge_ignores_shuffled_captions():
    d = load_dataset(DataSpec(name="shapes", n_train=64, n_val=8, n_test=16, shuffle_captions=True))
    ys = judge_mod._targets("shapes", d.train.labels)
    truth = load_dataset(DataSpec(name="shapes", n_train=64, n_val=8, n_test=16))
    assert torch.equal(ys, judge_mod._targets("shapes", truth.train.attrs))


def test_folder_has_no_judge(tmp_path):
    from PIL import Image

    lines = []
    for i in range(10):
        Image.fromarray(np.full((20, 20, 3), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"grey level {i}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    d = load_dataset(DataSpec(name="folder", path=str(tmp_path), image_size=16))
    assert get_judge(d, EvalSpec(), tmp_path, CPU) is None
    m = evaluate_images(d.test.images, d.test.captions, None, d.test, None, EvalSpec(), CPU)
    assert set(m) == {"blank_rate", "fragment_rate"}


def test_optional_metrics_fail_early_when_misconfigured(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        check_eval_spec(EvalSpec(inception_weights=str(tmp_path / "missing.pth")))
    with pytest.raises(FileNotFoundError, match="eval.clip_model"):
        check_eval_spec(EvalSpec(clip_model=str(tmp_path)))
    check_eval_spec(EvalSpec())


def test_clip_score_from_local_directory(tmp_path):
    root = tiny_clip(tmp_path / "clip")
    d = load_dataset(DataSpec(name="shapes", n_train=16, n_val=8, n_test=8))
    spec = EvalSpec(clip_model=str(root))
    m = evaluate_images(d.test.images, d.test.captions, None, d.test, None, spec, CPU)
    assert 0.0 <= m["clip_score"] <= 100.0
    m2 = evaluate_images(d.test.images, d.test.captions, None, d.test, None, spec, CPU)
    assert m2["clip_score"] == pytest.approx(m["clip_score"])
    assert "clip_score" not in evaluate_images(d.test.images, d.test.captions, None, d.test, None, EvalSpec(), CPU)
