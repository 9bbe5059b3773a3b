"""`UNet`: the configurable denoiser ``eps_theta(x_t, t, y, c)``.

Layout (improved-diffusion / ADM): input conv, then per level ``num_res_blocks`` units (each a
recipe of blocks, see `UNetConfig.blocks`) and a 2x downsampling; a bottleneck; then per level
``num_res_blocks + 1`` units, each taking the matching skip from the way down concatenated on
channels, and a 2x upsampling; finally GroupNorm -> SiLU -> 3x3 conv.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from difforge.errors import DifforgeError
from difforge.nn.config import UNetConfig
from difforge.nn.cpu_kernels import group_norm_act
from difforge.nn.layers import (
    Downsample,
    ResBlock,
    SinusoidalEmbedding,
    Upsample,
    UpsampleConv3x3,
    make_block,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Unit(nn.Module):
    """A sequence of blocks run in order (one recipe instance, or a resampler)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, emb: Tensor, cls_emb: Tensor | None) -> Tensor:
        for block in self.blocks:
            x = block(x, emb, cls_emb)
        return x


def _recipe_unit(recipe: Sequence[str], in_ch: int, out_ch: int, cfg: UNetConfig) -> Unit:
    blocks = []
    for kind in recipe:
        blocks.append(make_block(kind, in_ch, out_ch, cfg))
        if kind in ("res", "convnext"):
            in_ch = out_ch
    return Unit(blocks)


