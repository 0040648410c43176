"""``ablate bench data``: the real-data path's costs, measured.

1. **Preparation throughput**, images/s per core (one torch thread): webdataset shards of
   ``shapes`` images written here, read and decoded (PIL), then encoded by a VQ-VAE of the
   project's default shape (randomly initialised: a trained one costs the same), into the token
   store. Decode alone and decode + encode are timed apart.
2. **Data wait in training**: the share of the timed training-step time spent reading the batch
   (codes from the memory-mapped store, text features), from the trainer's own accounting
   (``data_wait_share``), on a synthetic store.
3. **Memory vs dataset size**: peak resident memory of a training process on a synthetic store
   of ``--big`` samples against one of ``--small`` samples, same model and steps, each in a
   fresh process; the target is a ratio within 1.10 (memory bounded by the batch).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CAPTION_POOL = 2000
SHARD = 100_000


def _captions(n: int) -> list[str]:
    from ablate.data import shapes

    _, caps, _ = shapes.generate(min(n, CAPTION_POOL), 8, 1, [0, 9], None, 0)
    return caps


def synthetic_store(root: Path, n: int, tokens: int = 16, codebook: int = 512, seed: int = 0) -> Any:
    """A token store of ``n`` samples: random codes, captions cycled from a pool of shapes
    captions, in shards of :data:`SHARD`."""
    from ablate.data.store import TokenStore

    side = int(round(tokens ** 0.5))
    store = TokenStore(root, {"data": f"synthetic-{n}", "tokenizer": "synthetic", "grid": [side, side],
                              "codebook_size": codebook})
    pool = _captions(n)
    rng = np.random.default_rng(seed)
    for split, size in (("train", n), ("val", min(n, 512)), ("test", min(n, 512))):
        for i, start in enumerate(range(0, size, SHARD)):
            m = min(SHARD, size - start)
            store.write(split, i, rng.integers(0, codebook, (m, side * side)),
                        [pool[(start + j) % len(pool)] for j in range(m)])
    return store


def _trainer(store: Any, out: Path, steps: int, batch: int) -> Any:
    from ablate.config import RunSpec
    from ablate.prepare import Prepared
    from ablate.train import Trainer

    spec = RunSpec.model_validate({
        "model": {"width": 96, "depth": 4, "heads": 4}, "text": {"max_len": 10},
        "train": {"steps": steps, "batch_size": batch, "eval_every": 10**6, "log_every": 10**6,
                  "checkpoint_every": 10**6, "throughput_warmup": 2},
        "eval": {"sheet_prompts": 0}})
    prep = Prepared(None, None, "synthetic", store, None, {})
    return Trainer(spec, prep, torch.device("cpu"), out, say=lambda m: None)


def bench_prepare(n_images: int = 2000, image_size: int = 64, per_shard: int = 500) -> list[dict[str, Any]]:
    """Images/s per core of decoding, and of decoding + VQ-VAE encoding into the store."""
    from ablate.config import DataSpec, TokenizerSpec
    from ablate.data.encode import StreamedSplits, encode_store
    from ablate.data.sources import read_shard
    from ablate.tokenizer import VQVAE
    from ablate.data import shapes
    from ablate.data.sources import write_shards

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images, caps, _ = shapes.generate(n_images, image_size, 1, [0, 8], None, 0)
        pattern = write_shards(Path(tmp) / "shards", "bench", images, caps, per_shard)
        spec = DataSpec(name="webdataset", urls=pattern, val_urls=pattern, test_urls=pattern,
                        image_size=image_size)
        splits = StreamedSplits(spec)
        t0 = time.perf_counter()
        n = sum(1 for sh in splits.shards["train"] for _ in read_shard(spec, sh)[0])
        decode_s = time.perf_counter() - t0
        rows.append({"stage": "decode (PIL, crop, resize)", "images": n, "seconds": decode_s,
                     "images_per_s_per_core": n / decode_s})
        vq = VQVAE(TokenizerSpec(), (image_size, image_size)).eval()
        t0 = time.perf_counter()
        store = encode_store(splits, vq, "bench", Path(tmp) / "res", say=lambda m: None)
        total = sum(len(store.split(s)) for s in ("train", "val", "test"))
        enc_s = time.perf_counter() - t0
        rows.append({"stage": f"decode + encode (vqvae {vq.grid[0]}x{vq.grid[1]}) + store", "images": total,
                     "seconds": enc_s, "images_per_s_per_core": total / enc_s})
    return rows


def bench_wait(n: int = 100_000, steps: int = 30, batch: int = 64) -> dict[str, Any]:
    """The trainer's data-wait share on a synthetic store of ``n`` samples."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "store", n)
        tr = _trainer(store, Path(tmp) / "run", steps, batch)
        tr.train()
        m = tr.final_metrics()
    return {"samples": n, "steps": steps, "step_ms": 1000 * m["train_s"] / tr.timed_steps,
            "data_ms": 1000 * tr.data_s / tr.timed_steps, "data_wait_share": m["data_wait_share"]}


