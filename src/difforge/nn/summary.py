"""A U-Net's architecture in words: levels, blocks, parameters and forward FLOPs per image.

``difforge info RUN`` and ``difforge train --dry-run`` print `describe_unet`. Nothing is
allocated: the network is built on the meta device, and FLOPs are counted by PyTorch's
`torch.utils.flop_counter.FlopCounterMode` over one forward of one image at the network's
size (multiply-adds count 2; what the kernels run, so folded single-head attention and the
transposed-convolution upsampling count as they are computed).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from difforge.nn.config import UNetConfig
from difforge.nn.unet import UNet


def parameter_count(config: UNetConfig) -> int:
    """Trainable parameters of the network ``config`` describes."""
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(config).parameters())


def forward_flops(config: UNetConfig) -> int:
    """FLOPs of one forward pass of one image at ``config.image_size`` (eval mode)."""
    with torch.device("meta"):
        network = UNet(config).eval()
        x = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
        t = torch.zeros(1, dtype=torch.long)
        kwargs: dict[str, torch.Tensor] = {}
        if config.num_classes:
            labels = (
                torch.zeros(1, config.num_classes) if config.multi_label else torch.zeros(1, dtype=torch.long)
            )
            kwargs["class_labels"] = labels
        if config.image_cond_channels:
            side = config.image_size
            kwargs["image_cond"] = torch.zeros(1, config.image_cond_channels, side, side)
        if config.cond_noise_embed:
            kwargs["cond_noise_level"] = torch.zeros(1)
        with FlopCounterMode(display=False) as counter:
            network(x, t, **kwargs)
    return int(counter.get_total_flops())


def describe_unet(config: UNetConfig) -> list[str]:
    """Lines such as ``level 1  16x16   64 ch  down 1 x res,attn  up 2 x res,attn``, the
    bottleneck, then parameters and GFLOPs per image."""
    lines = []
    for level in range(config.num_levels):
        side = config.level_resolution(level)
        recipe = ",".join(config.level_recipe(level))
        attends = {"attn", "linear_attn", "cls_attn"}.intersection(config.level_recipe(level))
        heads = f", {config.heads_for(config.level_channels(level))} heads" if attends else ""
        lines.append(
            f"level {level}  {side}x{side}  {config.level_channels(level)} ch  "
            f"down {config.num_res_blocks} x {recipe}  up {config.num_res_blocks + 1} x {recipe}{heads}"
        )
    last = config.num_levels - 1
    side = config.level_resolution(last)
    lines.append(
        f"bottleneck  {side}x{side}  {config.level_channels(last)} ch  {','.join(config.mid_recipe())}"
    )
    conditions = []
    if config.num_classes:
        conditions.append(f"{config.num_classes} {'labels (multi-hot)' if config.multi_label else 'classes'}")
    if config.image_cond_channels:
        conditions.append(f"a {config.image_cond_channels}-channel condition image")
    embedding = "AdaGN scale-shift" if config.scale_shift else "added bias"
    lines.append(
        f"embedding {config.emb_dim} wide ({embedding}); resample {config.resample}; "
        f"dropout {config.dropout:g}" + (f"; conditions: {', '.join(conditions)}" if conditions else "")
    )
    flops = forward_flops(config)
    lines.append(
        f"{parameter_count(config) / 1e6:.2f}M parameters; {flops / 1e9:.3g} GFLOPs per "
        f"{config.image_size}x{config.image_size} image (forward)"
    )
    return lines
