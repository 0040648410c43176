"""``ablate bench SUITE``: every suite prints its table and stores its rows in the database."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

from .core import EXIT_OK, BadInput, command, database, database_options, grid_shape


# bench layers' sizes: (option, type, default, help); ``--like-seed`` replaces the defaults
LAYERS_SIZE = (("batch", int, 32, "batch"), ("width", int, 96, "width"), ("depth", int, 4, "layers"),
               ("heads", int, 4, "attention heads"), ("tokens", grid_shape, "4x4", "image token grid HxW"),
               ("text-len", int, 10, "caption tokens"), ("passes", int, 50, "timed forward passes (mean reported)"),
               ("warmup", int, 5, "untimed passes first"))


def _layers_size(args: argparse.Namespace) -> dict[str, Any]:
    """bench layers' sizes: the options given, else ``--like-seed``'s, else the defaults."""
    from ..bench.layers import SEED_001_SIZE

    size: dict[str, Any] = {}
    for name, kind, default, _ in LAYERS_SIZE:
        key = name.replace("-", "_")
        given = getattr(args, key)
        if given is not None:
            size[key] = given
        elif args.like_seed:
            size[key] = SEED_001_SIZE[key]
        else:
            size[key] = kind(default) if isinstance(default, str) else default
    size["variants"] = args.variants or (list(SEED_001_SIZE["variants"]) if args.like_seed else None)
    return size


def _arguments(b: argparse.ArgumentParser) -> None:
    bsub = b.add_subparsers(dest="suite", required=True, metavar="SUITE")
    bo = bsub.add_parser("ops", help="selective scan paths and text-dependent scans vs attention: "
                                     "forward+backward time and peak memory")
    bo.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024], metavar="L")
    bo.add_argument("--batch", type=int, default=32)
    bo.add_argument("--d-inner", type=int, default=256, help="scan channels (2 x d_model)")
    bo.add_argument("--d-state", type=int, default=16)
    bo.add_argument("--repeats", type=int, default=3)
    bo.add_argument("--impls", nargs="+", help="ref torch numba cuda mambapy (default: what is available)")
    bs = bsub.add_parser("step", help="training-step time of whole generators, ratio to the first variant")
    bs.add_argument("--variants", nargs="+", default=["transformer", "mamba-prefix"])
    bs.add_argument("--batch", type=int, default=64)
    bs.add_argument("--width", type=int, default=96)
    bs.add_argument("--depth", type=int, default=4)
    bs.add_argument("--grid", type=grid_shape, default=(4, 4), help="image token grid HxW")
    bs.add_argument("--text-len", type=int, default=10)
    bs.add_argument("--codebook", type=int, default=512)
    bs.add_argument("--repeats", type=int, default=5)
    bs.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"],
                    help="autocast precisions to time, paired per variant (ratios to the first)")
    bs.add_argument("--compile", action="store_true", help="torch.compile every generator first")
    bl = bsub.add_parser("layers", help="the seed's speed table: full backbone forward, one layer, and "
                                        "the attention / SSM ops inside it, per variant")
    bl.add_argument("--variants", nargs="+", help="default: all registered (or the --grid file's)")
    bl.add_argument("--grid", help="grid YAML file: take its variants, their params, width, depth, heads, "
                                   "token grid and caption length")
    bl.add_argument("--like-seed", choices=["001"],
                    help="seed 001's size (UViT vs M-Mamba, width 1024, 22 layers, batch 32, 16x16 tokens, "
                         "77 caption tokens) and its A100 figures beside ours as ratios; options given win")
    for name, kind, default, text in LAYERS_SIZE:
        bl.add_argument(f"--{name}", type=kind, help=f"{text} (default: {default})")
    bl.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="autocast precision of every forward")
    bb = bsub.add_parser("breakdown", help="where a training pass's time goes: every labelled op of each "
                                           "variant's backbone, forward and backward")
    bb.add_argument("--variants", nargs="+", default=["transformer", "mamba-prefix"])
    bb.add_argument("--params", type=json.loads, default={},
                    help='the variants\' model.params as JSON, e.g. \'{"scan": "forward"}\'')
    for name, kind, default, text in LAYERS_SIZE:
        if name == "passes":
            default, text = 10, "profiled training passes (forward + backward)"
        if name == "warmup":
            default = 2
        bb.add_argument(f"--{name}", type=kind, default=kind(default) if isinstance(default, str) else default,
                        help=f"{text} (default: {default})")
    bb.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="autocast precision of every forward")
    bsa = bsub.add_parser("sample", help="sampling images/s of every paradigm x backbone (random weights), paired")
    bsa.add_argument("--paradigms", nargs="+", default=["masked", "ar", "var"], choices=["masked", "ar", "var"])
    bsa.add_argument("--variants", nargs="+", default=["transformer", "mamba-prefix", "mamba-adaln", "hybrid-gsa"])
    bsa.add_argument("--tokens", type=grid_shape, nargs="+", default=[(8, 8), (16, 16)],
                     help="image token grids HxW (default: 8x8 16x16)")
    bsa.add_argument("--batch", type=int, default=32)
    bsa.add_argument("--width", type=int, default=96)
    bsa.add_argument("--depth", type=int, default=4)
    bsa.add_argument("--text-len", type=int, default=10)
    bsa.add_argument("--codebook", type=int, default=512)
    bsa.add_argument("--steps", type=int, default=10, help="masked: decoding steps")
    bsa.add_argument("--guidance", type=float, default=2.0, help="0: no classifier-free guidance batch")
    bsa.add_argument("--decode", choices=["cached", "full"], default="cached",
                     help="ar, var: recurrent state / KV cache, or the whole sequence per step")
    bsa.add_argument("--repeats", type=int, default=3)
    bt = bsub.add_parser("table", help="time `ablate table` on a fresh database of 10,000 runs x 20 metrics")
    bt.add_argument("--runs", type=int, default=10_000)
    bt.add_argument("--metrics", type=int, default=20)
    bt.add_argument("--repeats", type=int, default=3)
    bt.add_argument("--format", choices=["markdown", "csv", "latex", "html", "json"], default="markdown")
    bt.add_argument("--no-subprocess", action="store_true", help="time only the in-process table")
    bd = bsub.add_parser("data", help="token-store preparation images/s per core, training data wait, "
                                      "peak memory on a store of --big vs --small samples")
    bd.add_argument("--images", type=int, default=2000, help="images encoded for the throughput")
    bd.add_argument("--image-size", type=int, default=64)
    bd.add_argument("--small", type=int, default=10_000, help="samples of the small store")
    bd.add_argument("--big", type=int, default=1_000_000, help="samples of the big store")
    bd.add_argument("--steps", type=int, default=30, help="training steps per measurement")
    bd.add_argument("--batch", type=int, default=64)
    br = bsub.add_parser("report", help="time `ablate report` on a fresh database of 10,000 runs with curves and "
                                        "images, and its index page in headless Chromium")
    br.add_argument("--runs", type=int, default=10_000)
    br.add_argument("--repeats", type=int, default=2)
    br.add_argument("--one-config-per-run", action="store_true",
                    help="every run its own configuration (10,000 table rows, a large study's shape)")
    br.add_argument("--no-browser", action="store_true", help="time only the build")
    br.add_argument("--no-subprocess", action="store_true", help="time only the in-process build")
    for sp in (bo, bs, bl, bb, bsa):
        sp.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
        sp.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    for sp in (bo, bs, bl, bb, bsa, bt, bd, br):
        sp.add_argument("--no-store", action="store_true", help="print only; do not write the database")
        database_options(sp)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device: cuda requested but torch sees no CUDA device; use --device cpu")
    return name


def _check_variants(names: list[str]) -> None:
    from ..registry import UnknownVariant, load_registry

    reg = load_registry()
    for v in names:
        try:
            reg.get(v)
        except UnknownVariant as exc:
            raise BadInput(f"--variants: {str(exc).split(': ', 1)[1]}") from None


def _torch_suite(args: argparse.Namespace) -> tuple[Callable[[], list[dict[str, Any]]], Callable[[list], str]]:
    """ops, step, layers, breakdown, sample: what to measure and how to print it (on ``args.device``)."""
    from ..bench import ops as bench_ops, step as bench_step

    device = _device(args.device)
    if args.suite == "ops":
        return (lambda: bench_ops.bench_ops(lengths=args.lengths, batch=args.batch, d_inner=args.d_inner,
                                        n=args.d_state, repeats=args.repeats, impls=args.impls, device=device),
                bench_ops.format_rows)
    if args.suite == "layers":
        from ..bench import layers as bl

        size = _layers_size(args)
        _check_variants(size["variants"] or [])
        cells = bl.cells_from_grid(Path(args.grid)) if args.grid else None
        if cells and size["variants"]:
            cells = [c for c in cells if c["variant"] in size["variants"]]

        def layers() -> list[dict[str, Any]]:
            rows = bl.bench_layers(size["variants"], width=size["width"], depth=size["depth"], heads=size["heads"],
                                   grid=size["tokens"], text_len=size["text_len"], batch=size["batch"],
                                   passes=size["passes"], warmup=size["warmup"], device=device, cells=cells,
                                   precision=args.precision)
            if args.like_seed:  # the seed's ratios beside ours, stored with the rows
                for c in bl.seed_comparison(rows):
                    rows.append(dict(variant="seed 001 ratio", **c))
            return rows

        def show(rows: list[dict[str, Any]]) -> str:
            ops = [r for r in rows if r["variant"] != "seed 001 ratio"]
            text = bl.format_rows(ops)
            if args.like_seed:
                text += "\n\n" + bl.format_comparison([r for r in rows if r["variant"] == "seed 001 ratio"], ops)
            return text

        return layers, show
    if args.suite == "breakdown":
        from ..bench import layers as bl

        _check_variants(args.variants)
        return (lambda: bl.bench_breakdown(args.variants, width=args.width, depth=args.depth, heads=args.heads,
                                           grid=args.tokens, text_len=args.text_len, batch=args.batch,
                                           passes=args.passes, warmup=args.warmup, device=device,
                                           precision=args.precision, params=args.params),
                bl.format_breakdown)
    if args.suite == "sample":
        from ..bench import sample as bsm

        _check_variants(args.variants)
        skipped: list[str] = []

        def sample() -> list[dict[str, Any]]:
            rows = bsm.bench_sample(args.paradigms, args.variants, args.tokens, batch=args.batch, width=args.width,
                                    depth=args.depth, text_len=args.text_len, codebook=args.codebook,
                                    steps=args.steps, guidance=args.guidance, decode=args.decode,
                                    repeats=args.repeats, device=device, skipped=skipped)
            if not rows:
                raise ValueError("--variants/--paradigms: no variant here serves these paradigms")
            return rows

        def show(rows: list[dict[str, Any]]) -> str:
            return bsm.format_rows(rows) + "".join(f"\nskipped {s}" for s in dict.fromkeys(skipped))

        return sample, show
    _check_variants(args.variants)
    return (lambda: bench_step.bench_steps(args.variants, batch=args.batch, width=args.width, depth=args.depth,
                                      grid=args.grid, text_len=args.text_len, codebook_size=args.codebook,
                                      repeats=args.repeats, device=device, precisions=args.precision,
                                      compile=args.compile),
            bench_step.format_steps)


def _process_suite(args: argparse.Namespace) -> tuple[Callable[[], list[dict[str, Any]]], Callable[[list], str]]:
    """table, data, report: suites that set up their own work (no torch threads of ours)."""
    if args.suite == "table":
        from ..bench.table import bench_table, format_rows

        return (lambda: bench_table(runs=args.runs, n_metrics=args.metrics, repeats=args.repeats, fmt=args.format,
                                    subprocess_runs=not args.no_subprocess), format_rows)
    if args.suite == "report":
        from ..bench.report import bench_report, format_rows as report_rows

        return (lambda: bench_report(runs=args.runs, repeats=args.repeats, one_config_per_run=args.one_config_per_run,
                                     browser=not args.no_browser, subprocess_run=not args.no_subprocess),
                report_rows)
    from ..bench.data import bench_data, format_rows as data_rows

    return (lambda: bench_data(images=args.images, image_size=args.image_size, small=args.small, big=args.big,
                               steps=args.steps, batch=args.batch), data_rows)


@command("bench", "benchmarks: print a table and store it in the results database", _arguments, database=False)
def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite, print its table, store its rows in the results database (opened,
    and so checked, before minutes are spent measuring)."""
    import contextlib
    import platform

    torch_suite = args.suite in ("ops", "step", "layers", "breakdown", "sample")
    measure, format_rows = (_torch_suite if torch_suite else _process_suite)(args)
    with contextlib.ExitStack() as stack:
        db = None if args.no_store else stack.enter_context(database(args, create=True))
        if torch_suite:
            import torch

            before = torch.get_num_threads()
            stack.callback(torch.set_num_threads, before)
            if args.threads:
                torch.set_num_threads(args.threads)
            where = (torch.cuda.get_device_name() if args.device != "cpu" and _device(args.device) == "cuda"
                     else f"cpu, {torch.get_num_threads()} threads")
        else:
            where = f"cpu, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
        try:
            rows = measure()
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        print(f"ablate bench {args.suite} ({where})")
        print(format_rows(rows))
        if db is not None:
            from ..jobs import code_revision

            session = db.record_bench(args.suite, rows, device=where, code_rev=code_revision())
            print(f"(stored as bench {args.suite} session {session[:12]} in {db!r})")
    return EXIT_OK
