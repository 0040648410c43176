"""The CUDA paths (ablate.ops.cuda): the reparameterisation that maps text-dependent A and D onto
mamba-ssm's kernel, the fallbacks, lazy imports, and, on a GPU with the `cuda` extra, the real
kernels against the reference and our Mamba block against mamba_ssm.Mamba.

The reparameterisation tests run everywhere: the reference scan has exactly the semantics of
``selective_scan_fn`` for the inputs the kernel takes, so it stands in for the kernel on CPU and
the algebra around it (delta' = s * delta, u' = u / s, D and z outside) is checked in float64.
"""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ablate.ops import cuda as cuda_ops
from ablate.ops import selective_scan, selective_scan_ref
from ablate.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref

F64 = torch.float64


def _inputs(b=2, d=6, n=4, L=7, layout="bnl", seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u, delta, z = r(b, d, L), r(b, d, L) * 0.5, r(b, d, L)
    A = -torch.rand(d, n, generator=g, dtype=dtype) - 0.2
    if layout == "dn":
        B, C = r(d, n), r(d, n)
    elif layout == "bnl":
        B, C = r(b, n, L), r(b, n, L)
    else:
        B, C = r(b, 2, n, L), r(b, 2, n, L)
    scale = torch.rand(b, d, generator=g, dtype=dtype) * 2 + 0.1
    return dict(u=u, delta=delta, A=A, B=B, C=C, z=z, D=r(d), Db=r(b, d), bias=r(d) * 0.3, scale=scale)


CASES = [
    # (layout, A_scale, D kind, z, bias+softplus, last state)
    ("bnl", True, "d", True, True, True),
    ("bnl", True, "bd", False, False, False),
    ("bgnl", True, None, True, True, False),
    ("dn", True, "bd", True, True, True),
    ("bnl", False, "bd", True, True, True),
    ("bgnl", False, "bd", False, True, False),
]


@pytest.mark.parametrize("layout,scaled,dkind,use_z,soft,last", CASES)
def test_kernel_reparameterisation_equals_reference(layout, scaled, dkind, use_z, soft, last):
    """Outputs, last state and every gradient, float64, tolerance 1e-10: A_scale and D [b, d]
    through a kernel that knows neither give exactly the reference's function."""
    x = _inputs(layout=layout)
    names = ["u", "delta", "A", "B", "C", "z", "bias", "scale", "D", "Db"]
    leaves = {k: x[k].clone().requires_grad_() for k in names}

    def args(v):
        D = {"d": v["D"], "bd": v["Db"], None: None}[dkind]
        return dict(D=D, z=v["z"] if use_z else None, delta_bias=v["bias"] if soft else None,
                    delta_softplus=soft, return_last_state=last)

    got = cuda_ops.selective_scan_kernel(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                         A_scale=leaves["scale"] if scaled else None,
                                         kernel=selective_scan_ref, **args(leaves))
    ref_leaves = {k: x[k].clone().requires_grad_() for k in names}
    A_eff = ref_leaves["scale"].unsqueeze(-1) * ref_leaves["A"] if scaled else ref_leaves["A"]
    want = selective_scan_ref(ref_leaves["u"], ref_leaves["delta"], A_eff, ref_leaves["B"], ref_leaves["C"],
                              **args(ref_leaves))
    got_t, want_t = (got if last else (got,)), (want if last else (want,))
    for a, b in zip(got_t, want_t):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    w = torch.randn_like(want_t[0])
    (got_t[0] * w).sum().backward()
    (want_t[0] * w).sum().backward()
    for k in names:
        ga, gb = leaves[k].grad, ref_leaves[k].grad
        assert (ga is None) == (gb is None), k
        if ga is not None:
            torch.testing.assert_close(ga, gb, atol=1e-9, rtol=1e-9, msg=f"gradient of {k}")


def test_A_scale_on_cpu_paths_equals_the_materialised_A():
    x = _inputs()
    A_eff = x["scale"].unsqueeze(-1) * x["A"]
    for impl in ("ref", "torch", "numba"):
        got = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["Db"], x["z"], A_scale=x["scale"],
                             impl=impl)
        want = selective_scan_ref(x["u"], x["delta"], A_eff, x["B"], x["C"], x["Db"], x["z"])
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="A_scale must be"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], A_scale=x["scale"][:, :3])


