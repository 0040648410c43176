"""Streaming sources (webdataset, Hugging Face on disk), the pretrained VQModel tokenizer, and
preparation into the token store, on real files the tests write."""
from __future__ import annotations

import re
import tarfile

import numpy as np
import pytest
import torch

from ablate.config import ConfigError, DataSpec, RunSpec
from ablate.data import sources
from ablate.data.encode import StreamedSplits, encode_store
from ablate.tokenizer.pretrained import load_pretrained
from scale_data import add_member, pickle_bomb, png_bytes, shapes_images, tiny_vqmodel, write_shards

pytest.importorskip("webdataset")


def _wds_spec(urls: str, **kw) -> DataSpec:
    return DataSpec(name="webdataset", urls=urls, val_urls=urls, test_urls=urls, image_size=16, **kw)


def test_webdataset_decodes_only_images_and_text_and_counts_what_it_skips(tmp_path):
    images, captions = shapes_images(6, 16, 0)
    marker = tmp_path / "pwned.txt"
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "a.png", png_bytes(images[0]))
        add_member(tar, "a.txt", captions[0].encode())
        add_member(tar, "b.png", png_bytes(images[1]))
        add_member(tar, "b.json", f'{{"caption": "{captions[1]}"}}'.encode())
        add_member(tar, "c.jpg", b"not a jpeg at all")  # undecodable
        add_member(tar, "c.txt", b"a caption")
        add_member(tar, "d.png", png_bytes(images[3]))
        add_member(tar, "d.txt", b"   ")  # empty caption
        add_member(tar, "e.png", png_bytes(images[4]))  # no caption
        add_member(tar, "f.png", png_bytes(images[5]))
        add_member(tar, "f.txt", captions[5].encode())
        add_member(tar, "f.pyd", pickle_bomb(marker))  # would write the marker if unpickled
    spec = _wds_spec(str(shard))
    it, report = sources.read_shard(spec, sources.shards(spec, "train")[0])
    got = list(it)
    assert [c for _, c in got] == [captions[0], captions[1], captions[5]]
    assert all(np.array_equal(img, images[i]) for (img, _), i in zip(got, (0, 1, 5)))  # png: lossless
    assert report["samples"] == 6 and report["kept"] == 3
    assert report["skipped"] == {"undecodable_image": 1, "empty_caption": 1, "no_caption": 1, "unsafe_member": 1}
    assert not marker.exists(), "a pickle member was unpickled"


def test_missing_corrupt_and_captionless_shards_fail_with_one_line_naming_them(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"data.urls: shard '.*nope-00000.tar' does not exist \(and 2 more of 3\)"):
        sources.shards(_wds_spec(str(tmp_path / "nope-{00000..00002}.tar")), "train")
    bad = tmp_path / "bad.tar"
    pattern, *_ = write_shards(tmp_path, "good", 1, 4)
    bad.write_bytes((tmp_path / "good-00000.tar").read_bytes()[:700] + b"\x00garbage" * 50)
    spec = _wds_spec(str(bad))
    with pytest.raises(ValueError, match=r"data shard '.*bad.tar'"):
        list(sources.read_shard(spec, (str(bad), str(bad)))[0])
    nocap = tmp_path / "nocap.tar"
    with tarfile.open(nocap, "w") as tar:
        add_member(tar, "a.png", png_bytes(shapes_images(1, 16, 0)[0][0]))
    with pytest.raises(ValueError, match="none of its 1 samples"):
        list(sources.read_shard(spec, (str(nocap), str(nocap)))[0])
    monkeypatch.delenv("ABLATE_DATA", raising=False)
    with pytest.raises(ConfigError, match=r"data.urls: \$ABLATE_DATA is not set"):
        sources.shards(_wds_spec("$ABLATE_DATA/cc3m/{00000..00003}.tar"), "train")
    monkeypatch.setenv("ABLATE_DATA", str(tmp_path))
    assert len(sources.shards(_wds_spec("$ABLATE_DATA/good-{00000..00000}.tar"), "train")) == 1
    with pytest.raises(Exception, match="data.val_urls is required"):
        DataSpec(name="webdataset", urls=pattern, test_urls=pattern)


