"""Figures: the matplotlib objects hold the expected series; sample sheets are prompts x steps;
snapshots during training are an observation that changes nothing of the run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.collections import PolyCollection

from ablate.report import plots
from ablate.train import save_sheet


def _runs() -> pd.DataFrame:
    rows = []
    # (variant, hyper, seed, fid_domain, tok/s, align)
    for v, h, s, fid, tok, acc in [("a", "", 0, 10.0, 100.0, 0.5), ("a", "", 1, 12.0, 120.0, 0.7),
                                   ("b", "", 0, 8.0, 50.0, 0.2), ("b", "", 1, 8.0, 50.0, 0.4),
                                   ("c", "", 0, 20.0, 200.0, 0.9),
                                   ("d", "", 0, 30.0, 90.0, 0.1)]:  # d: beaten by a on both axes
        rows.append(dict(run_id=len(rows) + 1, variant=v, hyper=h, seed=s, status="done", config_key=f"cfg-{v}",
                         fingerprint="f" * 40, fid_domain=fid, train_tokens_per_s=tok, align_acc=acc))
    df = pd.DataFrame(rows)
    df["label"] = plots.group_labels(df)
    return df


def test_loss_curves_mean_line_and_band_per_variant():
    runs = _runs()
    rows = []
    for r in runs.itertuples():
        for step in (10, 20, 30):
            rows.append(dict(run_id=r.run_id, name="train_loss", step=step, value=r.seed + 3.0 / step, label=r.label))
            rows.append(dict(run_id=r.run_id, name="val_loss", step=step, value=1.0, label=r.label))
    fig = plots.loss_curves(pd.DataFrame(rows))
    train_ax, val_ax = fig.axes
    assert train_ax.get_title() == "train loss" and val_ax.get_title() == "val loss"
    lines = {line.get_label(): line for line in train_ax.lines}
    assert set(lines) == {"a", "b", "c", "d"}
    np.testing.assert_allclose(lines["a"].get_xdata(), [10, 20, 30])
    np.testing.assert_allclose(lines["a"].get_ydata(), [0.5 + 3.0 / s for s in (10, 20, 30)])  # mean of seeds 0, 1
    bands = [c for c in train_ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # a and b have two seeds; c and d one (no band)
    assert [t.get_text() for t in train_ax.get_legend().get_texts()] == ["a", "b", "c", "d"]


def test_group_labels_follow_the_configuration_and_the_code_not_the_hyper_text():
    runs = pd.DataFrame(dict(run_id=[1, 2, 3, 4, 5, 6], variant=["a", "a", "a", "a", "b", "a"], hyper="",
                             config_key=["c1", "c1", "c2", "c2", "c3", "c1"], seed=[0, 1, 0, 1, 0, 2],
                             status=["done"] * 5 + ["pending"], fingerprint=["f" * 40] * 5 + [None]))
    labels = plots.group_labels(runs)  # no specs: the config key tells the two settings of a apart
    assert labels[0] == labels[1] != labels[2] == labels[3] and labels[4] == "b" and labels[5] == labels[0]
    assert labels[0].startswith("a (") and "c1" in labels[0] and "c2" in labels[2]
    named = plots.group_labels(runs, specs={"c1": {"model.width": 48}, "c2": {"model.width": 64}})
    assert list(named) == ["a (model.width=48)"] * 2 + ["a (model.width=64)"] * 2 + ["b", "a (model.width=48)"]
    runs.loc[1, "fingerprint"] = "e" * 40  # seed 1 of c1 by other code: a group of its own
    split = plots.group_labels(runs, specs={"c1": {"model.width": 48}, "c2": {"model.width": 64}})
    assert split[0] == "a (model.width=48) [code ffffffff]" and split[1] == "a (model.width=48) [code eeeeeeee]"
    assert split[2] == "a (model.width=64)" and split[5] == "a (model.width=48) [code unknown]"


def test_plot_all_never_pools_two_configs_with_equal_overrides_or_two_code_versions(tmp_path, monkeypatch):
    # the same variant at two widths in two grids, each with overrides {model.variant} only: the
    # same hyper text; and one more seed of the first width by other code
    from ablate.config import RunSpec
    from ablate.db import Database

    db = Database(f"sqlite:///{tmp_path / 'ablate.db'}")
    cells = {}  # key: (grid, width, seed, fingerprint, train loss)
    for width, grid, loss in ((48, "g48", 2.0), (64, "g64", 1.0)):
        for seed in (0, 1):
            cells[f"w{width}s{seed}"] = (grid, width, seed, "a" * 40, loss + seed)
    cells["w48s2"] = ("g48", 48, 2, "b" * 40, 7.0)
    for key, (grid, width, seed, _, _) in cells.items():
        spec = RunSpec.model_validate({"model": {"variant": "transformer", "width": width}, "seed": seed})
        db.register(grid, [(key, "transformer", seed, spec.model_dump(mode="json"), {"model.variant": "transformer"})])
    for key, (_, _, seed, fp, loss) in cells.items():
        tok = db.claim(key)
        db.set_provenance(key, tok, "rev", fp)
        db.log_metrics(key, [("train_loss", 5, loss), ("train_loss", 10, loss / 2), ("val_loss", 10, loss)], tok)
        db.finish(key, {"fid_domain": loss, "train_tokens_per_s": 100.0}, token=tok)
    figures = {}

    def keep(fig, out, name):  # the figures themselves, not files
        figures[name] = fig
        return []

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_all(db, tmp_path / "plots")  # the whole database: both grids
    db.close()
    ax = figures["loss_curves"].axes[0]
    lines = {line.get_label(): line.get_ydata() for line in ax.lines}
    assert set(lines) == {"transformer (model.width=48) [code aaaaaaaa]",
                          "transformer (model.width=48) [code bbbbbbbb]", "transformer (model.width=64)"}
    np.testing.assert_allclose(lines["transformer (model.width=48) [code aaaaaaaa]"], [2.5, 1.25])  # seeds 0, 1
    np.testing.assert_allclose(lines["transformer (model.width=48) [code bbbbbbbb]"], [7.0, 3.5])
    np.testing.assert_allclose(lines["transformer (model.width=64)"], [1.5, 0.75])
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2  # a band per two-seed group
    bars = figures["metrics"].axes[0]
    assert sorted(t.get_text() for t in bars.get_xticklabels()) == sorted(lines)


def test_pareto_front_marks_the_non_dominated_points():
    fig = plots.pareto(_runs(), "fid_domain", "train_tokens_per_s")
    ax = fig.axes[0]
    assert fig.front == ["b", "a", "c"]  # by throughput; d is dominated by a (slower and worse)
    front = next(line for line in ax.lines if line.get_label() == "Pareto front")
    np.testing.assert_allclose(front.get_xdata(), [50, 110, 200])
    np.testing.assert_allclose(front.get_ydata(), [8, 11, 20])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "Pareto front" and sorted(legend[1:]) == ["a", "b", "c", "d"]
    assert "Train tok/s" in ax.get_xlabel() and "FID" in ax.get_ylabel()
    assert plots.pareto_front(np.array([1.0, 2.0]), np.array([1.0, 1.0]), True, False) == [1]


def test_metric_bars_heights_and_error_bars():
    fig = plots.metric_bars(_runs(), ["fid_domain", "align_acc"])
    ax_fid, ax_acc = [ax for ax in fig.axes if ax.get_visible()][:2]
    from matplotlib.container import BarContainer

    bars = next(c for c in ax_acc.containers if isinstance(c, BarContainer))
    np.testing.assert_allclose([p.get_height() for p in bars.patches], [0.6, 0.3, 0.9, 0.1])
    assert bars.errorbar is not None
    segs = bars.errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose(segs[0][:, 1], [0.6 - np.std([0.5, 0.7], ddof=1), 0.6 + np.std([0.5, 0.7], ddof=1)])
    assert [t.get_text() for t in ax_fid.get_xticklabels()] == ["a", "b", "c", "d"]


def _snapshots(folder: Path, prompts: list[str], steps: list[int], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for s in steps:
        save_sheet(torch.randint(0, 256, (len(prompts), 3, 8, 8), generator=g, dtype=torch.uint8),
                   folder / f"step_{s:06d}.png", cols=len(prompts))
    (folder / "prompts.json").write_text(json.dumps({"prompts": prompts, "tile": [8, 8], "gap": 2}))


def test_sample_sheet_is_prompts_by_steps(tmp_path):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    _snapshots(tmp_path, prompts, [100, 200, 400, 300])
    got_prompts, steps = plots.read_snapshots(tmp_path)
    assert got_prompts == prompts and sorted(steps) == [100, 200, 300, 400]
    assert steps[100].shape == (3, 8, 8, 3)
    fig = plots.sample_sheet(prompts, [(f"step {s}", t) for s, t in sorted(steps.items())])
    axes = np.array(fig.axes).reshape(3, 4)
    assert all(len(ax.images) == 1 for ax in axes.ravel())
    assert [ax.get_title() for ax in axes[0]] == ["step 100", "step 200", "step 300", "step 400"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == prompts
    np.testing.assert_array_equal(axes[1, 2].images[0].get_array(), steps[300][1])


def test_plot_all_writes_every_figure(tmp_path):
    from ablate.db import Database

    db = Database(f"sqlite:///{tmp_path / 'ablate.db'}")
    prompts = ["p one", "p two"]
    cells = [(f"k{i}", v, s, {}, {"model.variant": v}) for i, (v, s) in
             enumerate([("transformer", 0), ("transformer", 1), ("mamba-prefix", 0)])]
    db.register("g", cells)
    for key, v, s, _, _ in cells:
        tok = db.claim(key)
        assert tok
        db.log_metrics(key, [("train_loss", 5, 2.0), ("train_loss", 10, 1.0), ("val_loss", 10, 1.2)], tok)
        folder = tmp_path / "runs" / key / "sheet"
        _snapshots(folder, prompts, [5, 10], seed=s)
        db.finish(key, {"fid_domain": 10.0 + s, "train_tokens_per_s": 100.0 * (1 + s), "align_acc": 0.5},
                  [("sheet", str(folder))], token=tok)
    written = plots.plot_all(db, tmp_path / "plots", grid="g")
    names = sorted({p.name for p in written})
    assert names == sorted(f"{n}.{e}" for n in ("loss_curves", "pareto_fid_domain_vs_train_tokens_per_s", "metrics",
                                                 "sheet_transformer", "sheet_mamba-prefix", "sheet_final")
                           for e in ("png", "svg"))
    assert all(p.stat().st_size > 0 for p in written)
    db.close()


TINY = {
    "data": {"name": "shapes", "image_size": 16, "n_train": 128, "n_val": 16, "n_test": 16},
    "tokenizer": {"codebook_size": 16, "code_dim": 8, "hidden": 16, "downsample": 4, "steps": 10, "batch_size": 16},
    "text": {"max_len": 10, "width": 16, "heads": 2, "layers": 1},
    "model": {"variant": "transformer", "width": 32, "depth": 1, "heads": 2},
    "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "log_every": 2, "eval_every": 3,
              "checkpoint_every": 3, "throughput_warmup": 0, "ema_decay": 0.9},
    "sample": {"steps": 3},
    "eval": {"n_images": 8, "judge_steps": 5},
}


def test_snapshots_are_saved_and_change_nothing(tmp_path):
    from ablate.config import RunSpec, drop_later_defaults, run_key
    from ablate.jobs import prepare
    from ablate.train import Trainer

    spec = RunSpec.model_validate(TINY)
    hashed = drop_later_defaults(spec, spec.model_dump(mode="json"))  # what run_key hashes
    assert not {"sheet_prompts", "sheet_steps"} & set(hashed["eval"]), "default snapshots keep old run keys"
    other = RunSpec.model_validate({**TINY, "eval": {**TINY["eval"], "sheet_prompts": 2}})
    assert run_key(other) != run_key(spec)
    prep = prepare(spec, tmp_path, torch.device("cpu"), lambda m: None)
    with_sheets = Trainer(spec, prep, torch.device("cpu"), tmp_path / "runs" / "a")
    with_sheets.train()
    folder = tmp_path / "runs" / "a" / "sheet"
    assert sorted(p.name for p in folder.glob("step_*.png")) == ["step_000003.png", "step_000006.png"]
    prompts, steps = plots.read_snapshots(folder)
    assert prompts == list(prep.splits.test.captions[:6]) and steps[6].shape == (6, 16, 16, 3)
    assert ("sheet", str(folder)) in with_sheets.artifacts()
    assert with_sheets.final_metrics()["sheet_s"] > 0

    off = RunSpec.model_validate({**TINY, "eval": {**TINY["eval"], "sheet_prompts": 0}})
    without = Trainer(off, prep, torch.device("cpu"), tmp_path / "runs" / "b")
    without.train()
    assert not (tmp_path / "runs" / "b" / "sheet").exists()
    for (name, a), (_, b) in zip(with_sheets.ema.state_dict().items(), without.ema.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name
    assert with_sheets.last_val_loss == without.last_val_loss

    chosen = RunSpec.model_validate({**TINY, "eval": {**TINY["eval"], "sheet_prompts": 2, "sheet_steps": [5, 1]}})
    tr = Trainer(chosen, prep, torch.device("cpu"), tmp_path / "runs" / "c")
    assert [s for s in range(1, 7) if tr.sheet_due(s)] == [1, 5]