def test_cuda_impl_falls_back_to_the_torch_path_and_says_why_once(caplog, monkeypatch):
    """On CPU tensors (or without mamba-ssm) impl='cuda' runs the torch path: same numbers, one
    warning naming the reason, however many calls."""
    monkeypatch.setattr(cuda_ops, "_said", set())
    x = _inputs()
    with caplog.at_level(logging.WARNING, logger="ablate.ops.cuda"):
        for _ in range(3):
            got = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                 delta_bias=x["bias"], delta_softplus=True, impl="cuda")
            conv = causal_conv1d(x["u"], torch.randn(6, 4, dtype=F64), None, "silu", impl="cuda")
    want = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                              delta_bias=x["bias"], delta_softplus=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert conv.shape == x["u"].shape
    msgs = [r.getMessage() for r in caplog.records]
    scan_msgs = [m for m in msgs if m.startswith("selective_scan: CUDA kernel not used")]
    conv_msgs = [m for m in msgs if m.startswith("causal_conv1d: CUDA kernel not used")]
    assert len(scan_msgs) == 1 and len(conv_msgs) == 1, msgs
    assert "not installed" in scan_msgs[0] or "not on a CUDA device" in scan_msgs[0]


def test_unsupported_reasons():
    u = torch.zeros(1, 2, 3)
    assert "CUDA device" in cuda_ops.unsupported(u, torch.zeros(2, 4), None)
    if torch.cuda.is_available():
        ug = u.cuda()
        assert "float64" in cuda_ops.unsupported(ug.double(), torch.zeros(2, 4), None)
        assert "batch-dependent A" in cuda_ops.unsupported(ug, torch.zeros(1, 2, 4), None)
        assert "initial state" in cuda_ops.unsupported(ug, torch.zeros(2, 4), torch.zeros(1, 2, 4))
        assert cuda_ops.unsupported(ug, torch.zeros(2, 4), None) is None


