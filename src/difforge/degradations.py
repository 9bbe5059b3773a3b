"""The degradations of cold diffusion (Bansal et al. 2022, "Cold Diffusion: Inverting
Arbitrary Image Transforms Without Noise", arXiv 2208.09392): deterministic image transforms
D(x0, s) of growing strength, level s = 0 .. T, with D(x0, 0) = x0.

Every degradation is batched and device-side: ``degrade(x0, level)`` takes (B, C, H, W)
images in [-1, 1] and a (B,) int64 tensor of levels (one per image, mixed freely within a
batch) and applies each image its own level with one tensor expression: there is no Python
loop over images or over levels. Per-level tables (transfer functions, masks, averaging
operators) are built once per image size, in float64, and cast to the input's dtype.

- ``blur``: s successive Gaussian blurs (the paper's kernels: k x k, std sigma_i of a
  routine). A convolution is a product in the Fourier domain, so the s-fold blur is one FFT,
  one product with the table H_s = prod_{i<=s} G_i and one inverse FFT: exact for circular
  padding, and for reflect padding on the image's mirror extension of period 2(N - 1) (where
  torch's ``reflect`` padding of each step agrees with it). ``discrete``: the last level is
  the per-channel mean image (the paper's variant that makes generation possible).
- ``mask``: Gaussian masking from the centre out ("defading"): M_s = prod_{i<=s} m_i with
  m_i(p) = 1 - exp(-|p - c|^2 / (2 sigma_i^2)), sigma_i = mask_std (i - 1 + mask_start);
  D = M_s x0 + (1 - M_s) target.
- ``pixelate``: area-downsample by a factor k, then nearest-upsample back (the paper's
  super-resolution operator), k growing along a chain of divisors of N (1, 2, 4, ... 32), the
  levels between two factors blending the two; as averaging matrices P_k x P_k^T, so mixed
  levels need no loop.
- ``fade``: D = (1 - s/T) x0 + (s/T) target.
- ``decolorize``: D = (1 - s/T) x0 + (s/T) grey(x0), grey = ITU-R BT.601 luma.
- ``noise``: the Gaussian special case D = sqrt(abar_s) x0 + sqrt(1 - abar_s) z (needs z).

A fill ``target`` is ``mean`` (each image's per-channel mean: then the fully degraded images
are constant colours, and generation samples that colour), ``black`` (-1), ``white`` (1),
``grey`` (0, the paper's inpainting fill) or a colour ``#rrggbb``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from difforge.errors import DifforgeError
from difforge.schedule import NoiseSchedule

DEGRADATIONS: tuple[str, ...] = ("blur", "mask", "pixelate", "fade", "decolorize", "noise")
BLUR_ROUTINES: tuple[str, ...] = ("incremental", "constant", "exponential", "celeba")
BLUR_PADDINGS: tuple[str, ...] = ("circular", "reflect")
NAMED_TARGETS: dict[str, float] = {"black": -1.0, "white": 1.0, "grey": 0.0}
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights of R, G, B (what kornia's and PIL's greyscale use)."""


def blur_stds(routine: str, blur_std: float, num_timesteps: int) -> np.ndarray:
    """(T,) the std sigma_i of the Gaussian kernel of step i = 1 .. T, in pixels.

    The routines of the paper's code: ``incremental`` sigma_i = blur_std * i (MNIST, CIFAR-10:
    blur_std 0.1, 3 x 3 kernels, T = 50); ``constant`` sigma_i = blur_std; ``exponential``
    sigma_i = exp(blur_std * (i - 1)); ``celeba`` sigma_i = 0.35 + 0.01 (i - 1) (its 128 x 128
    runs, with 11 x 11 kernels and reflect padding; blur_std is not used).
    """
    i = np.arange(1, num_timesteps + 1, dtype=np.float64)
    if routine == "incremental":
        return blur_std * i
    if routine == "constant":
        return np.full_like(i, blur_std)
    if routine == "exponential":
        return np.exp(blur_std * (i - 1))
    if routine == "celeba":
        return 0.35 + 0.01 * (i - 1)
    raise DifforgeError(f"--blur-routine must be one of {', '.join(BLUR_ROUTINES)}; got {routine!r}")