def test_hf_dataset_saved_on_disk_is_read_in_shards(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images, captions = shapes_images(7, 16, 1)
    pil = [Image.fromarray(im.transpose(1, 2, 0)) for im in images]
    feats = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": pil, "text": captions[:6] + [""]}, features=feats)
    datasets.DatasetDict({"train": ds, "validation": ds, "test": ds}).save_to_disk(str(tmp_path / "hf"))
    spec = DataSpec(name="hf", path=str(tmp_path / "hf"), image_column="img", caption_column="text",
                    image_size=16, shard_size=3)
    shards = sources.shards(spec, "val")
    assert len(shards) == 3
    got, reports = [], []
    for sh in shards:
        it, rep = sources.read_shard(spec, sh)
        got += list(it)
        reports.append(rep)
    assert [c for _, c in got] == captions[:6]
    assert all(np.array_equal(img, images[i]) for i, (img, _) in enumerate(got))
    assert reports[-1]["skipped"] == {"empty_caption": 1}
    with pytest.raises(ConfigError, match=r"data.caption_column: 'caption' is not a column"):
        sources.shards(spec.model_copy(update={"caption_column": "caption"}), "train")


def test_pretrained_vqmodel_loads_offline_and_round_trips(tmp_path):
    pytest.importorskip("diffusers")
    path = tiny_vqmodel(tmp_path / "vq", codebook=32, blocks=3)
    vq = load_pretrained(str(path), 16)
    assert vq.codebook_size == 32 and vq.downsample == 4 and vq.grid == (4, 4)
    images = torch.from_numpy(shapes_images(3, 16, 0)[0])
    codes = vq.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long and int(codes.max()) < 32
    with torch.no_grad():  # the same indices as the model's own quantizer
        h = vq.model.encode(images.float() / 127.5 - 1).latents
        ref = vq.model.quantize(h)[2][2].reshape(3, 4, 4)
    assert torch.equal(codes, ref)
    out = vq.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.uint8
    # decoding the codes equals the model's own decode of its quantized latents
    with torch.no_grad():
        z = vq.model.quantize(h)[0]
        direct = ((vq.model.decode(z, force_not_quantize=True).sample.clamp(-1, 1) + 1) * 127.5).round()
    assert torch.equal(out, direct.to(torch.uint8))
    # .bin weights (no safetensors) load with weights_only and give the same codes
    bin_path = tiny_vqmodel(tmp_path / "vq_bin", codebook=32, blocks=3, safetensors=False)
    assert torch.equal(load_pretrained(str(bin_path), 16).encode(images), codes)
    with pytest.raises(ConfigError, match="not divisible by the pretrained tokenizer's downsampling factor 4"):
        load_pretrained(str(path), 18)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ConfigError, match=r"tokenizer.path: .* holds a 'AutoencoderKL', not a diffusers VQModel"):
        load_pretrained(str(tmp_path / "vae"), 16)
    with pytest.raises(ConfigError, match="not a diffusers model directory"):
        load_pretrained(str(tmp_path / "nothing"), 16)


@pytest.fixture
def streamed(tmp_path):
    pytest.importorskip("diffusers")
    pattern, images, captions = write_shards(tmp_path / "shards", "train", 4, 10)
    vq = tiny_vqmodel(tmp_path / "vq")
    spec = RunSpec.model_validate({
        "data": {"name": "webdataset", "urls": pattern, "val_urls": pattern.replace("{00000..00003}", "00000"),
                 "test_urls": pattern.replace("{00000..00003}", "00001"), "image_size": 16,
                 "n_train": 35, "n_val": 8, "n_test": 8},
        "tokenizer": {"kind": "diffusers", "path": str(vq)},
        "model": {"width": 32, "depth": 1, "heads": 2}, "text": {"max_len": 8},
        "train": {"steps": 3, "batch_size": 8, "eval_every": 3, "log_every": 1, "throughput_warmup": 0},
        "eval": {"n_images": 8, "sheet_prompts": 0}, "sample": {"steps": 2, "batch_size": 8}})
    return spec, images, captions