def test_cpu_training_never_imports_the_cuda_packages():
    """A CPU run of a Mamba block, forward and backward, leaves mamba_ssm and causal_conv1d
    unimported (they are the optional `cuda` extra, imported only for CUDA tensors)."""
    code = (
        "import sys, torch\n"
        "from ablate.model.mamba import Mamba\n"
        "m = Mamba(16)\n"
        "m(torch.randn(2, 5, 16), A_log_add=torch.zeros(2, 32)).sum().backward()\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('mamba_ssm', 'causal_conv1d')]\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# On a GPU with the `cuda` extra installed (never in CI: it has no GPU)

CUDA_EXTRA = "pip install -e '.[test,cuda]'"


def _need_gpu_with(package: str, installed: bool) -> None:
    """No CUDA device: skip (CI has none; the CPU tests above check the wiring). A CUDA device
    without the `cuda` extra: fail, naming the install. On a GPU the kernels are what these
    tests are for, and a skip there would let a GPU run pass without testing them."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the mamba-ssm kernel tests need a GPU")
    if not installed:
        pytest.fail(f"{package} is not installed on this CUDA machine: its GPU tests need the cuda extra "
                    f"({CUDA_EXTRA})", pytrace=False)


def _need_kernels():
    _need_gpu_with("mamba-ssm", cuda_ops.mamba_kernel() is not None)


def test_a_gpu_without_the_cuda_extra_fails_the_gpu_tests(monkeypatch):
    """The gate itself, on CPU: skip only where there is no GPU; a GPU without the extra fails."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="no CUDA device"):
        _need_gpu_with("mamba-ssm", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(pytest.fail.Exception, match=r"mamba-ssm is not installed.*\[test,cuda\]"):
        _need_gpu_with("mamba-ssm", False)
    _need_gpu_with("mamba-ssm", True)  # a GPU with the extra: the test runs


@pytest.mark.parametrize("layout", ["dn", "bnl", "bgnl"])
@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("L", [1, 7, 300])
def test_gpu_kernel_matches_reference(layout, n, L):
    """float32 on the GPU vs the float64 reference: outputs and gradients within 2e-3
    (relative to the largest magnitude), the kernel's own tolerance class."""
    _need_kernels()
    x = _inputs(b=2, d=64, n=n, L=L, layout=layout, dtype=torch.float32)
    dev = {k: v.cuda().requires_grad_() for k, v in x.items()}
    out = selective_scan(dev["u"], dev["delta"], dev["A"], dev["B"], dev["C"], dev["Db"], dev["z"],
                         delta_bias=dev["bias"], delta_softplus=True, A_scale=dev["scale"], impl="cuda")
    ref = {k: v.double().requires_grad_() for k, v in x.items()}
    want = selective_scan_ref(ref["u"], ref["delta"], ref["scale"].unsqueeze(-1) * ref["A"], ref["B"], ref["C"],
                              ref["Db"], ref["z"], delta_bias=ref["bias"], delta_softplus=True)
    scale = want.abs().max().item()
    assert (out.double().cpu() - want).abs().max().item() <= 2e-3 * scale
    w = torch.randn_like(want)
    (out * w.float().cuda()).sum().backward()
    (want * w).sum().backward()
    for k in ("u", "delta", "A", "B", "C", "Db", "z", "bias", "scale"):
        ga, gb = dev[k].grad.double().cpu(), ref[k].grad
        assert (ga - gb).abs().max().item() <= 2e-3 * max(gb.abs().max().item(), 1e-6), k


def test_gpu_causal_conv_matches_reference():
    _need_kernels()
    _need_gpu_with("causal-conv1d", cuda_ops.conv_kernel() is not None)
    x = torch.randn(2, 64, 50, device="cuda", requires_grad=True)
    w = torch.randn(64, 4, device="cuda", requires_grad=True)
    bias = torch.randn(64, device="cuda", requires_grad=True)
    got = causal_conv1d(x, w, bias, "silu", impl="cuda")
    want = causal_conv1d_ref(x.double(), w.double(), bias.double(), "silu")
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_gpu_mamba_block_equals_mamba_ssm():
    """Our block with mamba_ssm.Mamba's weights (same parameter names) gives its outputs and
    gradients on the GPU."""
    _need_kernels()
    from mamba_ssm.modules.mamba_simple import Mamba as Reference

    from ablate.model.mamba import Mamba

    torch.manual_seed(0)
    theirs = Reference(d_model=64, d_state=16, d_conv=4, expand=2).cuda()
    ours = Mamba(64, d_state=16, d_conv=4, expand=2).cuda()
    missing = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 100, 64, device="cuda")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs, y_ours = theirs(x1), ours(x2)
    torch.testing.assert_close(y_ours, y_theirs, atol=2e-4, rtol=2e-3)
    g = torch.randn_like(y_ours)
    (y_theirs * g).sum().backward()
    (y_ours * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=2e-3, rtol=2e-2)
    for (k, p), (_, q) in zip(sorted(ours.named_parameters()), sorted(theirs.named_parameters())):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-3, rtol=2e-2, msg=f"gradient of {k}")


