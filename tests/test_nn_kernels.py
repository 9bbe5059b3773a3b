"""The fused GroupNorm + affine + SiLU kernel (difforge.nn.cpu_kernels) against float64 PyTorch."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difforge.nn import UNet, UNetConfig, cpu_kernels
from difforge.nn.cpu_kernels import group_norm_act

CL = torch.channels_last
HAVE_CC = shutil.which("cc") is not None


@pytest.fixture(autouse=True)
def _kernels_on():
    previous = cpu_kernels.set_enabled(True)
    yield
    cpu_kernels.set_enabled(previous)


def reference(x, norm, pre=None, scale=None, shift=None, silu=True):
    """The definition, in float64: act(GN(x + pre) * w * (1 + scale) + b * (1 + scale) + shift)."""
    x = x.double()
    if pre is not None:
        x = x + pre.double()[:, :, None, None]
    h = F.group_norm(x, norm.num_groups, None, None, norm.eps)
    c = x.shape[1]
    w = norm.weight.double() if norm.weight is not None else torch.ones(c, dtype=torch.float64)
    b = norm.bias.double() if norm.bias is not None else torch.zeros(c, dtype=torch.float64)
    a, s = w[None, :], b[None, :]
    if scale is not None:
        a, s = a * (1 + scale.double()), s * (1 + scale.double())
    if shift is not None:
        s = s + shift.double()
    h = h * a[:, :, None, None] + s[:, :, None, None]
    return F.silu(h) if silu else h


def test_kernel_builds_where_a_compiler_exists():
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine: the eager path is used")
    assert cpu_kernels.library() is not None


CASES = [
    # batch, channels, side, groups
    (4, 64, 8, 32),
    (2, 16, 5, 4),  # odd side
    (3, 16, 1, 8),  # one pixel per channel
    (1, 256, 4, 32),  # batch of one
    (5, 32, 7, 1),  # one group (ConvNeXt's norm)
]
MODES = ["affine", "affine-identity", "scale-shift", "pre", "shift-identity", "no-affine"]


@pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler")
@pytest.mark.parametrize("batch,channels,side,groups", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_fused_matches_float64_reference(batch, channels, side, groups, mode):
    torch.manual_seed(batch * 1000 + channels + side)
    norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=mode != "no-affine")
    if norm.weight is not None:
        nn.init.normal_(norm.weight, 1.0, 0.5)
        nn.init.normal_(norm.bias, 0.0, 0.5)
    x = (torch.randn(batch, channels, side, side) * 2 + 0.5).contiguous(memory_format=CL).requires_grad_()
    extra = {}
    if mode == "scale-shift":
        extra = {"scale": torch.randn(batch, channels) * 0.3, "shift": torch.randn(batch, channels)}
    elif mode == "pre":
        extra = {"pre": torch.randn(batch, channels)}
    elif mode == "shift-identity":
        extra = {"shift": torch.randn(batch, channels)}
    for v in extra.values():
        v.requires_grad_()
    silu = mode not in ("affine-identity", "shift-identity")
    inputs = [x, *extra.values(), *norm.parameters()]

    assert cpu_kernels._fusable(x)
    y = group_norm_act(x, norm, silu=silu, **extra)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y)

    ref = reference(x, norm, silu=silu, **extra)
    ref_grads = torch.autograd.grad(ref, inputs, grad_y.double())
    cpu_kernels.set_enabled(False)  # PyTorch's own float32 ops: the accuracy to match
    eager_grads = torch.autograd.grad(group_norm_act(x, norm, silu=silu, **extra), inputs, grad_y)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6)
    for got, eager, want in zip(grads, eager_grads, ref_grads, strict=True):
        scale = want.abs().max().clamp_min(1.0)
        error, eager_error = ((g.double() - want).abs().max() / scale for g in (got, eager))
        assert error < max(2e-5, 4 * eager_error)


@pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler")
def test_large_mean_keeps_variance_accurate():
    """Shifted moments: a mean 1000x the spread must not cancel the variance away."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, 32, eps=1e-6)
    x = (torch.randn(2, 32, 16, 16) + 1000.0).contiguous(memory_format=CL).requires_grad_()
    y = group_norm_act(x, norm)
    ref = reference(x, norm)
    assert (y.double() - ref).abs().max() < 1e-3
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert (g.double() - g_ref).abs().max() / g_ref.abs().max() < 1e-3


@pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler")
def test_result_does_not_depend_on_thread_count():
    torch.manual_seed(0)
    norm = nn.GroupNorm(32, 64)
    x = torch.randn(6, 64, 8, 8).contiguous(memory_format=CL).requires_grad_()
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = group_norm_act(x, norm, pre=torch.ones(6, 64))
            results.append((y, *torch.autograd.grad(y.square().sum(), [x, norm.weight])))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 16, 4, 4),  # NCHW
        lambda: torch.randn(2, 12, 4, 4).contiguous(memory_format=CL),  # 12 channels: not 8k
        lambda: torch.randn(2, 16, 4, 4, dtype=torch.float64).contiguous(memory_format=CL),
    ],
    ids=["nchw", "channels-not-multiple-of-8", "float64"],
)
def test_other_inputs_take_the_eager_path_with_the_same_result(make):
    x = make()
    norm = nn.GroupNorm(4, x.shape[1]).to(x.dtype)
    scale, shift = torch.randn(2, x.shape[1], dtype=x.dtype), torch.randn(2, x.shape[1], dtype=x.dtype)
    assert not cpu_kernels._fusable(x)
    y = group_norm_act(x, norm, scale=scale, shift=shift)
    torch.testing.assert_close(y.double(), reference(x, norm, scale=scale, shift=shift), rtol=1e-5, atol=1e-6)


def test_switched_off_means_eager():
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    cpu_kernels.set_enabled(False)
    assert not cpu_kernels._fusable(x)


@pytest.fixture
def fresh_library():
    """Forget the loaded kernel before and after the test, so that it looks up its build
    (with the test's environment) again."""
    cpu_kernels.library.cache_clear()
    yield
    cpu_kernels.library.cache_clear()


def _check_eager_result():
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    norm = nn.GroupNorm(4, 16)
    assert not cpu_kernels._fusable(x)
    torch.testing.assert_close(group_norm_act(x, norm).double(), reference(x, norm), rtol=1e-5, atol=1e-6)


def test_no_compiler_falls_back(tmp_path, monkeypatch, fresh_library):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DIFFORGE_CACHE", str(tmp_path / "cache"))
    assert cpu_kernels.library() is None
    _check_eager_result()


def test_failing_compiler_falls_back(tmp_path, monkeypatch, fresh_library):
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'fake-cc 1.0'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("DIFFORGE_CACHE", str(tmp_path / "cache"))
    assert cpu_kernels.library() is None
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no half-written files left


def test_unwritable_cache_falls_back(tmp_path, monkeypatch, fresh_library):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache directory cannot be created under a file")
    monkeypatch.setenv("DIFFORGE_CACHE", str(blocker / "cache"))
    assert cpu_kernels.library() is None
    _check_eager_result()


@pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler")
def test_damaged_cached_library_is_rebuilt(tmp_path):
    """A truncated or garbage .so in the cache is rebuilt by the next process that needs it.
    (Fresh processes: a library already loaded stays mapped, whatever happens to the file.)"""
    load = "from difforge.nn import cpu_kernels; print(cpu_kernels.library() is not None)"
    env = {**os.environ, "DIFFORGE_CACHE": str(tmp_path)}
    run = functools.partial(
        subprocess.run, [sys.executable, "-c", load], env=env, capture_output=True, text=True
    )
    assert run().stdout.strip() == "True"
    (built,) = (tmp_path / "kernels").glob("*.so")
    built.unlink()
    built.write_bytes(b"not a shared library")
    result = run()
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
    assert built.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler")
@pytest.mark.parametrize("scale_shift", [True, False])
def test_unet_with_kernel_matches_eager(scale_shift):
    """A whole network (res, convnext, attention) trains to the same gradients either way."""
    torch.manual_seed(0)
    cfg = UNetConfig.preset(
        "tiny",
        scale_shift=scale_shift,
        num_classes=3,
        attention_resolutions=(),
        blocks=("res,chn_attn", "convnext,attn", "res,cls_attn"),
    )
    model = UNet(cfg)
    x, t, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 500, 999]), torch.tensor([0, 2, 3])
    results = []
    for enabled in (True, False):
        cpu_kernels.set_enabled(enabled)
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_k, grads_k), (out_e, grads_e) = results
    torch.testing.assert_close(out_k, out_e, rtol=1e-4, atol=1e-5)
    for gk, ge in zip(grads_k, grads_e, strict=True):
        torch.testing.assert_close(gk, ge, rtol=1e-3, atol=1e-5)
