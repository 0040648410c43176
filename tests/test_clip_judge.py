"""The domain CLIP judge: it tells true image-caption pairs from wrong ones (down to a single
swapped attribute), learns from true captions only, is
cached and shared with the shuffled-caption control, refuses data with too few pairs, and gives
quality and alignment metrics on data without attribute labels (folder) and on digits."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from ablate.config import ConfigError, DataSpec, EvalSpec, RunSpec
from ablate.data import load_dataset
from ablate.data import shapes as shapes_data
from ablate.eval import evaluate_images, judge_report, train_judge
from ablate.eval import clip_judge as cj

CPU = torch.device("cpu")
FAST = EvalSpec(clip_steps=200, clip_batch_size=64, judge_steps=100, judge_batch_size=64, n_images=200)


@pytest.fixture(scope="module")
def shapes_clip():
    torch.set_num_threads(1)
    d = load_dataset(DataSpec(name="shapes", n_train=1500, n_val=100, n_test=300))
    return d, cj.train_clip_judge(d, FAST, CPU, log=lambda s: None)


def _swap(caption: str, pairs: list[tuple[str, str]]) -> str:
    for a, b in pairs:
        if f" {a} " in f" {caption} ":
            return f" {caption} ".replace(f" {a} ", f" {b} ", 1).strip()
    return caption


def test_true_pairs_score_far_above_wrong_ones(shapes_clip):
    d, clip = shapes_clip
    imgs, caps = d.test.images[:200], d.test.captions[:200]
    ref = cj.clip_references(clip, imgs, caps)
    assert ref["clip_domain_real"] > ref["clip_domain_shuffled"] + 40, ref
    # one attribute wrong is worse than all right: the judge reads colour, not just "a shape"
    colours = list(shapes_data.COLOUR_NAMES)
    wrong = [_swap(c, list(zip(colours, colours[1:] + colours[:1]))) for c in caps]
    m_wrong = cj.clip_metrics(clip, imgs, wrong)
    assert m_wrong["clip_domain"] < ref["clip_domain_real"] - 10, (m_wrong, ref)
    m = cj.clip_metrics(clip, imgs, caps)
    assert m["clip_domain"] == pytest.approx(ref["clip_domain_real"]) and 0 < m["clip_domain_se"] < 5


def test_embeddings_do_not_depend_on_the_batch(shapes_clip):
    d, clip = shapes_clip
    f = clip.features(d.test.images[:10])
    assert f.shape == (10, cj.NUM_FEATURES) and torch.isfinite(f).all()
    assert torch.allclose(clip.features(d.test.images[:3]), f[:3], atol=1e-5)
    t = clip.text_embed(d.test.captions[:10])
    assert torch.allclose(clip.text_embed(d.test.captions[:3]), t[:3], atol=1e-5)  # padding trimmed per chunk


def test_loss_is_symmetric_infonce_and_equal_captions_tie():
    torch.manual_seed(0)
    model = cj.DomainClip(["a", "red", "blue", "circle"], 16, 4)
    img = torch.randn(3, 3, 16, 16)
    ids = model.ids(["a red circle", "a blue circle", "a red circle"])
    loss = cj.clip_loss(model, img, ids)
    _, zi = model.image_forward(img)
    zt = model.text_forward(ids)
    assert torch.equal(zt[0], zt[2])  # copies embed alike, so their columns tie
    logits = model.logit_scale.exp() * zi @ zt.T
    rows = -F.log_softmax(logits, 1).diagonal().mean()
    cols = -F.log_softmax(logits, 0).diagonal().mean()
    assert loss.item() == pytest.approx(0.5 * (rows + cols).item(), rel=1e-5)
    # a target spread evenly over the copies gives the same loss: they are not pushed apart
    same = (ids[:, None] == ids[None, :]).all(-1).float()
    soft = 0.5 * (F.cross_entropy(logits, same / same.sum(1, keepdim=True))
                  + F.cross_entropy(logits.T, same / same.sum(1, keepdim=True)))
    assert loss.item() == pytest.approx(soft.item(), rel=1e-5)


def test_derangement_moves_every_index():
    for n in (2, 3, 10, 301):
        p = cj.derangement(n)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
        assert p == cj.derangement(n)


def test_cached_and_shared_with_the_control_which_learns_true_captions(tmp_path):
    spec = EvalSpec(clip_steps=3, clip_batch_size=16)
    true = load_dataset(DataSpec(name="digits", n_val=50, n_test=100))
    control = load_dataset(DataSpec(name="digits", n_val=50, n_test=100, shuffle_captions=True))
    assert control.train.captions != true.train.captions
    assert cj.training_pairs(control, spec, 16)[1] == cj.training_pairs(true, spec, 16)[1] == true.train.captions
    logs: list[str] = []
    first = cj.get_clip_judge(true, spec, tmp_path, CPU, log=logs.append)
    assert any("step 3/3" in s for s in logs)
    logs.clear()
    again = cj.get_clip_judge(control, spec, tmp_path, CPU, log=logs.append)
    assert not logs, "the control retrained the judge instead of sharing it"
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k
    other = cj.get_clip_judge(true, spec.model_copy(update={"clip_lr": 1e-3}), tmp_path, CPU, log=logs.append)
    assert logs and other is not None  # another setting, another judge


def test_too_few_pairs_is_skipped_when_auto_and_an_error_when_asked(tmp_path):
    small = load_dataset(DataSpec(name="shapes", n_train=100, n_val=8, n_test=16))
    logs: list[str] = []
    assert cj.get_clip_judge(small, EvalSpec(clip_steps=2), tmp_path, CPU, log=logs.append) is None
    assert "skipped" in logs[0]
    with pytest.raises(cj.TooFewPairs, match="eval.clip_judge.*at least 300"):
        cj.get_clip_judge(small, EvalSpec(clip_steps=2, clip_judge=True), tmp_path, CPU)
    from ablate.prep_jobs import plan

    spec = RunSpec.model_validate({"data": {"name": "shapes", "n_train": 100}, "eval": {"clip_judge": True}})
    with pytest.raises(ConfigError, match="eval.clip_judge"):
        plan([spec])


def test_cli_refuses_a_clip_judge_on_too_few_pairs(tmp_path, capsys):
    from ablate.cli import main

    grid = {"name": "few", "base": {"data": {"name": "shapes", "n_train": 100, "n_val": 8, "n_test": 16},
                                    "eval": {"clip_judge": True}},
            "axes": {"model.variant": ["transformer"]}, "seeds": [0]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    code = main(["run", str(tmp_path / "g.yaml"), "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "eval.clip_judge" in err, err
    assert not (tmp_path / "results" / "runs").exists()


def test_digits_keeps_class_accuracy_and_gains_the_clip_judge():
    d = load_dataset(DataSpec(name="digits", n_val=100, n_test=300))
    judge = train_judge(d, FAST, CPU, log=lambda s: None)
    clip = cj.train_clip_judge(d, FAST, CPU, log=lambda s: None)
    rep = judge_report(d, judge, FAST, CPU, clip)
    assert rep["clip_domain_real"] > rep["clip_domain_shuffled"] + 20, rep
    n = int(rep["n_domain_real"])  # 100: the reference (val) is smaller than n_images
    m = evaluate_images(d.test.images[:n], d.test.captions[:n], d.test.attrs[:n], d.test, judge, FAST, CPU, clip)
    assert {"align_acc", "clip_domain", "fid_domain", "kid_domain"} <= set(m)
    assert m["clip_domain"] == pytest.approx(rep["clip_domain_real"])  # the same n real pairs
    assert {"judge_acc", "fid_domain_real"} <= set(rep)


def _shapes_folder(root, n: int):
    from PIL import Image

    images, captions, _ = shapes_data.generate(n, 32, 1, [7, 0], None, 0)
    root.mkdir(parents=True)
    lines = []
    for i, (img, cap) in enumerate(zip(images, captions)):
        Image.fromarray(img.transpose(1, 2, 0)).save(root / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": cap}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_unlabelled_folder_gets_domain_quality_and_alignment(tmp_path):
    root = _shapes_folder(tmp_path / "imgs", 700)
    d = load_dataset(DataSpec(name="folder", path=str(root), image_size=32, n_val=50, n_test=120))
    assert d.test.attrs is None  # no labels: no attribute judge
    clip = cj.get_clip_judge(d, FAST, tmp_path, CPU, log=lambda s: None)
    rep = judge_report(d, None, FAST, CPU, clip)
    assert {"clip_domain_real", "clip_domain_shuffled", "fid_domain_real", "kid_domain_real"} <= set(rep)
    assert rep["clip_domain_real"] > rep["clip_domain_shuffled"] + 20, rep
    n = 50
    real = evaluate_images(d.test.images[:n], d.test.captions[:n], None, d.test, None, FAST, CPU, clip)
    flat = torch.full_like(d.test.images[:n], 200)
    bad = evaluate_images(flat, d.test.captions[:n], None, d.test, None, FAST, CPU, clip)
    assert {"fid_domain", "kid_domain", "clip_domain"} <= set(real)
    assert bad["fid_domain"] > real["fid_domain"] + 1 and bad["clip_domain"] < real["clip_domain"] - 20
