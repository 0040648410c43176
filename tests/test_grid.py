"""Grid expansion, key stability, and the one-line errors for bad grids."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ablate.config import RunSpec, run_key
from ablate.grid import GridError, load_grid, parse_override


def write(tmp_path: Path, text: str, name: str = "g.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_cartesian_product_seeds_and_exclude(tmp_path, fake_registry):
    p = write(tmp_path, """
        base: {train: {steps: 5}}
        axes:
          model.variant: [fake, other]
          train.lr: [0.001, 0.003]
        seeds: [0, 1, 2]
        exclude:
          - {model.variant: other, train.lr: 0.003}
    """)
    g = load_grid(p, registry=fake_registry)
    assert g.name == "g"
    assert len(g.cells) == (2 * 2 - 1) * 3
    combos = {(c.variant, c.spec.train.lr, c.seed) for c in g.cells}
    assert ("other", 0.003, 0) not in combos and ("fake", 0.003, 2) in combos
    assert all(c.spec.train.steps == 5 for c in g.cells)
    assert len({c.key for c in g.cells}) == len(g.cells)
    assert g.cells[0].overrides == {"model.variant": "fake", "train.lr": 0.001}


def test_zip_groups_vary_together(tmp_path, fake_registry):
    p = write(tmp_path, """
        base: {model: {variant: fake}}
        zip:
          - {model.width: [64, 128], model.heads: [2, 4]}
        seeds: [0]
    """)
    g = load_grid(p, registry=fake_registry)
    assert sorted((c.spec.model.width, c.spec.model.heads) for c in g.cells) == [(64, 2), (128, 4)]


def test_key_is_stable_across_spellings(tmp_path, fake_registry):
    a = write(tmp_path, """
        base: {model: {variant: fake}, train: {lr: 0.002}}
        seeds: [3]
    """, "a.yaml")
    # explicit defaults, other key order, the variant's defaults spelled out, lr as a string
    b = write(tmp_path, """
        seeds: [3]
        base:
          train: {lr: "2e-3", steps: 600}
          model: {params: {mode: a, alpha: 0.5}, variant: fake, width: 128}
    """, "b.yaml")
    ka = load_grid(a, registry=fake_registry).cells[0].key
    kb = load_grid(b, registry=fake_registry).cells[0].key
    assert ka == kb
    c = write(tmp_path, """
        base: {model: {variant: fake, params: {alpha: 0.25}}, train: {lr: 0.002}}
        seeds: [3]
    """, "c.yaml")
    assert load_grid(c, registry=fake_registry).cells[0].key != ka


def test_key_changes_with_any_setting():
    base = RunSpec()
    for path, value in [("train.lr", 0.5), ("seed", 9), ("data.shuffle_captions", True),
                        ("tokenizer.codebook_size", 512), ("sample.guidance", 0.0)]:
        tree = base.model_dump(mode="json")
        sec, _, field = path.partition(".")
        if field:
            tree[sec][field] = value
        else:
            tree[sec] = value
        assert run_key(RunSpec.model_validate(tree)) != run_key(base), path


def test_overrides_pin_axes(tmp_path, fake_registry):
    p = write(tmp_path, """
        axes: {model.variant: [fake, other]}
        seeds: [0, 1]
    """)
    g = load_grid(p, ("model.variant=other", "train.steps=7", "launcher.jobs=3"), registry=fake_registry)
    assert {c.variant for c in g.cells} == {"other"} and len(g.cells) == 2
    assert all(c.spec.train.steps == 7 for c in g.cells)
    assert g.launcher.jobs == 3
    assert parse_override("train.lr=3e-4") == ("train.lr", "3e-4")
    assert parse_override("sample.guidance=2") == ("sample.guidance", 2)


@pytest.mark.parametrize("text, expected", [
    ("base: {train: {stepz: 5}}\n", "train.stepz: unknown key (accepted:"),
    ("base: {train: {steps: many}}\n", "train.steps: Input should be a valid integer"),
    ("base: {model: {variant: nope}}\n", "unknown variant 'nope'; known variants: fake, other"),
    ("base: {model: {variant: fake, params: {beta: 1}}}\n", "model.params.beta: unknown key for variant 'fake'"),
    ("base: {data: {name: folder}}\n", "data.path is required"),
    ("base: {data: {name: imagenet}}\n", "data.name: must be 'shapes', 'digits', 'folder', 'webdataset' or 'hf'"),
    ("axes: {train.lr: []}\n", "axes.train.lr: empty list"),
    ("axes: {model.variant: [fake]}\nexclude: [{train.lr: 1}]\n", "exclude[0].train.lr: not an axis"),
    ("seeds: []\n", "seeds: empty list"),
    ("basis: {}\n", "basis: unknown key (accepted: name, description, base"),
    ("base: [1, 2\n", "YAML syntax error"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("launcher: {executor: slurmish}\n", "launcher.executor"),
    ("base: {text: {encoder: gpt9}}\n", "text.encoder must be 'learned', 'minilm' or 'hf:<name-or-path>'"),
])
def test_bad_grids_give_one_clear_line(tmp_path, fake_registry, text, expected):
    p = write(tmp_path, "base: {model: {variant: fake}}\n" if text.startswith(("axes", "seeds", "launcher", "exclude")) and "base" not in text else "")
    p.write_text((p.read_text() if p.exists() else "") + text)
    with pytest.raises(GridError) as info:
        load_grid(p, registry=fake_registry)
    msg = str(info.value)
    assert "\n" not in msg
    assert expected in msg, msg
    assert str(p) in msg


def test_missing_grid_file(tmp_path, fake_registry):
    with pytest.raises(GridError, match="does not exist"):
        load_grid(tmp_path / "nope.yaml", registry=fake_registry)


def test_fields_added_later_keep_old_keys_at_their_default():
    """Fields added after runs were recorded (sample.remask, eval.sheet_*, ...) are left out of
    the key at their default, so the quickstart cells keep the keys they had when the first
    results were written (a changed key would orphan every stored result); any other value gives
    a new key. (The keys were re-pinned when `data.heldout` changed the training data on
    purpose, old runs must not match the new data, when the grid moved to tokenizer seed 1, and
    when it moved to a SiLU tokenizer of 3000 steps and lr 4e-3 to clear align_acc 0.5.)"""
    grid = _shipped("quickstart.yaml")
    keys = {(c.spec.model.variant, c.seed): c.key for c in grid.cells}
    assert keys[("transformer", 0)] == "d53e485eeaa5908a"
    assert keys[("mamba-prefix", 0)] == "a077b212ac0a1316"
    from ablate.config import run_key
    spec = grid.cells[0].spec.model_copy(deep=True)
    spec.sample.remask = "critic"
    assert run_key(spec) != grid.cells[0].key


# ------------------------------------------------------------------------------ shipped grids

def _shipped(name):
    from ablate.grid import load_grid
    return load_grid(Path(__file__).resolve().parents[1] / "grids" / name)


def test_every_shipped_grid_expands():
    """Every file in grids/ is valid: grids expand to cells, study files (with `search:`) pass
    the study validation."""
    import yaml

    from ablate.study import load_study_file

    for path in sorted((Path(__file__).resolve().parents[1] / "grids").glob("*.yaml")):
        if "search" in yaml.safe_load(path.read_text()):
            assert load_study_file(path).name, path.name
            continue
        grid = _shipped(path.name)
        assert grid.cells, path.name


def test_conditioning_grids_cover_every_builtin_variant():
    """Both profiles list every variant shipped in variants/ (a new built-in variant must join
    the ablation), at one shared width and depth; the GPU one has 3 seeds and Slurm settings."""
    import variants
    from ablate.registry import _walk

    errors: dict = {}
    builtin = {cls.name for cls, _ in _walk(variants, errors)}
    assert not errors
    gpu, cpu = _shipped("conditioning.yaml"), _shipped("conditioning-cpu.yaml")
    for grid, seeds in ((gpu, {0, 1, 2}), (cpu, {0, 1})):
        names = {c.spec.model.variant for c in grid.cells}
        assert names == builtin, f"{grid.name}: missing {builtin - names}, extra {names - builtin}"
        assert {c.seed for c in grid.cells} == seeds
        assert len({(c.spec.model.width, c.spec.model.depth) for c in grid.cells}) == 1
        assert len(grid.cells) == len(builtin) * len(seeds)
    assert gpu.launcher.slurm.gpus_per_job == 1 and gpu.launcher.slurm.time_min > 0
    assert cpu.launcher.jobs == 2 and cpu.launcher.cpus_per_job == 1
