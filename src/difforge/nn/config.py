"""`UNetConfig`: the typed, JSON-serialisable description of a U-Net denoiser.

A config fully determines the architecture (and so the parameter layout of a checkpoint);
`UNet.save_pretrained` stores it as ``config.json`` next to the weights. Every field has a
default, so ``UNetConfig()`` is a valid (DDPM-CIFAR10-like, scale-shift) network, and named
presets cover the common shapes::

    cfg = UNetConfig.preset("small", num_classes=10)
    cfg = UNetConfig.from_dict(json.loads(text))

Invalid combinations (channel multipliers deeper than the image size allows, attention at a
resolution the network never reaches, heads that do not divide the channels, unknown block
kinds, ...) raise `difforge.errors.DifforgeError` (a `ValueError`) naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from difforge.errors import DifforgeError

BLOCK_KINDS: tuple[str, ...] = ("res", "convnext", "attn", "linear_attn", "cls_attn", "chn_attn")
"""Block kinds a per-level recipe may use. ``res`` and ``convnext`` are convolutional blocks
(they may change the channel count); the others are channel-preserving attention blocks."""

CONV_KINDS: frozenset[str] = frozenset({"res", "convnext"})
RESAMPLE_KINDS: tuple[str, ...] = ("conv", "resblock")

_TUPLE_FIELDS = ("channel_mult", "attention_resolutions", "blocks")


@dataclass
class UNetConfig:
    """Architecture of a `difforge.nn.UNet`.

    Attributes:
        image_size: Side of the (square) training images; bounds how deep the U-Net may go.
        in_channels: Channels of the noisy image ``x``.
        out_channels: Predicted channels; ``None`` means ``in_channels``.
        learn_sigma: Double the output channels: the second half parameterises the
            learned-range variance of improved DDPM (Nichol & Dhariwal 2021).
        base_channels: Channels at the first (full-resolution) level.
        channel_mult: Channel multiplier per level; ``len(channel_mult)`` levels, each but the
            last followed by a 2x downsampling.
        num_res_blocks: Units per level on the way down (the way up has one more, as in DDPM).
        attention_resolutions: Feature-map sides (e.g. ``(16,)``) whose levels get a
            multi-head self-attention (``attn``) block after every unit.
        num_heads: Attention heads (used when ``head_channels`` is ``None``).
        head_channels: Channels per head; when set, heads = channels // head_channels.
        dropout: Dropout before the last convolution of every residual block.
        norm_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        resample: ``"conv"``: strided 3x3 conv down, nearest + 3x3 conv up (DDPM);
            ``"resblock"``: residual blocks that resample (BigGAN / ADM).
        scale_shift: Timestep (and class) conditioning as AdaGN scale-shift of the second
            GroupNorm of every residual block (ADM); ``False`` adds a per-channel bias instead
            (DDPM, diffusers).
        blocks: Per-level recipe, one comma-separated string per level, e.g.
            ``("res", "res,attn", "convnext,cls_attn,chn_attn")``: every unit of that level runs
            these blocks in order. The first must be ``res`` or ``convnext`` (it changes the
            channel count). ``None`` means ``"res"`` everywhere. Levels whose resolution is in
            ``attention_resolutions`` get an ``attn`` appended if their recipe has none.
        mid_blocks: Recipe of the bottleneck (lowest resolution, between the two halves).
        convnext_mult: Hidden-width multiplier of ConvNeXt blocks.
        cls_attn_tokens: Key/value tokens a ``cls_attn`` block makes from the class embedding.
        time_embed_dim: Width of the timestep/class embedding; ``None`` means 4 x base_channels.
        num_classes: Classes for class conditioning; 0 = unconditional. The label value
            ``num_classes`` is the null label (classifier-free guidance).
        multi_label: Labels are multi-hot float vectors ``(B, num_classes)``; an all-zero row
            is the null condition.
        image_cond_channels: Channels of an image condition, resized to ``image_size`` and
            concatenated to the input (super-resolution, image-to-image); 0 = none.
        cond_noise_embed: The model also takes ``cond_noise_level`` (B,) in [0, 1], the
            noise-conditioning augmentation level of its image condition (Ho et al. 2021,
            "Cascaded Diffusion Models" section 3.2), embedded like t and added to the
            timestep embedding. Needs ``image_cond_channels`` > 0.
        time_freq_shift: The timestep features' frequencies are
            ``exp(-ln(10000) i / (half - time_freq_shift))``, i < half = base_channels / 2:
            0 (ours, diffusers' default) or 1 (Ho et al.'s DDPM models; diffusers'
            ``freq_shift``).
        downsample_padding: Padding of the strided downsampling convolution: 1 on every side,
            or 0 with one row and column added at the bottom and right (TensorFlow's
            ``SAME``, as in Ho et al.'s DDPM models; diffusers' ``downsample_padding``).
        zero_init: Zero-initialise the last layer of every residual branch and the output
            convolution (ADM), so a fresh network is the identity on its skip paths.
        gradient_checkpointing: Recompute block activations in the backward pass (saves
            memory, costs about one extra forward).
        channels_last: Run in NHWC memory format (faster with oneDNN on CPU and on tensor cores).
    """

    kind: ClassVar[str] = "unet"
    """The model kind in a run's config.json (see `difforge.runs.models`)."""

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None
    learn_sigma: bool = False
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-5
    resample: str = "conv"
    scale_shift: bool = True
    blocks: tuple[str, ...] | None = None
    mid_blocks: str = "res,attn,res"
    convnext_mult: int = 2
    cls_attn_tokens: int = 4
    time_embed_dim: int | None = None
    num_classes: int = 0
    multi_label: bool = False
    image_cond_channels: int = 0
    cond_noise_embed: bool = False
    time_freq_shift: int = 0
    downsample_padding: int = 1
    zero_init: bool = True
    gradient_checkpointing: bool = False
    channels_last: bool = True

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                raise DifforgeError(f"UNetConfig.{name} must be a sequence, got the string {value!r}")
            if value is not None:
                setattr(self, name, tuple(value))
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def final_out_channels(self) -> int:
        """Channels the network outputs (doubled by ``learn_sigma``)."""
        base = self.in_channels if self.out_channels is None else self.out_channels
        return base * (2 if self.learn_sigma else 1)

    @property
    def emb_dim(self) -> int:
        return 4 * self.base_channels if self.time_embed_dim is None else self.time_embed_dim

    def level_channels(self, level: int) -> int:
        return self.base_channels * self.channel_mult[level]

    def level_resolution(self, level: int) -> int:
        return self.image_size // (2**level)

    def heads_for(self, channels: int) -> int:
        """Attention heads at a level with ``channels`` channels."""
        if self.head_channels is not None:
            return channels // self.head_channels
        return self.num_heads

    def level_recipe(self, level: int) -> tuple[str, ...]:
        """Block kinds of one unit at ``level`` (after applying ``attention_resolutions``)."""
        recipe = ("res",) if self.blocks is None else _parse_recipe(self.blocks[level], "blocks")
        if self.level_resolution(level) in self.attention_resolutions and "attn" not in recipe:
            recipe = (*recipe, "attn")
        return recipe

    def mid_recipe(self) -> tuple[str, ...]:
        return _parse_recipe(self.mid_blocks, "mid_blocks")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `DifforgeError` naming the first bad field."""
        _positive_int(self, "image_size")
        _positive_int(self, "in_channels")
        _positive_int(self, "base_channels")
        _positive_int(self, "num_res_blocks")
        _positive_int(self, "num_heads")
        _positive_int(self, "norm_groups")
        _positive_int(self, "convnext_mult")
        _positive_int(self, "cls_attn_tokens")
        if self.out_channels is not None:
            _positive_int(self, "out_channels")
        if self.head_channels is not None:
            _positive_int(self, "head_channels")
        if self.time_embed_dim is not None:
            _positive_int(self, "time_embed_dim")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise DifforgeError(f"UNetConfig.num_classes must be an int >= 0, got {self.num_classes!r}")
        if not isinstance(self.image_cond_channels, int) or self.image_cond_channels < 0:
            raise DifforgeError(
                f"UNetConfig.image_cond_channels must be an int >= 0, got {self.image_cond_channels!r}"
            )
        if self.multi_label and self.num_classes == 0:
            raise DifforgeError("UNetConfig.multi_label needs num_classes > 0")
        if self.cond_noise_embed and self.image_cond_channels == 0:
            raise DifforgeError("UNetConfig.cond_noise_embed needs image_cond_channels > 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise DifforgeError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.norm_eps <= 0:
            raise DifforgeError(f"UNetConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.time_freq_shift not in (0, 1):
            raise DifforgeError(f"UNetConfig.time_freq_shift must be 0 or 1, got {self.time_freq_shift!r}")
        if self.downsample_padding not in (0, 1):
            raise DifforgeError(
                f"UNetConfig.downsample_padding must be 0 or 1, got {self.downsample_padding!r}"
            )
        if self.resample not in RESAMPLE_KINDS:
            raise DifforgeError(
                f"UNetConfig.resample must be one of {', '.join(RESAMPLE_KINDS)}, got {self.resample!r}"
            )
        if not self.channel_mult or any(not isinstance(m, int) or m <= 0 for m in self.channel_mult):
            raise DifforgeError(f"UNetConfig.channel_mult must be positive ints, got {self.channel_mult!r}")
        downsamplings = self.num_levels - 1
        if self.image_size % (2**downsamplings) != 0:
            raise DifforgeError(
                f"UNetConfig.channel_mult has {self.num_levels} levels ({downsamplings} 2x "
                f"downsamplings) but image_size {self.image_size} is not divisible by "
                f"{2**downsamplings}; use fewer levels or a larger image_size"
            )
        reachable = [self.level_resolution(i) for i in range(self.num_levels)]
        for r in self.attention_resolutions:
            if r not in reachable:
                raise DifforgeError(
                    f"UNetConfig.attention_resolutions contains {r}, a resolution the network "
                    f"never reaches (its levels are {reachable})"
                )
        if self.blocks is not None and len(self.blocks) != self.num_levels:
            raise DifforgeError(
                f"UNetConfig.blocks has {len(self.blocks)} recipes but UNetConfig.channel_mult has "
                f"{self.num_levels} levels"
            )
        channels = [self.level_channels(i) for i in range(self.num_levels)]
        for level, ch in enumerate(channels):
            if ch % self.norm_groups != 0:
                raise DifforgeError(
                    f"UNetConfig.norm_groups={self.norm_groups} does not divide the {ch} channels "
                    f"of level {level}"
                )
        recipes = [(ch, self.level_recipe(i), "blocks") for i, ch in enumerate(channels)]
        recipes.append((channels[-1], self.mid_recipe(), "mid_blocks"))
        for ch, recipe, name in recipes:
            if recipe[0] not in CONV_KINDS and name == "blocks":
                raise DifforgeError(
                    f"UNetConfig.blocks recipe {','.join(recipe)!r} must start with 'res' or "
                    "'convnext' (the block that changes the channel count)"
                )
            attn_kinds = {"attn", "linear_attn", "cls_attn"}
            if attn_kinds.intersection(recipe):
                heads = self.heads_for(ch)
                if self.head_channels is not None and ch % self.head_channels != 0:
                    raise DifforgeError(
                        f"UNetConfig.head_channels={self.head_channels} does not divide the {ch} "
                        "channels of an attention level"
                    )
                if heads <= 0 or ch % heads != 0:
                    raise DifforgeError(
                        f"UNetConfig.num_heads={self.num_heads} does not divide the {ch} channels "
                        "of an attention level"
                    )
            if "cls_attn" in recipe and self.num_classes == 0:
                raise DifforgeError(
                    f"UNetConfig.{name} uses cls_attn, which attends to the class embedding: it needs "
                    "class conditioning (num_classes > 0, labelled data)"
                )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists) that `from_dict` reads back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Build a config from `to_dict` output; an unknown field raises `DifforgeError`."""
        if not isinstance(d, dict):
            raise DifforgeError(f"a UNet config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        for key in d:
            if key not in known:
                raise DifforgeError(
                    f"unknown UNetConfig field {key!r}; valid fields: {', '.join(sorted(known))}"
                )
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UNetConfig:
        """A named architecture, optionally with some fields overridden.

        Presets: ``tiny`` (tests), ``mnist`` (default CPU job: 32x32x1, 10 classes),
        ``small`` (CPU default for 32x32), ``ddpm-cifar10`` (Ho et al. 2020, 35.7M),
        ``iddpm-cifar10`` (Nichol & Dhariwal 2021, learned sigma, 52.5M) and
        ``adm-imagenet64`` (Dhariwal & Nichol 2021, class-conditional ImageNet 64x64).

        Overriding ``image_size`` alone rescales ``attention_resolutions`` so attention stays
        at the same depth (``mnist`` at 28x28 attends at 7x7, ``ddpm-cifar10`` at 64x64 at 32).
        """
        if name not in PRESETS:
            raise DifforgeError(f"unknown UNet preset {name!r}; valid presets: {', '.join(PRESETS)}")
        base = dict(PRESETS[name])
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        for key in overrides:
            if key not in known:
                raise DifforgeError(
                    f"unknown UNetConfig field {key!r}; valid fields: {', '.join(sorted(known))}"
                )
        size = overrides.get("image_size", base["image_size"])
        if size != base["image_size"] and "attention_resolutions" not in overrides:
            # Keep attention at the same depth of the network: 16 at 32x32 becomes 8 at 16x16.
            scaled = tuple(r * size / base["image_size"] for r in base["attention_resolutions"])
            if all(float(r).is_integer() for r in scaled):
                base["attention_resolutions"] = tuple(int(r) for r in scaled)
        base.update(overrides)
        return cls(**base)


def _parse_recipe(text: str, name: str) -> tuple[str, ...]:
    if not isinstance(text, str):
        raise DifforgeError(f"UNetConfig.{name} recipes must be strings like 'res,attn', got {text!r}")
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds:
        raise DifforgeError(f"UNetConfig.{name} has an empty recipe")
    for kind in kinds:
        if kind not in BLOCK_KINDS:
            raise DifforgeError(
                f"UNetConfig.{name} has unknown block kind {kind!r}; valid kinds: {', '.join(BLOCK_KINDS)}"
            )
    if not CONV_KINDS.intersection(kinds) and name == "mid_blocks":
        raise DifforgeError("UNetConfig.mid_blocks needs at least one 'res' or 'convnext' block")
    return kinds


def _positive_int(cfg: UNetConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DifforgeError(f"UNetConfig.{name} must be a positive int, got {value!r}")


_DDPM_CIFAR10: dict[str, Any] = dict(
    image_size=32,
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    num_heads=1,
    dropout=0.1,
    scale_shift=False,
    norm_eps=1e-6,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: 0.3M parameters, three levels, attention at 16x16.
    "tiny": dict(
        image_size=32,
        base_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        num_heads=2,
        norm_groups=8,
    ),
    # The default CPU training job: 32x32 MNIST, 10 classes, ~80+ images/s training on 2 cores.
    "mnist": dict(
        image_size=32,
        in_channels=1,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_heads=2,
        norm_groups=8,
        num_classes=10,
    ),
    # CPU default for 32x32 RGB: the DDPM layout at half width (diffusers (64,128,128,128)).
    "small": {**_DDPM_CIFAR10, "base_channels": 64, "dropout": 0.0},
    # Ho et al. 2020 CIFAR-10 (google/ddpm-cifar10-32): 35.7M parameters.
    "ddpm-cifar10": _DDPM_CIFAR10,
    # Nichol & Dhariwal 2021 CIFAR-10 (L_hybrid): learned sigma, 3 blocks, 52.5M parameters.
    "iddpm-cifar10": dict(
        image_size=32,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=3,
        attention_resolutions=(16, 8),
        num_heads=4,
        dropout=0.3,
        learn_sigma=True,
        scale_shift=True,
    ),
    # Dhariwal & Nichol 2021 class-conditional ImageNet 64x64 (ADM).
    "adm-imagenet64": dict(
        image_size=64,
        base_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        head_channels=64,
        dropout=0.1,
        learn_sigma=True,
        scale_shift=True,
        resample="resblock",
        num_classes=1000,
    ),
}