def gaussian_kernel_1d(size: int, std: float) -> np.ndarray:
    """(size,) float64 g[j] proportional to exp(-j^2 / (2 std^2)), j = -(size//2) .. size//2,
    summing to 1 (the kernel of torchgeometry/kornia's ``get_gaussian_kernel``; the 2-D
    kernel is its outer product with itself)."""
    offsets = np.arange(size, dtype=np.float64) - size // 2
    weights = np.exp(-(offsets**2) / (2.0 * std**2))
    return weights / weights.sum()


def kernel_transfer(kernel: np.ndarray, period: int) -> np.ndarray:
    """(period,) the DFT of a symmetric, centred 1-D kernel wrapped on a circle of ``period``
    samples: G(w) = sum_j g[j] cos(2 pi w j / period), real because g is symmetric."""
    radius = len(kernel) // 2
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    frequencies = np.arange(period, dtype=np.float64)
    return np.cos(2.0 * math.pi * np.outer(frequencies, offsets) / period) @ kernel


def parse_target(target: str) -> float | tuple[float, float, float] | None:
    """A fill target: None for ``mean``, a value in [-1, 1] for a named grey level, an RGB
    triple in [-1, 1] for ``#rrggbb``."""
    if target == "mean":
        return None
    if target in NAMED_TARGETS:
        return NAMED_TARGETS[target]
    if isinstance(target, str) and len(target) == 7 and target.startswith("#"):
        try:
            rgb = tuple(int(target[i : i + 2], 16) for i in (1, 3, 5))
        except ValueError:
            rgb = ()
        if len(rgb) == 3:
            return tuple(value / 127.5 - 1.0 for value in rgb)  # type: ignore[return-value]
    raise DifforgeError(
        f"--target must be mean, {', '.join(NAMED_TARGETS)} or a colour #rrggbb; got {target!r}"
    )


def _levels(level: torch.Tensor, x: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """``level`` checked: (B,) integers in 0..T, on x's device."""
    if level.ndim != 1 or level.shape[0] != x.shape[0]:
        raise DifforgeError(f"level must be a ({x.shape[0]},) tensor, got shape {tuple(level.shape)}")
    if level.dtype.is_floating_point or bool(((level < 0) | (level > num_timesteps)).any()):
        raise DifforgeError(f"levels must be integers in 0..{num_timesteps}")
    return level.to(device=x.device, dtype=torch.long)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1)."""
    return values.reshape(-1, 1, 1, 1)


class Degradation(ABC):
    """D(x0, s) for s = 0 .. T (see the module docstring).

    Attributes:
        name: the ``--degradation`` name.
        num_timesteps: T.
        needs_noise: D also takes unit Gaussian noise (only ``noise``).
        endpoint: what D(x, T) is for every x: ``"mean"`` (the per-channel mean image),
            ``"normal"`` (approximately N(0, I)) or None (it still depends on x beyond its
            mean, so a run cannot generate from nothing, only restore).
    """

    name: ClassVar[str] = ""
    needs_noise: ClassVar[bool] = False

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps
        self._tables: dict[tuple[object, ...], torch.Tensor] = {}

    @property
    def endpoint(self) -> str | None:
        return None

    def degrade(
        self, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) x0, (B,) levels in 0..T -> (B, C, H, W) D(x0, level); level 0 is x0 itself."""
        level = _levels(level, x0, self.num_timesteps)
        if self.needs_noise and noise is None:
            raise DifforgeError(f"the {self.name} degradation needs noise")
        out = self._apply(x0, level, noise)
        return torch.where(_per_image(level == 0), x0, out)

    def estimate_noise(
        self, x_t: torch.Tensor, x0_hat: torch.Tensor, level: torch.Tensor
    ) -> torch.Tensor | None:
        """The noise z with D(x0_hat, level, z) = x_t (only for ``needs_noise``; else None)."""
        return None

    @abstractmethod
    def _apply(self, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """D(x0, level) of each image (level 0 is replaced by x0 afterwards)."""

    def _table(
        self, key: tuple[object, ...], build: Callable[[], np.ndarray], like: torch.Tensor
    ) -> torch.Tensor:
        """A per-level table built once in float64, cached per device and dtype."""
        full = (*key, like.device, like.dtype)
        if full not in self._tables:
            self._tables[full] = torch.from_numpy(build()).to(device=like.device, dtype=like.dtype)
        return self._tables[full]


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, 1) per-image, per-channel means."""
    return x.mean(dim=(2, 3), keepdim=True)


class FillTarget:
    """What ``mask`` and ``fade`` blend towards: each image's mean colour or a fixed one."""

    def __init__(self, target: str) -> None:
        self.spec = target
        self.value = parse_target(target)

    def like(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, 1) or broadcastable fill of x0's images."""
        if self.value is None:
            return channel_means(x0)
        if isinstance(self.value, tuple):
            if x0.shape[1] != 3:
                raise DifforgeError(
                    f"--target {self.spec}: a colour needs RGB images, these have {x0.shape[1]} channel(s)"
                )
            return torch.tensor(self.value, dtype=x0.dtype, device=x0.device).reshape(1, 3, 1, 1)
        return torch.full((1, 1, 1, 1), self.value, dtype=x0.dtype, device=x0.device)


