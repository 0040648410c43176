"""The standard metrics from local weights: Inception FID is torch-fidelity's FID (its features,
its TF-style resize, the Frechet formula) on weights saved in torch-fidelity's own file format;
bad weights files and CLIP directories fail before any job runs, with one line naming the
field; the real-image references (``fid_real``, ``clip_score_real``, ``clip_score_shuffled``)."""
from __future__ import annotations

import pickle
import textwrap

import numpy as np
import pytest
import torch

from ablate.cli import main
from ablate.config import ConfigError, DataSpec, EvalSpec
from ablate.data import load_dataset
from ablate.eval import evaluate_images
from ablate.eval import standard
from ablate.eval.standard import (check_eval_spec, clip_score, derangement, inception_fid, load_inception_state,
                                  standard_floors)
from clip_tiny import tiny_bert, tiny_clip

CPU = torch.device("cpu")
N = 4  # images per set: an Inception forward at 299 x 299 costs ~1 s on one CPU thread


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A randomly initialised FeatureExtractorInceptionV3 saved exactly as torch-fidelity's
    converter saves the real weights: ``torch.save`` of a plain dict of contiguous float32
    tensors (conv weights, BatchNorm weight/bias/running stats, fc), no BatchNorm counters."""
    standard.import_torch_fidelity()
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as mp:  # the constructor would download the real weights
        mp.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for m in net.modules():  # the default init shrinks activations layer by layer to ~1e-9
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    state = {k: v.contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inception") / standard.INCEPTION_FILE
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _sets():
    """Two clearly different uint8 [N, 3, 32, 32] sets: smooth colour blobs and pixel noise."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.randint(0, 256, (N, 3, 4, 4), generator=g).float()
    blobs = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear").round().to(torch.uint8)
    return blobs, torch.randint(0, 256, (N, 3, 32, 32), generator=g, dtype=torch.uint8)


