"""Building blocks of the U-Net: embeddings, residual/ConvNeXt blocks, attention, resampling.

Shapes use B = batch, C = channels, H x W = feature map, E = embedding width, N = H * W.
Every block takes ``(x, emb, cls_emb)`` and returns a tensor like ``x`` (``res`` and
``convnext`` may change C and resample H x W):

- ``x``: (B, C, H, W) features, contiguous or channels_last (both work; channels_last is
  faster with oneDNN and keeps attention's token view free of copies);
- ``emb``: (B, E) SiLU-activated timestep (+ class) embedding, shared by all blocks;
- ``cls_emb``: (B, E) raw class embedding, or ``None`` for unconditional networks.

Speed notes (measured on CPU, see docs/benchmarks.md): every GroupNorm goes through
`difforge.nn.cpu_kernels.group_norm_act`, which fuses the norm, its affine, the AdaGN
scale-shift or timestep bias and the SiLU (a compiled kernel for channels_last float32 on the
CPU, the same maths in eager PyTorch elsewhere); residual additions happen in place on
convolution outputs (which autograd does not save); nearest-upsample + 3x3 conv runs as the
mathematically identical stride-2 4x4 transposed convolution (2.25x fewer FLOPs).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difforge.nn.config import UNetConfig
from difforge.nn.cpu_kernels import group_norm_act


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal timestep features: (B,) -> (B, dim), ``[cos | sin]``.

    Frequencies ``exp(-ln(max_period) i / (half - freq_shift))``, i = 0 .. half - 1, half =
    dim // 2 (``freq_shift`` 1: the highest frequency is exactly 1 / max_period, as in Ho et
    al.'s DDPM code)."""

    freqs: Tensor

    def __init__(self, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        self.freq_shift = freq_shift
        self.register_buffer("freqs", self._freqs(), persistent=False)

    def _freqs(self, device: torch.device | None = None) -> Tensor:
        half = self.dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=device) / (half - self.freq_shift)
        return torch.exp(-math.log(self.max_period) * steps)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute ``freqs`` on ``device`` (after building on the meta device)."""
        self.freqs = self._freqs(device)

    def forward(self, t: Tensor) -> Tensor:
        args = t.to(torch.float32)[:, None] * self.freqs[None, :]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class UpsampleConv3x3(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 convolution, computed as one transposed conv.

    ``conv3x3(upsample_nearest(x))`` equals ``conv_transpose2d(x, K, stride=2, padding=1)``
    where the 4x4 kernel K sums the 3x3 taps that land on the same low-resolution pixel. The
    parameters are those of the 3x3 conv (same count and checkpoint layout); K is derived from
    them at every call (a few thousand flops), so training updates the 3x3 weights as usual.

    (B, Cin, H, W) -> (B, Cout, 2H, 2W).
    """

    tap_map: Tensor

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.weight = conv.weight
        self.bias = conv.bias
        self.register_buffer("tap_map", self._taps(), persistent=False)

    @staticmethod
    def _taps(device: torch.device | None = None) -> Tensor:
        """(4, 3): which 3x3 taps (rows) fall on each of the 4 transposed-kernel taps."""
        rows = [[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]]
        return torch.tensor(rows, dtype=torch.float32, device=device)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute ``tap_map`` on ``device`` (after building on the meta device)."""
        self.tap_map = self._taps(device)

    def forward(self, x: Tensor) -> Tensor:
        m = self.tap_map.to(self.weight.dtype)
        kernel = torch.einsum("ai,bj,oxij->xoab", m, m, self.weight)
        return F.conv_transpose2d(x, kernel.to(x.dtype), self.bias, stride=2, padding=1)


class Downsample(nn.Module):
    """Strided 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2).

    ``padding`` 1 pads every side; 0 pads only the bottom and right by one (TensorFlow's
    ``SAME`` for a stride-2 3x3 kernel on an even size, as in Ho et al.'s models)."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor, emb: Tensor, cls_emb: Tensor | None) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling + 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = UpsampleConv3x3(channels, channels)

    def forward(self, x: Tensor, emb: Tensor, cls_emb: Tensor | None) -> Tensor:
        return self.conv(x)


class ResBlock(nn.Module):
    """Pre-activation residual block with timestep conditioning (DDPM / ADM).

    ``GN -> SiLU -> [resample] -> conv3x3 -> (+emb | AdaGN scale-shift) -> GN -> SiLU ->
    dropout -> conv3x3``, plus a skip (identity or 1x1 conv, resampled alike).
    ``down``/``up`` make it the BigGAN-style resampling block.

    (B, Cin, H, W), (B, E) -> (B, Cout, H', W') with H' = H/2, H or 2H.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cfg: UNetConfig,
        *,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.up, self.down = up, down
        self.scale_shift = cfg.scale_shift
        self.dropout = float(cfg.dropout)
        self.norm1 = nn.GroupNorm(cfg.norm_groups, in_channels, eps=cfg.norm_eps)
        self.conv1: nn.Module
        if up:
            self.conv1 = UpsampleConv3x3(in_channels, out_channels)
        else:
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(cfg.emb_dim, out_channels * (2 if cfg.scale_shift else 1))
        self.norm2 = nn.GroupNorm(cfg.norm_groups, out_channels, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if cfg.zero_init:
            _zero_(self.conv2)
        self.skip: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor, cls_emb: Tensor | None = None) -> Tensor:
        h = group_norm_act(x, self.norm1)
        if self.down:
            h = F.avg_pool2d(h, 2)
            x = F.avg_pool2d(x, 2)
        h = self.conv1(h)
        e = self.emb_proj(emb)  # (B, 2 Cout) scale | shift, or (B, Cout) bias
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = group_norm_act(h, self.norm2, scale=scale, shift=shift)
        else:
            h = group_norm_act(h, self.norm2, pre=e)
        if self.dropout > 0.0 and self.training:
            h = F.dropout(h, self.dropout, training=True)
        h = self.conv2(h)
        skip = self.skip(x)
        if self.up:
            skip = F.interpolate(skip, scale_factor=2.0, mode="nearest")
        return h.add_(skip)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022) with timestep conditioning.

    ``dwconv7x7 -> GN(1) [+ scale-shift or + emb] -> 1x1 (Cout * mult) -> GELU -> 1x1 (Cout)``
    plus a skip (identity or 1x1 conv).

    (B, Cin, H, W), (B, E) -> (B, Cout, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        hidden = out_channels * cfg.convnext_mult
        self.scale_shift = cfg.scale_shift
        self.dropout = float(cfg.dropout)
        self.dwconv = nn.Conv2d(in_channels, in_channels, 7, padding=3, groups=in_channels)
        self.norm = nn.GroupNorm(1, in_channels, eps=cfg.norm_eps)
        self.emb_proj = nn.Linear(cfg.emb_dim, in_channels * (2 if cfg.scale_shift else 1))
        self.pw1 = nn.Conv2d(in_channels, hidden, 1)
        self.pw2 = nn.Conv2d(hidden, out_channels, 1)
        if cfg.zero_init:
            _zero_(self.pw2)
        self.skip: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor, cls_emb: Tensor | None = None) -> Tensor:
        e = self.emb_proj(emb)  # (B, 2 Cin) scale | shift, or (B, Cin) bias
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = group_norm_act(self.dwconv(x), self.norm, scale=scale, shift=shift, silu=False)
        else:
            h = group_norm_act(self.dwconv(x), self.norm, shift=e, silu=False)
        h = F.gelu(self.pw1(h))
        if self.dropout > 0.0 and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return self.pw2(h).add_(self.skip(x))


def _to_tokens(h: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, N, C); a free view for channels_last input."""
    b, c, hh, ww = h.shape
    return h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)


