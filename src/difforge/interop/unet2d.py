"""difforge's `UNet` <-> diffusers' ``UNet2DModel``: the configuration and the weights.

The two networks are the same DDPM / ADM U-Net when the difforge one uses only what
``UNet2DModel`` has: residual blocks, softmax self-attention at whole levels, the bottleneck
``res, attn, res`` (or ``res, res``), strided-conv / nearest-conv resampling and an
``nn.Embedding`` of class labels. Module by module:

================================  ==========================================
difforge                          diffusers
================================  ==========================================
``time_mlp.0`` / ``time_mlp.2``   ``time_embedding.linear_1`` / ``linear_2``
``class_embed``                   ``class_embedding``
``conv_in``, ``conv_out``         ``conv_in``, ``conv_out``
``norm_out``                      ``conv_norm_out``
``down.U.blocks.0`` (res)         ``down_blocks.L.resnets.R``
``down.U.blocks.1`` (attn)        ``down_blocks.L.attentions.R``
``down.U.blocks.0`` (Downsample)  ``down_blocks.L.downsamplers.0``
``mid.blocks.0, 1, 2``            ``mid_block.resnets.0``, ``attentions.0``, ``resnets.1``
``up.U.blocks.0 / 1``             ``up_blocks.K.resnets.R`` / ``attentions.R``
``up.U.blocks.-1`` (Upsample)     ``up_blocks.K.upsamplers.0``
res ``norm1 conv1 norm2 conv2``   the same names
res ``emb_proj`` / ``skip``       ``time_emb_proj`` / ``conv_shortcut``
attn ``norm`` / ``proj``          ``group_norm`` / ``to_out.0``
attn ``qkv`` (3C x C)             ``to_q``, ``to_k``, ``to_v`` stacked on rows
================================  ==========================================

(U counts units as built, L a level from the top, K a level from the bottom, R the unit in
the level.) Every other tensor keeps its shape, so the weights move bit for bit. What does
not map is refused by `unet_config_to_diffusers` / `unet_config_from_diffusers` with one line
naming it; this module needs neither diffusers nor torch beyond tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from difforge.errors import DifforgeError
from difforge.nn import UNet, UNetConfig

EXPORTABLE_PRESETS = ("small", "ddpm-cifar10", "iddpm-cifar10", "mnist", "tiny")
"""The presets whose networks ``UNet2DModel`` holds exactly (the nearest for a refused one)."""

_RES_TENSORS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "emb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}
_ATTN_TENSORS = {"norm": "group_norm", "proj": "to_out.0"}
_QKV = ("to_q", "to_k", "to_v")
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
"""Names of diffusers' attention tensors before 0.14 (its ``_from_deprecated_attn_block``)."""


def _parameter_count(cfg: UNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())


def nearest_exportable_preset(cfg: UNetConfig) -> tuple[str, int]:
    """The exportable preset (at the run's size and channels) whose parameter count is closest
    to the run's network: (name, its parameter count)."""
    own = _parameter_count(cfg)
    counts = {
        name: _parameter_count(
            UNetConfig.preset(name, image_size=cfg.image_size, in_channels=cfg.in_channels)
        )
        for name in EXPORTABLE_PRESETS
    }
    name = min(counts, key=lambda n: abs(counts[n] - own))
    return name, counts[name]


def _refuse(what: str, cfg: UNetConfig) -> DifforgeError:
    try:
        name, count = nearest_exportable_preset(cfg)
        nearest = f"; the nearest exportable preset is {name} ({count / 1e6:.2f}M parameters)"
    except DifforgeError:  # a preset that does not fit the run's size
        nearest = ""
    return DifforgeError(
        f"{what}: diffusers' UNet2DModel has no such block, so the run cannot be exported "
        f"(exportable presets: {', '.join(EXPORTABLE_PRESETS)}{nearest})"
    )


# ---- configuration ---------------------------------------------------------------------------


def _attention_head_dim(cfg: UNetConfig, attention_channels: list[int]) -> int | None:
    """diffusers' one ``attention_head_dim`` (channels per head) for every attention block;
    None means one head per block."""
    if not attention_channels:
        return None
    if cfg.head_channels is not None:
        return cfg.head_channels
    if cfg.num_heads == 1:
        return None
    widths = sorted(set(attention_channels))
    if len(widths) > 1:
        raise _refuse(
            f"num_heads={cfg.num_heads} at attention levels of {' and '.join(map(str, widths))} channels "
            "gives heads of different widths (diffusers has one attention_head_dim; use head_channels)",
            cfg,
        )
    return widths[0] // cfg.num_heads