def _rss_child(root: str, steps: int, batch: int) -> None:
    """Run in a fresh process: train on the store at ``root``; print peak RSS as JSON."""
    import resource

    from ablate.data.store import TokenStore

    torch.set_num_threads(1)
    info = json.loads((Path(root) / "manifest.json").read_text())
    store = TokenStore(Path(root), {k: info[k] for k in ("data", "tokenizer", "grid", "codebook_size")})
    with tempfile.TemporaryDirectory() as tmp:
        _trainer(store, Path(tmp) / "run", steps, batch).train()
    anon = next((int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                 if line.startswith("RssAnon:")), 0)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_anon_mb": anon / 1024}))


def bench_memory(small: int = 10_000, big: int = 1_000_000, steps: int = 30, batch: int = 64) -> list[dict[str, Any]]:
    """Peak RSS of a training process on stores of ``small`` and ``big`` samples."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (small, big):
            root = Path(tmp) / f"store-{n}"
            synthetic_store(root, n)
            code = f"from ablate.bench.data import _rss_child; _rss_child({str(root)!r}, {steps}, {batch})"
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows.append({"samples": n, **json.loads(res.stdout.strip().splitlines()[-1])})
    base = rows[0]["maxrss_mb"]
    for r in rows:
        r["ratio_to_small"] = r["maxrss_mb"] / base
    return rows


def bench_data(images: int = 2000, image_size: int = 64, small: int = 10_000, big: int = 1_000_000,
               steps: int = 30, batch: int = 64) -> list[dict[str, Any]]:
    """All three measurements as rows (``part``: prepare, wait, memory)."""
    prep = bench_prepare(n_images=images, image_size=image_size)
    wait = bench_wait(n=small, steps=steps, batch=batch)
    mem = bench_memory(small=small, big=big, steps=steps, batch=batch)
    return [{"part": "prepare", **r} for r in prep] + [{"part": "wait", **wait}] + [{"part": "memory", **r} for r in mem]


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The report of :func:`bench_data`'s rows."""
    part = {p: [r for r in rows if r["part"] == p] for p in ("prepare", "wait", "memory")}
    return format_report(part["prepare"], part["wait"][0], part["memory"])


def format_report(prep: list[dict[str, Any]], wait: dict[str, Any], mem: list[dict[str, Any]]) -> str:
    lines = ["preparation (one core):",
             *(f"  {r['stage']:<44} {r['images_per_s_per_core']:8.1f} images/s  ({r['images']} in "
               f"{r['seconds']:.1f}s)" for r in prep),
             f"training data wait on a store of {wait['samples']:,} samples: {wait['data_ms']:.2f} ms of "
             f"{wait['step_ms']:.1f} ms per step = {100 * wait['data_wait_share']:.2f}% (target < 2%)",
             "peak memory of a training process by store size:",
             *(f"  {r['samples']:>10,} samples: max RSS {r['maxrss_mb']:7.1f} MB (anonymous {r['rss_anon_mb']:.1f} MB), "
               f"ratio {r['ratio_to_small']:.3f}" for r in mem),
             "  target: ratio within 1.10"]
    return "\n".join(lines)