def test_encode_tasks_split_the_shards_and_a_killed_task_redoes_only_its_unfinished_ones(streamed, tmp_path):
    spec, images, captions = streamed
    splits = StreamedSplits(spec.data)
    vq = load_pretrained(spec.tokenizer.path, 16)
    t0, t1 = splits.task_shards(0, 2), splits.task_shards(1, 2)
    flat = [(s, i) for s in ("train", "val", "test") for i in range(len(splits.shards[s]))]
    assert sorted([(s, i) for s, i, _ in t0 + t1]) == sorted(flat) and not {x[:2] for x in t0} & {x[:2] for x in t1}

    said: list[str] = []
    calls = {"n": 0}

    def die_after_first() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        encode_store(splits, vq, "tok", tmp_path / "res", 0, 2, say=said.append, safe_point=die_after_first)
    assert len(said) == 1  # one shard finished before the kill
    said.clear()
    store = encode_store(splits, vq, "tok", tmp_path / "res", 0, 2, say=said.append)
    assert len(said) == len(t0) - 1, "the finished shard was redone"
    encode_store(splits, vq, "tok", tmp_path / "res", 1, 2, say=said.append)
    said.clear()
    encode_store(splits, vq, "tok", tmp_path / "res", 0, 1, say=said.append)
    assert said == [], "a complete store is not re-encoded"
    train = store.split("train")
    assert len(train) == 40 and train.captions(range(40)) == captions
    assert torch.equal(train.codes(torch.arange(40)), vq.encode(torch.from_numpy(images)).flatten(1))
    assert train.reports()[0]["kept"] == 10 and "seconds" in train.reports()[0]


def test_prepare_and_train_from_a_streamed_store(streamed, tmp_path):
    from ablate.prepare import prepare
    from ablate.train import Trainer

    spec, images, captions = streamed
    prep = prepare(spec, tmp_path / "res", torch.device("cpu"), say=lambda m: None)
    assert prep.judge is None and "tok_recon_mse" in prep.metrics
    assert len(prep.split("train")) == 35  # data.n_train caps the 40 samples
    assert prep.splits.test.captions == captions[10:18]  # test shard 00001, first n_test
    tr = Trainer(spec, prep, torch.device("cpu"), tmp_path / "res" / "runs" / "k", say=lambda m: None)
    assert int(tr.sampler.indices(100).max()) < 35
    tr.train()
    assert tr.step == 3 and np.isfinite(tr.last_train_loss)
    assert tr.generate(4).shape == (4, 3, 16, 16)