class Blur(Degradation):
    """s successive k x k Gaussian blurs, one FFT per batch (see the module docstring)."""

    name = "blur"

    def __init__(
        self,
        num_timesteps: int,
        *,
        routine: str,
        blur_std: float,
        blur_size: int,
        padding: str,
        discrete: bool,
    ) -> None:
        super().__init__(num_timesteps)
        if padding not in BLUR_PADDINGS:
            raise DifforgeError(f"--blur-padding must be one of {', '.join(BLUR_PADDINGS)}; got {padding!r}")
        if not (isinstance(blur_size, int) and blur_size >= 1 and blur_size % 2 == 1):
            raise DifforgeError(f"--blur-size must be an odd kernel size >= 1, got {blur_size!r}")
        self.stds = blur_stds(routine, blur_std, num_timesteps)
        if not np.all(self.stds > 0):
            raise DifforgeError("--blur-std must be > 0")
        self.kernel_size = blur_size
        self.padding = padding
        self.discrete = discrete

    @property
    def endpoint(self) -> str | None:
        return "mean" if self.discrete else None

    def period(self, n: int) -> int:
        """The FFT length of an axis of n pixels: n (circular) or 2(n - 1) (mirror extension)."""
        return n if self.padding == "circular" or n == 1 else 2 * (n - 1)

    def transfer(self, period: int) -> np.ndarray:
        """(T + 1, period) H_s(w) = prod_{i<=s} G_i(w), H_0 = 1: the 1-D transfer function of s blurs."""
        steps = np.stack(
            [kernel_transfer(gaussian_kernel_1d(self.kernel_size, std), period) for std in self.stds]
        )
        return np.concatenate([np.ones((1, period)), np.cumprod(steps, axis=0)])

    def _extend(self, x: torch.Tensor) -> torch.Tensor:
        """The mirror extension [x_0 .. x_{n-1}, x_{n-2} .. x_1] on both axes (reflect padding)."""
        if self.padding == "circular":
            return x
        if x.shape[-1] > 1:
            x = torch.cat([x, x.flip(-1)[..., 1:-1]], dim=-1)
        if x.shape[-2] > 1:
            x = torch.cat([x, x.flip(-2)[..., 1:-1, :]], dim=-2)
        return x

    def _apply(self, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        height, width = x0.shape[-2:]
        rows, cols = self.period(height), self.period(width)
        work = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
        h_rows = self._table(("rows", rows), lambda: self.transfer(rows), work)[level]  # (B, rows)
        h_cols = self._table(("cols", cols), lambda: self.transfer(cols), work)[level][:, : cols // 2 + 1]
        spectrum = torch.fft.rfft2(self._extend(work))
        spectrum = spectrum * (h_rows[:, None, :, None] * h_cols[:, None, None, :])
        blurred = torch.fft.irfft2(spectrum, s=(rows, cols))[..., :height, :width].to(x0.dtype)
        if self.discrete:
            last = _per_image(level == self.num_timesteps)
            blurred = torch.where(last, channel_means(x0).expand_as(x0), blurred)
        return blurred


class Mask(Degradation):
    """Gaussian masking from the centre out towards a fill target (the paper's defading)."""

    name = "mask"

    def __init__(
        self, num_timesteps: int, *, mask_std: float, mask_start: float, target: str, discrete: bool
    ) -> None:
        super().__init__(num_timesteps)
        if not mask_std > 0 or not mask_start > 0:
            raise DifforgeError("--mask-std and --mask-start must be > 0")
        self.stds = mask_std * (np.arange(num_timesteps, dtype=np.float64) + mask_start)
        self.target = FillTarget(target)
        self.discrete = discrete

    @property
    def endpoint(self) -> str | None:
        return "mean" if self.discrete and self.target.value is None else None

    def keep(self, height: int, width: int) -> np.ndarray:
        """(T + 1, H, W) M_s = prod_{i<=s} m_i, the share of x0 each pixel keeps (M_0 = 1;
        with ``discrete`` M_T = 0)."""
        rows = np.arange(height, dtype=np.float64) - (height - 1) / 2
        cols = np.arange(width, dtype=np.float64) - (width - 1) / 2
        distance2 = rows[:, None] ** 2 + cols[None, :] ** 2
        steps = 1.0 - np.exp(-distance2[None] / (2.0 * self.stds[:, None, None] ** 2))
        keep = np.concatenate([np.ones((1, height, width)), np.cumprod(steps, axis=0)])
        if self.discrete:
            keep[-1] = 0.0
        return keep

    def _apply(self, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        height, width = x0.shape[-2:]
        keep = self._table(("keep", height, width), lambda: self.keep(height, width), x0)[level][:, None]
        return keep * x0 + (1 - keep) * self.target.like(x0)


def factor_chain(n: int, pixelate_min: int) -> list[int]:
    """Block sizes 1 = k_0 < k_1 < ... of an n-pixel axis, each dividing the next and n
    (n's prime factors multiplied in, smallest first), while n / k >= ``pixelate_min``:
    32 -> [1, 2, 4, 8, 16, 32]; 28 -> [1, 2, 4, 28]."""
    chain, rest, prime = [1], n, 2
    while rest > 1:
        while rest % prime:
            prime += 1
        if n // (chain[-1] * prime) < pixelate_min:
            break
        chain.append(chain[-1] * prime)
        rest //= prime
    return chain


def block_average(n: int, k: int) -> np.ndarray:
    """(n, n) the averaging over blocks of k pixels (k divides n): area-downsampling by k,
    then nearest-upsampling back, on one axis."""
    block = np.arange(n) // k
    return (block[:, None] == block[None, :]) / float(k)


class Pixelate(Degradation):
    """Block-average over growing blocks (area-downsample, nearest-upsample back).

    The block sizes k_0 = 1 < k_1 < ... < k_J form `factor_chain` (so each pixelation is an
    orthogonal projection of the one before); level s sits at p = s J / T along the chain and
    blends the two pixelations around it: D = (1 - w) P_{k_j} x + w P_{k_{j+1}} x, j = floor(p),
    w = p - j. The distance to x0 then grows with s, and level T is the block size k_J
    (the per-channel mean when ``pixelate_min`` is 1)."""

    name = "pixelate"

    def __init__(self, num_timesteps: int, *, pixelate_min: int) -> None:
        super().__init__(num_timesteps)
        if not (isinstance(pixelate_min, int) and pixelate_min >= 1):
            raise DifforgeError(f"--pixelate-min must be an integer >= 1, got {pixelate_min!r}")
        self.pixelate_min = pixelate_min

    @property
    def endpoint(self) -> str | None:
        return "mean" if self.pixelate_min == 1 else None

    def chain(self, n: int) -> list[int]:
        chain = factor_chain(n, self.pixelate_min)
        if len(chain) < 2:
            raise DifforgeError(
                f"pixelate: --pixelate-min {self.pixelate_min} leaves nothing to pixelate at {n} px"
            )
        return chain

    def positions(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(T + 1,) j, the chain step below each level's position p = s J / T, and (T + 1,)
        w = p - j, the share of the coarser pixelation k_{j+1}."""
        steps = len(self.chain(n)) - 1
        position = np.arange(self.num_timesteps + 1) * steps / self.num_timesteps
        below = np.minimum(np.floor(position).astype(np.int64), steps - 1)
        return below, position - below

    def operators(self, n: int) -> np.ndarray:
        """(2, T + 1, n, n): the pixelation below and above each level's chain position."""
        below, _ = self.positions(n)
        matrices = np.stack([block_average(n, k) for k in self.chain(n)])
        return np.stack([matrices[below], matrices[below + 1]])

    def _apply(self, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        height, width = x0.shape[-2:]
        if height != width and len(self.chain(height)) != len(self.chain(width)):
            raise DifforgeError(f"pixelate needs the same block chain on both axes ({height} x {width} px)")
        rows = self._table(("rows", height), lambda: self.operators(height), x0)[:, level]
        cols = self._table(("cols", width), lambda: self.operators(width), x0)[:, level]
        share = _per_image(self._table(("w", height), lambda: self.positions(height)[1], x0)[level])
        fine = torch.einsum("bij,bcjk,blk->bcil", rows[0], x0, cols[0])
        coarse = torch.einsum("bij,bcjk,blk->bcil", rows[1], x0, cols[1])
        return (1 - share) * fine + share * coarse


class Fade(Degradation):
    """D = (1 - s/T) x0 + (s/T) target."""

    name = "fade"

    def __init__(self, num_timesteps: int, *, target: str) -> None:
        super().__init__(num_timesteps)
        self.target = FillTarget(target)

    @property
    def endpoint(self) -> str | None:
        return "mean" if self.target.value is None else None

    def _apply(self, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        share = _per_image(level.to(x0.dtype) / self.num_timesteps)
        return (1 - share) * x0 + share * self.target.like(x0)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 3, H, W) its BT.601 grey, repeated on the three channels."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True).expand_as(x)


class Decolorize(Degradation):
    """D = (1 - s/T) x0 + (s/T) grey(x0)."""

    name = "decolorize"

    def _apply(self, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if x0.shape[1] != 3:
            raise DifforgeError(
                f"decolorize needs RGB images (--channels 3); these have {x0.shape[1]} channel(s)"
            )
        share = _per_image(level.to(x0.dtype) / self.num_timesteps)
        return (1 - share) * x0 + share * luma(x0)


class Noise(Degradation):
    """D = sqrt(abar_s) x0 + sqrt(1 - abar_s) z with abar_0 = 1 and abar_s the schedule's
    alpha_bar at index s - 1 (so level T is the Gaussian chain's last step)."""

    name = "noise"
    needs_noise = True

    def __init__(self, num_timesteps: int, *, schedule: str) -> None:
        super().__init__(num_timesteps)
        alpha_bar = NoiseSchedule.named(schedule, num_timesteps).alphas_cumprod
        self.alpha_bar = np.concatenate([[1.0], alpha_bar])

    @property
    def endpoint(self) -> str | None:
        return "normal"

    def _coefficients(self, level: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self._table(("alpha_bar",), lambda: self.alpha_bar, like)[level]
        return _per_image(alpha_bar.sqrt()), _per_image((1 - alpha_bar).sqrt())

    def _apply(self, x0: torch.Tensor, level: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        signal, spread = self._coefficients(level, x0)
        return signal * x0 + spread * noise  # type: ignore[operator]

    def estimate_noise(
        self, x_t: torch.Tensor, x0_hat: torch.Tensor, level: torch.Tensor
    ) -> torch.Tensor | None:
        """z = (x_t - sqrt(abar_s) x0_hat) / sqrt(1 - abar_s); 0 at level 0 (where D ignores z)."""
        signal, spread = self._coefficients(_levels(level, x_t, self.num_timesteps), x_t)
        return torch.where(
            spread > 0, (x_t - signal * x0_hat) / spread.clamp_min(1e-12), torch.zeros_like(x_t)
        )


@dataclass(frozen=True)
class DegradationSettings:
    """The settings every degradation is built from (the cold process's config fields)."""

    degradation: str
    num_timesteps: int
    blur_routine: str
    blur_std: float
    blur_size: int
    blur_padding: str
    discrete: bool
    mask_std: float
    mask_start: float
    target: str
    pixelate_min: int
    noise_schedule: str


def build_degradation(settings: DegradationSettings) -> Degradation:
    """The `Degradation` named by ``settings.degradation``; a one-line DifforgeError for a bad setting."""
    name, steps = settings.degradation, settings.num_timesteps
    if name == "blur":
        return Blur(
            steps,
            routine=settings.blur_routine,
            blur_std=settings.blur_std,
            blur_size=settings.blur_size,
            padding=settings.blur_padding,
            discrete=settings.discrete,
        )
    if name == "mask":
        return Mask(
            steps,
            mask_std=settings.mask_std,
            mask_start=settings.mask_start,
            target=settings.target,
            discrete=settings.discrete,
        )
    if name == "pixelate":
        return Pixelate(steps, pixelate_min=settings.pixelate_min)
    if name == "fade":
        return Fade(steps, target=settings.target)
    if name == "decolorize":
        return Decolorize(steps)
    if name == "noise":
        return Noise(steps, schedule=settings.noise_schedule)
    raise DifforgeError(f"--degradation must be one of {', '.join(DEGRADATIONS)}; got {name!r}")