def _state_update_reference(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba-ssm's ``selective_state_update`` semantics in torch (its documented reference)."""
    dt = dt + dt_bias if dt_bias is not None else dt
    dt = F.softplus(dt) if dt_softplus else dt
    dA = torch.exp(dt.unsqueeze(-1) * A)  # [b, d, n]
    state.copy_(state * dA + (dt * x).unsqueeze(-1) * B.unsqueeze(1))
    out = (state * C.unsqueeze(1)).sum(-1)
    if D is not None:
        out = out + x * D
    return out * F.silu(z) if z is not None else out


def _step_inputs(b=3, d=6, n=4, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(state=r(b, d, n), x=r(b, d), dt=r(b, d) * 0.5, A=-torch.rand(d, n, generator=g, dtype=dtype) - 0.2,
                B=r(b, n), C=r(b, n), D=r(d), z=r(b, d), dt_bias=r(d) * 0.3)


@pytest.mark.parametrize("impl", ["ref", "numba", "cuda"])
@pytest.mark.parametrize("options", [dict(D=True, z=True, bias=True), dict(D=False, z=False, bias=False),
                                     dict(D=True, z=False, bias=True, softplus=False),
                                     dict(D=False, z=True, bias=False, softplus=True)])
def test_state_update_paths_equal_one_step_of_the_scan(impl, options):
    """Every path of selective_state_update (cuda: mamba-ssm's semantics through the wiring, its
    reference standing in for the kernel on CPU) equals one position of the reference scan that
    starts from the state: the output and the state it leaves, float64."""
    from ablate.ops import selective_state_update

    if impl == "numba":
        pytest.importorskip("numba")
    v = _step_inputs()
    D, z, bias = (v["D"] if options["D"] else None), (v["z"] if options["z"] else None), \
        (v["dt_bias"] if options["bias"] else None)
    soft = options.get("softplus", options["bias"])
    want, last = selective_scan_ref(v["x"].unsqueeze(-1), v["dt"].unsqueeze(-1), v["A"], v["B"].unsqueeze(-1),
                                    v["C"].unsqueeze(-1), D, None if z is None else z.unsqueeze(-1), bias,
                                    soft, return_last_state=True, initial_state=v["state"])
    state = v["state"].clone()
    if impl == "cuda":
        got = cuda_ops.state_update_cuda(state, v["x"], v["dt"], v["A"], v["B"], v["C"], D, z, bias,
                                         soft, kernel=_state_update_reference)
    else:
        got = selective_state_update(state, v["x"], v["dt"], v["A"], v["B"], v["C"], D, z, bias,
                                     soft, impl=impl)
    torch.testing.assert_close(got, want[..., 0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, last, atol=1e-12, rtol=1e-12)


def test_state_update_float32_paths_agree_and_bad_shapes_are_named():
    from ablate.ops import selective_state_update

    pytest.importorskip("numba")
    v = {k: t.float() for k, t in _step_inputs(b=5, d=40, n=16).items()}
    s_ref, s_numba = v["state"].clone(), v["state"].clone()
    args = (v["x"], v["dt"], v["A"], v["B"], v["C"], v["D"], v["z"], v["dt_bias"], True)
    torch.testing.assert_close(selective_state_update(s_numba, *args, impl="numba"),
                               selective_state_update(s_ref, *args, impl="ref"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_numba, s_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"B must be \[5, 16\]"):
        selective_state_update(s_ref, v["x"], v["dt"], v["A"], v["B"][:, :3], v["C"])
    with pytest.raises(ValueError, match="impl must be one of"):
        selective_state_update(s_ref, *args, impl="nope")


def test_mamba_step_paths_agree_and_a_block_of_positions_is_one_scan():
    """``step`` one position at a time on each path, and ``step`` of n positions at once (one
    conv and one scan from the carried state, as a var scale runs), give the same outputs and
    leave the same state (float64)."""
    from ablate.model.mamba import Mamba, prefill, step

    torch.manual_seed(0)
    m = Mamba(16, d_state=8).double()
    x = torch.randn(3, 9, 16, dtype=F64)
    full = m(x)
    impls = ["ref"] + (["numba"] if _has_numba() else [])
    for impl in impls:
        _, st = prefill(m, x[:, :4])
        outs = torch.stack([step(m, x[:, i], st, impl=impl) for i in range(4, 9)], 1)
        torch.testing.assert_close(outs, full[:, 4:], atol=1e-10, rtol=1e-9, msg=impl)
    _, st_one = prefill(m, x[:, :4])
    _, st_block = prefill(m, x[:, :4])
    for i in range(4, 9):
        step(m, x[:, i], st_one)
    block = torch.cat([step(m, x[:, 4:6], st_block), step(m, x[:, 6:9], st_block)], 1)
    torch.testing.assert_close(block, full[:, 4:], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(st_block.ssm, st_one.ssm, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(st_block.conv, st_one.conv)


def _has_numba() -> bool:
    from ablate.ops import numba_available

    return numba_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; CI has none")
def test_gpu_mamba_step_kernel_equals_the_parallel_forward():
    from ablate.model.mamba import Mamba, prefill, step
    from ablate.ops.cuda import state_update_kernel

    _need_gpu_with("mamba-ssm", state_update_kernel() is not None)
    torch.manual_seed(0)
    m = Mamba(64, d_state=16).cuda()
    x = torch.randn(4, 33, 64, device="cuda")
    full = m(x)
    _, st = prefill(m, x[:, :1])
    outs = [step(m, x[:, i], st) for i in range(1, 33)]
    torch.testing.assert_close(torch.stack(outs, 1), full[:, 1:], atol=2e-3, rtol=2e-3)