def _from_tokens(tokens: Tensor, like: Tensor) -> Tensor:
    """(B, N, C) -> (B, C, H, W) shaped like ``like``, as a channels_last view."""
    b, c, hh, ww = like.shape
    return tokens.view(b, hh, ww, c).permute(0, 3, 1, 2)


def _split_heads(t: Tensor, parts: int, heads: int) -> tuple[Tensor, ...]:
    """(B, N, parts * C) -> ``parts`` views of shape (B, heads, N, C / heads)."""
    b, n, c = t.shape
    d = c // (parts * heads)
    return t.view(b, n, parts, heads, d).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(t: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, nh, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, nh * d)


def _autocast_off(device: torch.device) -> AbstractContextManager[object]:
    """Disable autocast on ``device`` (a no-op context for devices without autocast, e.g. meta)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H x W positions, with a residual connection.

    ``x + proj(SDPA(qkv(GN(x))))`` through `torch.nn.functional.scaled_dot_product_attention`
    (flash / memory-efficient kernels where available). (B, C, H, W) -> (B, C, H, W).
    `LinearAttention` shares everything but `attend`.

    With one head the projections are folded (exactly, see `single_head`), which halves their
    FLOPs; the parameters and checkpoints are the same either way.
    """

    foldable = True  # `single_head` applies (softmax attention); LinearAttention sets False

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.heads = cfg.heads_for(channels)
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        if cfg.zero_init:
            _zero_(self.proj)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, h, N, d) queries, keys, values -> (B, h, N, d)."""
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: Tensor, emb: Tensor, cls_emb: Tensor | None = None) -> Tensor:
        tokens = _to_tokens(group_norm_act(x, self.norm, silu=False))
        out = self.single_head(tokens) if self.foldable and self.heads == 1 else self.multi_head(tokens)
        return x + _from_tokens(out, x)

    def multi_head(self, h: Tensor) -> Tensor:
        """``proj(attend(q, k, v))`` with q, k, v = qkv(h) split into heads. (B, N, C) -> (B, N, C)."""
        q, k, v = _split_heads(self.qkv(h), 3, self.heads)  # (B, heads, N, d)
        return self.proj(_merge_heads(self.attend(q, k, v)))

    def single_head(self, h: Tensor) -> Tensor:
        """`multi_head` for one head, with the projections folded into two C x C ones.

        With q_i = Wq h_i + bq, k_j = Wk h_j + bk, v_j = Wv h_j + bv and P = softmax_j(q_i.k_j / sqrt(C)):

        - q_i.k_j = (A h_i + u).h_j + (terms constant in j, which the softmax cancels),
          A = Wk^T Wq, u = Wk^T bq: the keys are the tokens h themselves;
        - Wo sum_j P_ij v_j + bo = (Wo Wv) sum_j P_ij h_j + (Wo bv + bo), as each row of P sums
          to 1: the values are the tokens too.

        So ``proj(SDPA(q, k, v)) = linear(SDPA(linear(h, A, u), h, h), Wo Wv, Wo bv + bo)``:
        2 C^2 multiply-adds per token instead of 4 C^2, and no (B, N, 3C) buffer. bk gets a zero
        gradient, which is its true one (it never changes the output). (B, N, C) -> (B, N, C).
        """
        c = h.shape[-1]
        with _autocast_off(h.device):  # fold in the parameters' precision; F.linear casts after
            wq, wk, wv = self.qkv.weight.split(c)
            bq, _, bv = self.qkv.bias.split(c)
            weight_q, bias_q = wk.t() @ wq, bq @ wk
            weight_o, bias_o = self.proj.weight @ wv, self.proj.weight @ bv + self.proj.bias
        q = F.linear(h, weight_q, bias_q).unsqueeze(1)  # (B, 1, N, C)
        kv = h.to(q.dtype).unsqueeze(1)
        return F.linear(self.attend(q, kv, kv).squeeze(1), weight_o, bias_o)


class LinearAttention(SelfAttention):
    """Linear attention (Shen et al. 2018): O(N) in the number of positions.

    Queries are softmax-normalised over channels, keys over positions; the (d x d) context
    ``k^T v`` replaces the (N x N) attention matrix. For high resolutions where ``attn`` is too
    expensive. (B, C, H, W) -> (B, C, H, W), residual.
    """

    foldable = False

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__(channels, cfg)
        self.scale = (channels // self.heads) ** -0.5

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        context = k.softmax(dim=-2).transpose(-2, -1) @ v  # (B, h, d, d)
        return (q.softmax(dim=-1) * self.scale) @ context


class ClassAttention(nn.Module):
    """Cross-attention from the feature map to tokens made from the class embedding.

    The class embedding (B, E) is projected to ``cls_attn_tokens`` key/value tokens of width C;
    every position queries them, so the class can steer different positions differently.
    (B, C, H, W), cls_emb (B, E) -> (B, C, H, W), residual.
    """

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.heads = cfg.heads_for(channels)
        self.tokens = cfg.cls_attn_tokens
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(cfg.emb_dim, 2 * channels * self.tokens)
        self.proj = nn.Linear(channels, channels)
        if cfg.zero_init:
            _zero_(self.proj)

    def forward(self, x: Tensor, emb: Tensor, cls_emb: Tensor | None = None) -> Tensor:
        if cls_emb is None:  # construction guarantees num_classes > 0; UNet always passes one
            raise RuntimeError("ClassAttention needs the class embedding")
        b = x.shape[0]
        (q,) = _split_heads(self.q(_to_tokens(group_norm_act(x, self.norm, silu=False))), 1, self.heads)
        kv = self.kv(cls_emb).view(b, self.tokens, -1).to(q.dtype)
        k, v = _split_heads(kv, 2, self.heads)
        out = self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + _from_tokens(out, x)


class ChannelAttention(nn.Module):
    """Efficient channel attention (ECA-Net, Wang et al. 2020).

    Global average pool -> 1D conv across channels (kernel from C) -> sigmoid -> rescale the
    channels. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, cfg: UNetConfig) -> None:
        super().__init__()
        k = int(abs((math.log2(channels) + 1) / 2))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: Tensor, emb: Tensor, cls_emb: Tensor | None = None) -> Tensor:
        w = self.conv(x.mean(dim=(2, 3))[:, None, :])  # (B, 1, C)
        return x * torch.sigmoid(w)[:, 0, :, None, None]


def make_block(kind: str, in_channels: int, out_channels: int, cfg: UNetConfig) -> nn.Module:
    """One block of a recipe. Only ``res``/``convnext`` may change the channel count."""
    if kind == "res":
        return ResBlock(in_channels, out_channels, cfg)
    if kind == "convnext":
        return ConvNeXtBlock(in_channels, out_channels, cfg)
    if in_channels != out_channels:  # guarded by UNetConfig.validate
        raise ValueError(f"block kind {kind!r} cannot change channels")
    if kind == "attn":
        return SelfAttention(in_channels, cfg)
    if kind == "linear_attn":
        return LinearAttention(in_channels, cfg)
    if kind == "cls_attn":
        return ClassAttention(in_channels, cfg)
    if kind == "chn_attn":
        return ChannelAttention(in_channels, cfg)
    raise ValueError(f"unknown block kind {kind!r}")