def _folder(root, n=12, size=16):
    import json

    from PIL import Image

    images, captions = shapes_images(n, size, 3)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(images[i].transpose(1, 2, 0)).save(root / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": captions[i]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root, images, captions


def test_folder_streams_into_the_store_in_the_in_memory_split_order(tmp_path):
    from ablate.data import load_dataset
    from ablate.prepare import prepare

    root, images, captions = _folder(tmp_path / "f", n=60)
    spec = RunSpec.model_validate({"data": {"name": "folder", "path": str(root), "image_size": 16,
                                            "n_train": 100, "n_val": 8, "n_test": 8, "shard_size": 10},
                                   "tokenizer": {"steps": 2, "codebook_size": 16, "batch_size": 4}})
    mem = load_dataset(spec.data)  # the in-memory loader: same splits, same order
    prep = prepare(spec, tmp_path / "res", torch.device("cpu"), say=lambda m: None)
    train = prep.split("train")
    assert len(train) == len(mem.train) == 46
    assert train.captions(range(46)) == mem.train.captions
    assert prep.splits.test.captions == mem.test.captions
    assert torch.equal(prep.splits.test.images, mem.test.images)
    assert len(train.shards) == 5  # 46 samples in shards of 10
    # the shuffled-caption control shares the store and permutes only its training captions
    ctl = spec.model_copy(update={"data": spec.data.model_copy(update={"shuffle_captions": True})})
    ctl_prep = prepare(ctl, tmp_path / "res", torch.device("cpu"), say=lambda m: None)
    assert ctl_prep.store.root == prep.store.root
    shuffled = ctl_prep.split("train").captions(range(46))
    assert sorted(shuffled) == sorted(mem.train.captions) and shuffled != mem.train.captions
    assert torch.equal(ctl_prep.split("train").codes(torch.arange(46)), train.codes(torch.arange(46)))
    assert ctl_prep.split("val").captions(range(6)) == prep.split("val").captions(range(6))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink_file", "symlink_dir"])
def test_folder_refuses_paths_out_of_the_folder(tmp_path, how):
    import json
    import os

    from ablate.data import folder

    root, _, _ = _folder(tmp_path / "f")
    secret = tmp_path / "secret.png"
    secret.write_bytes((root / "0.png").read_bytes())
    name = {"dotdot": "../secret.png", "absolute": str(secret), "symlink_file": "link.png",
            "symlink_dir": "sub/secret.png"}[how]
    if how == "symlink_file":
        os.symlink(secret, root / "link.png")
    if how == "symlink_dir":
        os.symlink(tmp_path, root / "sub")
    with open(root / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": name, "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="outside data.path|symbolic link"):
        folder.read_index(root)
    with pytest.raises(ConfigError, match="data.path"):
        sources.shards(DataSpec(name="folder", path=str(root)), "train")


@pytest.mark.parametrize("breakage, message", [
    ("missing_shard", r"data.urls: shard '.*train-00002.tar' does not exist \(and 5 more of 8\)"),
    ("not_vqmodel", r"tokenizer.path: .* holds a 'AutoencoderKL', not a diffusers VQModel"),
    ("indivisible", r"data.image_size \(18\) is not divisible by the pretrained tokenizer's downsampling factor 4"),
    ("unset_var", r"data.urls: \$ABLATE_NOPE is not set"),
])
def test_bad_real_data_input_is_one_line_exit_2_and_nothing_written(tmp_path, breakage, message, capsys,
                                                                     monkeypatch):
    pytest.importorskip("diffusers")
    import yaml

    from ablate.cli import main

    pattern, _, _ = write_shards(tmp_path / "shards", "train", 2, 4)
    vq = tiny_vqmodel(tmp_path / "vq")
    data = {"name": "webdataset", "urls": pattern, "val_urls": pattern, "test_urls": pattern, "image_size": 16}
    tok = {"kind": "diffusers", "path": str(vq)}
    if breakage == "missing_shard":
        data["urls"] = pattern.replace("{00000..00001}", "{00000..00007}")
    elif breakage == "not_vqmodel":
        (tmp_path / "vae").mkdir()
        (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
        tok["path"] = str(tmp_path / "vae")
    elif breakage == "indivisible":
        data["image_size"] = 18
    else:
        monkeypatch.delenv("ABLATE_NOPE", raising=False)
        data["urls"] = "$ABLATE_NOPE/train-{00000..00001}.tar"
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "bad", "base": {"data": data, "tokenizer": tok},
                                    "axes": {"model.variant": ["transformer"]}}))
    results = tmp_path / "results"
    for cmd in (["run", str(grid)], ["prepare", str(grid)], ["prepare", str(grid), "--dry-run"]):
        code = main([*cmd, "--results", str(results)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and re.search(message, err), err
    assert not list(results.rglob("*.db")) and not (results / "cache").exists()