def unet_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config (every key explicit) of the same network, or a one-line
    DifforgeError naming the first part diffusers cannot hold."""
    if cfg.multi_label:
        raise _refuse("multi-label conditioning (a linear embedding of multi-hot labels)", cfg)
    if cfg.image_cond_channels:
        raise _refuse("image conditioning (condition channels concatenated to the input)", cfg)
    if cfg.resample != "conv":
        raise _refuse(f"resample={cfg.resample!r} (residual blocks that resample)", cfg)
    if cfg.base_channels % 2:
        raise _refuse(f"an odd timestep-feature width ({cfg.base_channels})", cfg)
    down_types, attention_channels = [], []
    for level in range(cfg.num_levels):
        recipe = cfg.level_recipe(level)
        if recipe not in (("res",), ("res", "attn")):
            odd = next((k for k in recipe if k not in ("res", "attn")), ",".join(recipe))
            raise _refuse(f"the {odd!r} block of level {level} (recipe {','.join(recipe)!r})", cfg)
        attends = "attn" in recipe
        down_types.append("AttnDownBlock2D" if attends else "DownBlock2D")
        if attends:
            attention_channels.append(cfg.level_channels(level))
    mid = cfg.mid_recipe()
    if mid not in (("res", "attn", "res"), ("res", "res")):
        raise _refuse(f"the bottleneck {','.join(mid)!r} (diffusers has res,attn,res or res,res)", cfg)
    if "attn" in mid:
        attention_channels.append(cfg.level_channels(cfg.num_levels - 1))
    up_types = [t.replace("Down", "Up") for t in reversed(down_types)]
    return {
        "_class_name": "UNet2DModel",
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.final_out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": cfg.emb_dim,
        "freq_shift": cfg.time_freq_shift,
        "flip_sin_to_cos": True,
        "down_block_types": down_types,
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": up_types,
        "block_out_channels": [cfg.level_channels(level) for level in range(cfg.num_levels)],
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": cfg.downsample_padding,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": float(cfg.dropout),
        "act_fn": "silu",
        "attention_head_dim": _attention_head_dim(cfg, attention_channels),
        "norm_num_groups": cfg.norm_groups,
        # Explicit: left None, diffusers drops the bottleneck attention's GroupNorm in a
        # scale-shift network.
        "attn_norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift else "default",
        "add_attention": "attn" in mid,
        "class_embed_type": None,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,
        "num_train_timesteps": None,
    }


_EXPECTED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "class_embed_type": None,
    "mid_block_type": "UNetMidBlock2D",
}
"""``UNet2DModel`` settings (at diffusers' defaults) that difforge holds only at this value."""

_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "dropout": 0.0,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "num_class_embeds": None,
    **_EXPECTED,
}


class ImportedUNet:
    """What `unet_config_from_diffusers` read: the difforge config, whether the timestep
    features come as ``[sin | cos]`` (diffusers' ``flip_sin_to_cos=False``, turned into ours by
    permuting the first embedding layer's input columns), and whether the class table gained
    a null row (diffusers' has none)."""

    def __init__(self, config: UNetConfig, sin_first: bool, added_null_row: bool) -> None:
        self.config = config
        self.sin_first = sin_first
        self.added_null_row = added_null_row