class UNet(nn.Module):
    """U-Net denoiser for images, with timestep, class and image conditioning.

    Args:
        config: the architecture; validated here (bad fields raise `DifforgeError`).

    Call ``model(x, t, class_labels=None, image_cond=None, cond_noise_level=None)``:

    - ``x``: (B, in_channels, H, W) float noisy images in about [-1, 1], H = W = image_size;
    - ``t``: (B,) integer or float timesteps (a 0-d tensor is broadcast over the batch);
    - ``class_labels``: (B,) int64 in ``0..num_classes`` where ``num_classes`` is the null
      label; with ``multi_label`` a float multi-hot (B, num_classes), all-zero = null. ``None``
      on a class-conditional model means "null label for everyone".
    - ``image_cond``: (B, image_cond_channels, h, w), resized to H x W and concatenated to x.
    - ``cond_noise_level``: (B,) float in [0, 1], the augmentation noise level of
      ``image_cond`` (``cond_noise_embed`` models; None = 0, a clean condition).

    Returns (B, final_out_channels, H, W): ``out_channels`` (default ``in_channels``), doubled
    when ``learn_sigma`` (first half: the prediction, second half: variance interpolation).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise DifforgeError(f"UNet needs a UNetConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        cfg = config
        emb_dim = cfg.emb_dim
        ch = cfg.base_channels

        self.time_embed = SinusoidalEmbedding(ch, freq_shift=cfg.time_freq_shift)
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed: nn.Module | None = None
        if cfg.num_classes > 0:
            if cfg.multi_label:
                self.class_embed = nn.Linear(cfg.num_classes, emb_dim, bias=False)
            else:
                self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim)

        self.cond_noise_mlp: nn.Module | None = None
        if cfg.cond_noise_embed:
            self.cond_noise_mlp = nn.Sequential(
                SinusoidalEmbedding(ch), nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )

        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.image_cond_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        for level in range(cfg.num_levels):
            out_ch = cfg.level_channels(level)
            for _ in range(cfg.num_res_blocks):
                self.down.append(_recipe_unit(cfg.level_recipe(level), ch, out_ch, cfg))
                ch = out_ch
                skips.append(ch)
            if level != cfg.num_levels - 1:
                self.down.append(Unit([self._downsampler(ch)]))
                skips.append(ch)

        self.mid = _recipe_unit(cfg.mid_recipe(), ch, ch, cfg)

        self.up = nn.ModuleList()
        for level in reversed(range(cfg.num_levels)):
            out_ch = cfg.level_channels(level)
            for i in range(cfg.num_res_blocks + 1):
                unit = _recipe_unit(cfg.level_recipe(level), ch + skips.pop(), out_ch, cfg)
                ch = out_ch
                if level != 0 and i == cfg.num_res_blocks:
                    unit.blocks.append(self._upsampler(ch))
                self.up.append(unit)

        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch, cfg.final_out_channels, 3, padding=1)
        if cfg.zero_init:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def _downsampler(self, ch: int) -> nn.Module:
        if self.config.resample == "resblock":
            return ResBlock(ch, ch, self.config, down=True)
        return Downsample(ch, self.config.downsample_padding)

    def _upsampler(self, ch: int) -> nn.Module:
        if self.config.resample == "resblock":
            return ResBlock(ch, ch, self.config, up=True)
        return Upsample(ch)

    @property
    def null_label(self) -> int:
        """The class label meaning "no class" (classifier-free guidance): ``num_classes``."""
        return self.config.num_classes

    # ------------------------------------------------------------------ forward
    def _embed(
        self, t: Tensor, class_labels: Tensor | None, cond_noise_level: Tensor | None, batch: int
    ) -> tuple[Tensor, Tensor | None]:
        """Timestep (+ class, + condition noise level) embedding: returns (SiLU(emb), class
        embedding or None), (B, E)."""
        if t.ndim == 0:
            t = t.expand(batch)
        emb = self.time_mlp(self.time_embed(t).to(self.time_mlp[0].weight.dtype))
        if self.cond_noise_mlp is not None:
            level = cond_noise_level if cond_noise_level is not None else emb.new_zeros((batch,))
            if level.ndim == 0:
                level = level.expand(batch)
            # Scaled by 1000 so the sinusoid's frequencies see the range t covers.
            emb = emb + self.cond_noise_mlp(level.float() * 1000.0).to(emb.dtype)
        elif cond_noise_level is not None:
            raise DifforgeError("cond_noise_level given to a UNet without cond_noise_embed")
        cls_emb = None
        if self.class_embed is not None:
            if class_labels is None:
                if self.config.multi_label:
                    class_labels = emb.new_zeros(batch, self.config.num_classes)
                else:
                    class_labels = torch.full((batch,), self.null_label, dtype=torch.long, device=emb.device)
            if self.config.multi_label:
                cls_emb = self.class_embed(class_labels.to(emb.dtype))
            else:
                cls_emb = self.class_embed(class_labels.long())
            emb = emb + cls_emb
        elif class_labels is not None:
            raise DifforgeError("class_labels given to an unconditional UNet (num_classes=0)")
        return F.silu(emb), cls_emb

    def _run(self, unit: nn.Module, h: Tensor, emb: Tensor, cls_emb: Tensor | None) -> Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(unit, h, emb, cls_emb, use_reentrant=False)
        return unit(h, emb, cls_emb)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        class_labels: Tensor | None = None,
        image_cond: Tensor | None = None,
        cond_noise_level: Tensor | None = None,
    ) -> Tensor:
        """Predict from noisy ``x`` at timesteps ``t``; see the class docstring for shapes."""
        cfg = self.config
        batch, _, height, width = x.shape
        emb, cls_emb = self._embed(t, class_labels, cond_noise_level, batch)

        if cfg.image_cond_channels:
            if image_cond is None:
                raise DifforgeError(f"this UNet needs image_cond with {cfg.image_cond_channels} channels")
            if image_cond.shape[-2:] != (height, width):
                shrink = image_cond.shape[-2] > height or image_cond.shape[-1] > width
                image_cond = F.interpolate(
                    image_cond,
                    size=(height, width),
                    mode="bilinear",
                    align_corners=False,
                    antialias=shrink,
                )
            x = torch.cat([x, image_cond.to(x.dtype)], dim=1)
        elif image_cond is not None:
            raise DifforgeError("image_cond given to a UNet with image_cond_channels=0")

        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        skips = [h]
        for unit in self.down:
            h = self._run(unit, h, emb, cls_emb)
            skips.append(h)
        h = self._run(self.mid, h, emb, cls_emb)
        for unit in self.up:
            h = self._run(unit, torch.cat([h, skips.pop()], dim=1), emb, cls_emb)
        out = self.conv_out(group_norm_act(h, self.norm_out))
        return out.contiguous()

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``config.json`` and ``model.safetensors`` (weights as held) into ``directory``."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "library": "difforge"})

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], *, device: str | torch.device = "cpu"
    ) -> UNet:
        """Load a model written by `save_pretrained`; a missing or damaged file raises
        `DifforgeError` naming the path."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(directory)
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for p in (config_path, weights_path):
            if not p.is_file():
                raise DifforgeError(f"{p}: not found; expected a directory written by save_pretrained")
        try:
            config = UNetConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise DifforgeError(f"{config_path}: not a valid UNet config ({exc})") from exc
        except DifforgeError as exc:
            raise DifforgeError(f"{config_path}: {exc}") from exc
        try:
            state = load_file(str(weights_path), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise DifforgeError(f"{weights_path}: damaged safetensors file ({exc})") from exc
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise DifforgeError(
                f"{weights_path}: weights do not match config.json (missing: "
                f"{sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
            )
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise DifforgeError(f"{weights_path}: weights do not match config.json ({exc})") from exc
        model._rebuild_buffers(torch.device(device))
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        return model.eval()

    def _rebuild_buffers(self, device: torch.device) -> None:
        """Recompute the non-persistent buffers (they were built on meta by `from_pretrained`)."""
        for module in self.modules():
            if isinstance(module, (SinusoidalEmbedding, UpsampleConv3x3)):
                module.reset_buffers(device)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