def _frechet_reference(x: np.ndarray, y: np.ndarray) -> float:
    """FID of feature sets [n, F], [m, F] with n, m < F: tr sqrt(S_x S_y) is the nuclear norm of
    Xc Yc^T / sqrt((n - 1)(m - 1)) (Xc, Yc centred), exact and independent of both eigen-solvers."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.svd(xc @ yc.T / np.sqrt((len(x) - 1) * (len(y) - 1)), compute_uv=False).sum()
    cov_traces = (xc ** 2).sum() / (len(x) - 1) + (yc ** 2).sum() / (len(y) - 1)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + cov_traces - 2 * cross)


def test_inception_fid_is_torch_fidelitys_fid_on_resized_images(weights):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    blobs, noise = _sets()
    fid = inception_fid(str(weights), blobs, noise, CPU)
    builds = standard._inception.cache_info().misses
    same = inception_fid(str(weights), blobs, blobs, CPU)
    assert standard._inception.cache_info().misses == builds  # the network is built once per file
    # torch-fidelity's own extractor, loading the file itself, with its own TF-1.x resize from 32 to 299
    ref = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        fx, fy = (ref(x)[0].double().numpy() for x in (blobs, noise))
    assert fx.std(0).mean() > 1e-3  # the features vary: the comparison below means something
    assert fid == pytest.approx(_frechet_reference(fx, fy), rel=1e-6)  # torchmetrics' antialiased resize: 1% off
    assert abs(same) < 1e-3 < 1.0 < fid


def test_frechet_distance_is_exact_on_singular_and_full_covariances():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, r, generator=g, dtype=torch.float64) for r in (5, 9))
    mu1, mu2 = torch.randn(64, generator=g, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    # rank 5 and 9 (as at n < 2048 images): tr sqrt(a a^T b b^T) is the nuclear norm of a^T b
    exact = (mu1 - mu2).square().sum() + a.square().sum() + b.square().sum() - 2 * torch.linalg.svdvals(a.T @ b).sum()
    assert float(standard.frechet_distance(mu1, a @ a.T, mu2, b @ b.T)) == pytest.approx(float(exact), rel=1e-12)
    eye = torch.eye(64, dtype=torch.float64)
    s1, s2 = a @ a.T + eye, b @ b.T + eye  # full rank: torchmetrics' eigvals form is accurate
    slow = mu1.square().sum() + s1.trace() + s2.trace() - 2 * torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    assert float(standard.frechet_distance(mu1, s1, mu2, s2)) == pytest.approx(float(slow), rel=1e-12)


def test_evaluate_images_reports_fid(weights):
    d = load_dataset(DataSpec(name="shapes", n_train=16, n_val=8, n_test=8))
    images = d.test.images.flip(-1)[:3]  # not the reference images themselves
    m = evaluate_images(images, d.test.captions[:3], None, d.test, None,
                        EvalSpec(inception_weights=str(weights), fid_domain=False), CPU)
    assert np.isfinite(m["fid"]) and m["fid"] > 0
    assert "fid" not in evaluate_images(images, d.test.captions[:3], None, d.test, None, EvalSpec(), CPU)


def test_standard_floors(weights, clip_dir, monkeypatch):
    d = load_dataset(DataSpec(name="shapes", n_train=16, n_val=8, n_test=8))
    spec = EvalSpec(inception_weights=str(weights), clip_model=str(clip_dir))
    calls = []

    def recorded(model_dir, images, captions, device):
        calls.append((images, captions))
        return clip_score(model_dir, images, captions, device)

    monkeypatch.setattr(standard, "clip_score", recorded)
    floors = standard_floors(d.val.images, d.test.images, d.test.captions, 3, spec, CPU)
    assert set(floors) == {"fid_real", "clip_score_real", "clip_score_shuffled"}
    assert floors["fid_real"] > 0
    assert 0.0 <= floors["clip_score_shuffled"] <= 100.0 and 0.0 <= floors["clip_score_real"] <= 100.0
    (real_imgs, real_caps), (shuf_imgs, shuf_caps) = calls
    assert torch.equal(real_imgs, d.test.images[:3]) and torch.equal(shuf_imgs, real_imgs)
    assert real_caps == d.test.captions[:3] and sorted(shuf_caps) == sorted(real_caps)
    assert all(a != b for a, b in zip(shuf_caps, real_caps))  # every image with another's caption
    again = standard_floors(d.val.images, d.test.images, d.test.captions, 3, EvalSpec(clip_model=str(clip_dir)), CPU)
    assert again == {k: floors[k] for k in ("clip_score_real", "clip_score_shuffled")}  # deterministic
    one = standard_floors(d.val.images, d.test.images, d.test.captions, 1, spec, CPU)
    assert set(one) == {"clip_score_real"}  # FID and a derangement need two images
    assert standard_floors(d.val.images, d.test.images, d.test.captions, 3, EvalSpec(), CPU) == {}


def test_every_run_records_the_standard_floors(weights, clip_dir):
    """judge_report (what a run's preparation records) carries them at the generated set's n."""
    from ablate.eval import judge_report

    d = load_dataset(DataSpec(name="shapes", n_train=16, n_val=8, n_test=8))
    spec = EvalSpec(inception_weights=str(weights), clip_model=str(clip_dir), n_images=3, fid_domain=False)
    rep = judge_report(d, None, spec, CPU)
    want = standard_floors(d.reference.images, d.test.images, d.test.captions, 3, spec, CPU)
    assert set(want) == {"fid_real", "clip_score_real", "clip_score_shuffled"}
    assert {k: rep[k] for k in want} == pytest.approx(want)


def test_clip_reads_the_captions(clip_dir):
    """The tiny CLIP's text tower sees the words (a tokenizer that maps every caption to the same
    unknown tokens would make the shuffled control equal the real score by construction)."""
    model, processor = standard._clip(standard._files_key(clip_dir))
    batch = processor(text=["a red circle", "a blue square"], return_tensors="pt", padding=True)
    with torch.no_grad():
        emb = model.get_text_features(batch["input_ids"], batch["attention_mask"])  # [2, 16]
    assert not torch.allclose(emb[0], emb[1])


def test_derangement_moves_every_item_and_is_fixed():
    state = torch.random.get_rng_state()
    for n in range(2, 30):
        p = derangement(n)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n)) and p == derangement(n)
    assert derangement(20, seed=1) != derangement(20)
    assert torch.equal(torch.random.get_rng_state(), state)


def _bad(tmp_path, weights, case):
    path = tmp_path / "bad.pth"
    if case == "text file":
        path.write_text("these are not weights\n")
    elif case == "pickle of an object":
        path.write_bytes(pickle.dumps({"weights": object()}))
    elif case == "a list":
        torch.save([torch.zeros(3)], path)
    else:
        state = torch.load(weights, weights_only=True)
        if case == "wrong shape":
            state["fc.weight"] = torch.zeros(1000, 2048)
        elif case == "missing key":
            del state["Mixed_7c.branch_pool.bn.running_var"]
        elif case == "extra key":
            state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
        elif case == "integer weights":
            state["fc.bias"] = torch.zeros(1008, dtype=torch.long)
        torch.save(state, path)
    return path


BAD = [("text file", "is not a PyTorch state dict that loads"), ("pickle of an object", "refused"), ("a list", "holds a list"),
       ("wrong shape", "'fc.weight' has shape (1000, 2048), the extractor's is (1008, 2048)"),
       ("missing key", "first: 'Mixed_7c.branch_pool.bn.running_var'"),
       ("extra key", "first: 'AuxLogits.fc.weight'"), ("integer weights", "'fc.bias' is torch.int64")]


@pytest.mark.parametrize("case, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_inception_weights_fail_in_one_line(tmp_path, weights, case, expected):
    path = _bad(tmp_path, weights, case)
    with pytest.raises(ConfigError, match="eval.inception_weights") as err:
        check_eval_spec(EvalSpec(inception_weights=str(path)))
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert standard.INCEPTION_FILE in str(err.value)  # what is expected


def test_weights_are_read_safely_and_rechecked_when_changed(tmp_path, weights):
    class Trap:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "trap.pth"
    torch.save({"fc.weight": Trap()}, path)
    with pytest.raises(ConfigError, match="eval.inception_weights: .* is not a PyTorch state dict that loads"):
        load_inception_state(path)
    assert not (tmp_path / "pwned").exists()  # nothing in the file ran
    torch.load(path, weights_only=False)  # what torch-fidelity's own loader would do
    assert (tmp_path / "pwned").exists()  # (the trap works)
    path.write_bytes(weights.read_bytes())
    hits = standard._checked.cache_info().hits
    check_eval_spec(EvalSpec(inception_weights=str(path)))
    check_eval_spec(EvalSpec(inception_weights=str(path)))
    assert standard._checked.cache_info().hits == hits + 1  # read once, then cached
    path.write_text("replaced by something else")  # a new size and mtime: checked again
    with pytest.raises(ConfigError, match="is not a PyTorch state dict that loads"):
        check_eval_spec(EvalSpec(inception_weights=str(path)))
    with pytest.raises(FileNotFoundError, match="eval.inception_weights: no file"):
        check_eval_spec(EvalSpec(inception_weights=str(tmp_path / "absent.pth")))


def test_clip_directory_is_checked(tmp_path, clip_dir):
    check_eval_spec(EvalSpec(clip_model=str(clip_dir)))
    with pytest.raises(ConfigError, match=r"eval.clip_model: .* holds a 'bert' model, not CLIP") as err:
        check_eval_spec(EvalSpec(clip_model=str(tiny_bert(tmp_path / "bert"))))
    assert "\n" not in str(err.value)
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        (partial / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(ConfigError, match=r"eval.clip_model: .* lacks the tokenizer"):
        check_eval_spec(EvalSpec(clip_model=str(partial)))


@pytest.mark.parametrize("setting", ["inception_weights", "clip_model"])
def test_cli_exits_2_before_any_job(tmp_path, capsys, weights, setting):
    bad = _bad(tmp_path, weights, "wrong shape") if setting == "inception_weights" else tiny_bert(tmp_path / "bert")
    capsys.readouterr()  # transformers' progress bars
    grid = tmp_path / "g.yaml"
    grid.write_text(textwrap.dedent(f"""
        base: {{eval: {{{setting}: {bad}}}}}
        launcher: {{executor: debug}}
    """))
    results = tmp_path / "results"
    assert main(["run", str(grid), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"eval.{setting}" in err and str(grid) in err, err
    assert not results.exists()
    assert main(["prepare", str(grid), "--dry-run"]) == 2
