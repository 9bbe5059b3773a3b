"""Fused GroupNorm + affine + SiLU for channels_last float32 tensors on the CPU.

`group_norm_act` is the one entry point the U-Net's blocks use. It computes

    y = act(GN(x + pre) * a + s),   a = weight * (1 + scale),   s = bias * (1 + scale) + shift

(GroupNorm without affine inside, ``pre``/``scale``/``shift`` per sample and channel, (B, C),
all optional; ``act`` SiLU or identity). That one form covers the plain ``silu(norm(x))``,
ADM's AdaGN scale-shift, DDPM's "add the timestep bias, then normalise", and the attention
blocks' plain norm.

Why: PyTorch's channels_last GroupNorm backward walks each group's D = C / G channels on
their own (D = 2 for 64 channels in 32 groups), 3-4x slower than its NCHW kernel, and the
norm, the affine and the SiLU each make a pass over memory. The C kernel in
``csrc/group_norm_act.c`` does the forward in two sweeps and the backward in two, vectorised
along the channels (see docs/benchmarks.md for the effect on a training step).

The kernel is compiled on first use with the system C compiler (``$CC`` or ``cc``, about a
second) into ``$DIFFORGE_CACHE/kernels/``, keyed by the source, the compiler and this CPU.
Where it cannot be used, everything runs the same maths in eager PyTorch: other devices or
dtypes, NCHW input, channel counts not a multiple of the vector width (16 with AVX-512,
else 8), under ``torch.compile``, no
compiler, or ``DIFFORGE_CPU_KERNELS=0``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from difforge.packages import default_cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "group_norm_act.c"
ENV_SWITCH = "DIFFORGE_CPU_KERNELS"

_enabled = os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(enabled: bool) -> bool:
    """Switch the compiled kernel on or off for this process; returns the previous setting.
    (Off means the eager PyTorch path, which computes the same function.)"""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def _cpu_identity() -> str:
    """What the compiled code depends on: the machine and its instruction-set flags
    (``-march=native`` code from one CPU may not run on another sharing the cache)."""
    parts = [platform.system(), platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    parts.append(line.strip())
                if line.strip() == "":  # first processor only
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC") or "cc"
    command = shlex.split(cc)
    if not command or shutil.which(command[0]) is None:
        return None
    return command


def _build(target: Path, compiler: list[str]) -> bool:
    """Compile SOURCE into ``target`` atomically (temp file + rename); False on failure
    (including a cache directory that cannot be written)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        logger.debug("cannot write the kernel cache %s: %s", target.parent, exc)
        return False
    try:
        # Preferred: native instructions and OpenMP (which binds to the libgomp PyTorch loaded);
        # then without each, for compilers that lack them (Apple clang has no -fopenmp).
        for extra in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):
            flags = ["-O3", *extra, "-fPIC", "-shared", "-pthread"]
            command = [*compiler, *flags, str(SOURCE), "-o", tmp, "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
            if result.returncode == 0:
                os.replace(tmp, target)
                return True
            logger.debug("kernel build failed: %s\n%s", shlex.join(command), result.stderr[-2000:])
        return False
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("kernel build failed: %s", exc)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, long, f32, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    lib.difforge_gn_act_forward.argtypes = [ptr] * 7 + [long] * 4 + [f32, i32, i32]
    lib.difforge_gn_act_forward.restype = i32
    lib.difforge_gn_act_backward.argtypes = [ptr] * 11 + [long] * 4 + [i32, i32]
    lib.difforge_gn_act_backward.restype = i32
    lib.difforge_gn_act_width.argtypes = []
    lib.difforge_gn_act_width.restype = i32
    lib.vector_width = int(lib.difforge_gn_act_width())
    return lib


def vector_width() -> int:
    """Channels the kernel processes at once (16 with AVX-512, else 8); the channel count must
    be a multiple of it, other counts take the eager path. 0 when there is no kernel."""
    lib = library()
    return 0 if lib is None else lib.vector_width


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call, then cached on disk), or None where it cannot
    be built or loaded; the reason is logged at DEBUG level on the ``difforge`` logger."""
    compiler = _compiler()
    if compiler is None or not SOURCE.is_file():
        logger.debug("no C compiler (or kernel source): the eager GroupNorm path is used")
        return None
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (SOURCE.read_text(), shlex.join(compiler), version, _cpu_identity()))
    ).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"group_norm_act-{key}.so"
    for attempt in range(2):
        if not target.is_file() and not _build(target, compiler):
            return None
        try:
            return _declare(ctypes.CDLL(str(target)))
        except OSError as exc:  # a damaged cache file: rebuild it once
            logger.debug("cannot load %s (%s)", target, exc)
            if attempt == 0:
                target.unlink(missing_ok=True)
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _FusedGroupNormAct(torch.autograd.Function):
    """``act(GN(x + pre) * a + s)`` through the C kernel. x: (B, C, H, W) channels_last
    float32; pre (or None), a, s: (B, C) contiguous float32."""

    @staticmethod
    def forward(
        ctx, x: Tensor, pre: Tensor | None, a: Tensor, s: Tensor, groups: int, eps: float, silu: bool
    ) -> Tensor:
        lib = library()
        batch, channels, height, width = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean, rstd = x.new_empty(batch, groups), x.new_empty(batch, groups)
        status = lib.difforge_gn_act_forward(
            _ptr(x), _ptr(pre), _ptr(a), _ptr(s), _ptr(y), _ptr(mean), _ptr(rstd),
            batch, height * width, channels, groups, eps, int(silu), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"fused GroupNorm kernel failed (status {status})")
        ctx.save_for_backward(x, pre, a, s, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, pre, a, s, mean, rstd = ctx.saved_tensors
        batch, channels, height, width = x.shape
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        grad_a, grad_s = a.new_empty(batch, channels), a.new_empty(batch, channels)
        grad_pre = None if pre is None else a.new_empty(batch, channels)
        status = library().difforge_gn_act_backward(
            _ptr(grad_y), _ptr(x), _ptr(pre), _ptr(a), _ptr(s), _ptr(mean), _ptr(rstd),
            _ptr(grad_x), _ptr(grad_pre), _ptr(grad_a), _ptr(grad_s),
            batch, height * width, channels, ctx.groups, int(ctx.silu), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"fused GroupNorm kernel failed (status {status})")
        return grad_x, grad_pre, grad_a, grad_s, None, None, None


def _fusable(x: Tensor, *vectors: Tensor | None) -> bool:
    if not (_enabled and x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 4):
        return False
    if x.numel() == 0 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if any(v is not None and (v.device.type != "cpu" or v.dtype != torch.float32) for v in vectors):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    width = vector_width()
    return width > 0 and x.shape[1] % width == 0


def group_norm_act(
    x: Tensor,
    norm: nn.GroupNorm,
    *,
    pre: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = True,
) -> Tensor:
    """``act(norm(x + pre) * (1 + scale) + shift)`` with ``norm``'s groups, eps and affine.

    Args:
        x: (B, C, H, W) features.
        norm: the `nn.GroupNorm` whose parameters are used (affine or not).
        pre: (B, C) added to x before normalising (DDPM's timestep bias), or None.
        scale, shift: (B, C) AdaGN modulation after the affine norm, or None.
        silu: apply SiLU (else identity).

    Returns:
        (B, C, H, W), channels_last when x is. SiLU runs in place when no graph is recorded.
    """
    if _fusable(x, pre, scale, shift, norm.weight, norm.bias):
        a, s = (t.contiguous() for t in _modulation(norm, x, scale, shift))
        pre = None if pre is None else pre.contiguous()
        return _FusedGroupNormAct.apply(x, pre, a, s, norm.num_groups, norm.eps, silu)

    if pre is not None:
        x = x + pre[:, :, None, None].to(x.dtype)
    if scale is None and shift is None:
        h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    else:
        h = F.group_norm(x, norm.num_groups, None, None, norm.eps)
        a, s = _modulation(norm, h, scale, shift)
        h = torch.addcmul(s[:, :, None, None], h, a[:, :, None, None])
    return F.silu(h, inplace=not torch.is_grad_enabled()) if silu else h


def _modulation(
    norm: nn.GroupNorm, like: Tensor, scale: Tensor | None, shift: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(B, C) ``a``, ``s`` with ``GN_affine(v) * (1 + scale) + shift = GN(v) * a + s``:
    a = weight (1 + scale), s = bias (1 + scale) + shift, in ``like``'s dtype."""
    batch, channels = like.shape[:2]
    a = like.new_ones(channels) if norm.weight is None else norm.weight.to(like.dtype)
    s = like.new_zeros(channels) if norm.bias is None else norm.bias.to(like.dtype)
    a, s = a.expand(batch, channels), s.expand(batch, channels)
    if scale is not None:
        gain = 1.0 + scale.to(like.dtype)
        a, s = a * gain, s * gain
    if shift is not None:
        s = s + shift.to(like.dtype)
    return a, s