def unet_config_from_diffusers(data: Mapping[str, Any], source: str) -> ImportedUNet:
    """The difforge `UNetConfig` of a ``UNet2DModel`` config.json, or a one-line DifforgeError
    (naming ``source``) listing what difforge does not hold."""
    if data.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DifforgeError(f"{source}: a {data.get('_class_name')}, not a UNet2DModel (only those import)")
    settings = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in data.items() if not k.startswith("_")}}
    problems = [f"{key}={settings[key]!r}" for key, value in _EXPECTED.items() if settings[key] != value]
    down, up = list(settings["down_block_types"]), list(settings["up_block_types"])
    known_down, known_up = {"DownBlock2D", "AttnDownBlock2D"}, {"UpBlock2D", "AttnUpBlock2D"}
    problems += [f"block {name}" for name in down if name not in known_down]
    problems += [f"block {name}" for name in up if name not in known_up]
    if not problems and [t.replace("Down", "Up") for t in reversed(down)] != up:
        problems.append("up_block_types that do not mirror down_block_types (attention on one side only)")
    channels = list(settings["block_out_channels"])
    base = channels[0] if channels else 0
    if not channels or any(c % base for c in channels):
        problems.append(f"block_out_channels={channels} (difforge levels are multiples of the first)")
    size = settings["sample_size"]
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int):
        problems.append(f"sample_size={settings['sample_size']!r} (a square size is needed)")
    groups, attn_groups = settings["norm_num_groups"], settings["attn_norm_num_groups"]
    shift = settings["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        problems.append(f"resnet_time_scale_shift={shift!r}")
    if attn_groups not in (None, groups):
        problems.append(f"attn_norm_num_groups={attn_groups} differing from norm_num_groups={groups}")
    if settings["add_attention"] and shift == "scale_shift" and attn_groups is None:
        problems.append(
            "a bottleneck attention without GroupNorm (scale_shift with attn_norm_num_groups unset)"
        )
    if settings["in_channels"] not in (1, 3):
        problems.append(f"in_channels={settings['in_channels']} (difforge makes grey or RGB images)")
    if problems:
        raise DifforgeError(f"{source}: not supported by difforge: {'; '.join(problems)}")

    in_channels, out_channels = settings["in_channels"], settings["out_channels"]
    learn_sigma = out_channels == 2 * in_channels
    head_dim = settings["attention_head_dim"]
    num_classes = settings["num_class_embeds"] or 0
    levels = len(channels)
    attention_resolutions = tuple(size // 2**lv for lv in range(levels) if down[lv] == "AttnDownBlock2D")
    fields = dict(
        image_size=size,
        in_channels=in_channels,
        out_channels=None if learn_sigma or out_channels == in_channels else out_channels,
        learn_sigma=learn_sigma,
        base_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=settings["layers_per_block"],
        attention_resolutions=attention_resolutions,
        num_heads=1,
        head_channels=head_dim,
        dropout=float(settings["dropout"]),
        norm_groups=groups,
        norm_eps=float(settings["norm_eps"]),
        resample="conv",
        scale_shift=shift == "scale_shift",
        mid_blocks="res,attn,res" if settings["add_attention"] else "res,res",
        time_embed_dim=settings["time_embedding_dim"] or 4 * base,
        num_classes=num_classes,
        time_freq_shift=settings["freq_shift"],
        downsample_padding=settings["downsample_padding"],
        zero_init=False,
    )
    try:
        config = UNetConfig(**fields)
    except DifforgeError as error:
        raise DifforgeError(f"{source}: not supported by difforge: {error}") from None
    return ImportedUNet(config, sin_first=not settings["flip_sin_to_cos"], added_null_row=num_classes > 0)


# ---- weights ---------------------------------------------------------------------------------


def _block_names(cfg: UNetConfig) -> Iterator[tuple[str, str, str]]:
    """(difforge module, diffusers module, block kind) for every block, in build order."""
    yield "time_mlp.0", "time_embedding.linear_1", "tensor"
    yield "time_mlp.2", "time_embedding.linear_2", "tensor"
    if cfg.num_classes:
        yield "class_embed", "class_embedding", "tensor"
    yield "conv_in", "conv_in", "tensor"
    unit = 0
    for level in range(cfg.num_levels):
        recipe = cfg.level_recipe(level)
        for r in range(cfg.num_res_blocks):
            yield f"down.{unit}.blocks.0", f"down_blocks.{level}.resnets.{r}", "res"
            if "attn" in recipe:
                yield f"down.{unit}.blocks.1", f"down_blocks.{level}.attentions.{r}", "attn"
            unit += 1
        if level != cfg.num_levels - 1:
            yield f"down.{unit}.blocks.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "tensor"
            unit += 1
    mid = cfg.mid_recipe()
    diffusers_mid = iter(
        ["resnets.0", "attentions.0", "resnets.1"] if "attn" in mid else ["resnets.0", "resnets.1"]
    )
    for index, kind in enumerate(mid):
        yield f"mid.blocks.{index}", f"mid_block.{next(diffusers_mid)}", kind
    unit = 0
    for k, level in enumerate(reversed(range(cfg.num_levels))):
        recipe = cfg.level_recipe(level)
        for r in range(cfg.num_res_blocks + 1):
            yield f"up.{unit}.blocks.0", f"up_blocks.{k}.resnets.{r}", "res"
            if "attn" in recipe:
                yield f"up.{unit}.blocks.1", f"up_blocks.{k}.attentions.{r}", "attn"
            if level != 0 and r == cfg.num_res_blocks:
                yield f"up.{unit}.blocks.{len(recipe)}.conv", f"up_blocks.{k}.upsamplers.0.conv", "tensor"
            unit += 1
    yield "norm_out", "conv_norm_out", "tensor"
    yield "conv_out", "conv_out", "tensor"


def _tensor_pairs(cfg: UNetConfig) -> Iterator[tuple[str, str]]:
    """(difforge prefix, diffusers prefix) of every parameter tensor group but the stacked qkv."""
    for ours, theirs, kind in _block_names(cfg):
        if kind == "tensor":
            yield ours, theirs
        elif kind == "res":
            for a, b in _RES_TENSORS.items():
                yield f"{ours}.{a}", f"{theirs}.{b}"
        else:
            for a, b in _ATTN_TENSORS.items():
                yield f"{ours}.{a}", f"{theirs}.{b}"


def _attention_blocks(cfg: UNetConfig) -> Iterator[tuple[str, str]]:
    for ours, theirs, kind in _block_names(cfg):
        if kind == "attn":
            yield ours, theirs


def state_dict_to_diffusers(cfg: UNetConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """difforge tensors -> ``UNet2DModel`` tensors (the same values, renamed; qkv split)."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ours, theirs in _tensor_pairs(cfg):
        for suffix in ("weight", "bias"):
            key = f"{ours}.{suffix}"
            if key in state:
                out[f"{theirs}.{suffix}"] = state[key]
                used.add(key)
    for ours, theirs in _attention_blocks(cfg):
        for suffix in ("weight", "bias"):
            key = f"{ours}.qkv.{suffix}"
            for name, part in zip(_QKV, state[key].chunk(3, dim=0), strict=True):
                out[f"{theirs}.{name}.{suffix}"] = part.contiguous()
            used.add(key)
    left = sorted(set(state) - used)
    if left:  # a block this module does not know: never export half a network
        raise _refuse(f"the tensors {', '.join(left[:3])}", cfg)
    return out


def state_dict_from_diffusers(
    imported: ImportedUNet, state: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """``UNet2DModel`` tensors -> difforge tensors; a missing, extra or misshapen tensor is a
    one-line DifforgeError naming ``source``."""
    cfg = imported.config
    theirs = dict(state)
    for key in list(theirs):  # the names before diffusers 0.14
        head, _, tail = key.rpartition(".")
        block, _, name = head.rpartition(".")
        if ".attentions." in key and name in _LEGACY_ATTN:
            theirs[f"{block}.{_LEGACY_ATTN[name]}.{tail}"] = theirs.pop(key)
    out: dict[str, torch.Tensor] = {}
    wanted: list[str] = []

    def take(key: str) -> torch.Tensor | None:
        wanted.append(key)
        return theirs.get(key)

    for ours, prefix in _tensor_pairs(cfg):
        for suffix in ("weight", "bias"):
            value = take(f"{prefix}.{suffix}")
            if value is not None:
                out[f"{ours}.{suffix}"] = value
    for ours, prefix in _attention_blocks(cfg):
        for suffix in ("weight", "bias"):
            parts = [take(f"{prefix}.{name}.{suffix}") for name in _QKV]
            if all(p is not None for p in parts):
                out[f"{ours}.qkv.{suffix}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    extra = sorted(set(theirs) - set(wanted))
    if extra:
        raise DifforgeError(f"{source}: tensors difforge does not know: {', '.join(extra[:4])}")
    if imported.sin_first:
        weight = out["time_mlp.0.weight"]
        half = cfg.base_channels // 2
        out["time_mlp.0.weight"] = torch.cat([weight[:, half:], weight[:, :half]], dim=1)
    if imported.added_null_row and "class_embed.weight" in out:
        table = out["class_embed.weight"]
        out["class_embed.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    return out
