"""Tests for the U-Net denoiser family (`difforge.nn`). Tiny configs; the whole file runs in
well under a minute on a 2-core CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from difforge.errors import DifforgeError
from difforge.nn import BLOCK_KINDS, PRESETS, UNet, UNetConfig
from difforge.nn.layers import LinearAttention, SelfAttention

B = 2


def tiny(**overrides: object) -> UNetConfig:
    return UNetConfig.preset("tiny", **overrides)


def randomized(model: UNet, seed: int = 0) -> UNet:
    """Re-draw every parameter: zero-initialised output layers would hide the inputs'
    influence (and the gradients) that these tests look for."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(cfg: UNetConfig, batch: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def param_count(cfg: UNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_every_block_kind_at_every_level(kind: str) -> None:
    first = kind if kind in ("res", "convnext") else f"res,{kind}"
    cfg = tiny(
        blocks=(first, first, first),
        mid_blocks=f"res,{kind},res" if kind not in ("res", "convnext") else kind,
        num_classes=3 if kind == "cls_attn" else 0,
    )
    model = UNet(cfg)
    x, t = inputs(cfg)
    labels = torch.tensor([0, 3]) if cfg.num_classes else None
    assert model(x, t, labels).shape == (B, 3, 32, 32)


@pytest.mark.parametrize(
    ("overrides", "channels"),
    [
        ({}, 3),
        ({"learn_sigma": True}, 6),
        ({"out_channels": 1}, 1),
        ({"out_channels": 2, "learn_sigma": True}, 4),
        ({"in_channels": 1}, 1),
        ({"resample": "resblock"}, 3),
        ({"scale_shift": False}, 3),
        ({"head_channels": 8}, 3),
        ({"channels_last": False}, 3),
    ],
)
def test_output_channels(overrides: dict[str, object], channels: int) -> None:
    cfg = tiny(**overrides)
    x, t = inputs(cfg)
    out = UNet(cfg)(x, t)
    assert out.shape == (B, channels, 32, 32)
    assert out.dtype == torch.float32


def test_non_default_image_size_and_scalar_float_timestep() -> None:
    cfg = tiny(image_size=16, attention_resolutions=(8,))
    model = randomized(UNet(cfg)).eval()
    x, _ = inputs(cfg)
    out = model(x, torch.tensor(10.0))
    assert out.shape == (B, 3, 16, 16)
    torch.testing.assert_close(out, model(x, torch.tensor([10, 10])))


# --------------------------------------------------------------------------- conditioning


def test_class_labels_and_null_label() -> None:
    cfg = tiny(num_classes=4)
    model = randomized(UNet(cfg)).eval()
    assert model.null_label == 4
    x, t = inputs(cfg)
    with torch.no_grad():
        labelled = model(x, t, torch.tensor([1, 2]))
        null = model(x, t, torch.full((B,), model.null_label))
        default = model(x, t)
        other = model(x, t, torch.tensor([3, 2]))
    assert labelled.shape == (B, 3, 32, 32)
    assert not torch.allclose(labelled, null)
    torch.testing.assert_close(default, null)  # no labels = null label
    assert not torch.allclose(labelled[0], other[0])
    torch.testing.assert_close(labelled[1], other[1])  # no mixing across the batch


def test_multi_label() -> None:
    cfg = tiny(num_classes=5, multi_label=True)
    model = randomized(UNet(cfg)).eval()
    x, t = inputs(cfg)
    hot = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        out = model(x, t, hot)
        null = model(x, t, torch.zeros(B, 5))
        default = model(x, t)
    assert out.shape == (B, 3, 32, 32)
    assert not torch.allclose(out[0], null[0])
    torch.testing.assert_close(out[1], null[1])  # all-zero row = null condition
    torch.testing.assert_close(default, null)


@pytest.mark.parametrize("side", [8, 32, 64])
def test_image_condition_is_used(side: int) -> None:
    cfg = tiny(image_cond_channels=2)
    model = randomized(UNet(cfg)).eval()
    x, t = inputs(cfg)
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(B, 2, side, side, generator=g)
    with torch.no_grad():
        out = model(x, t, image_cond=cond)
        other = model(x, t, image_cond=cond.flip(-1))
    assert out.shape == (B, 3, 32, 32)
    assert not torch.allclose(out, other)


def test_missing_or_unexpected_conditioning_is_an_error() -> None:
    x, t = inputs(tiny())
    with pytest.raises(DifforgeError, match="image_cond"):
        UNet(tiny(image_cond_channels=1))(x, t)
    with pytest.raises(DifforgeError, match="image_cond"):
        UNet(tiny())(x, t, image_cond=x)
    with pytest.raises(DifforgeError, match="class_labels"):
        UNet(tiny())(x, t, torch.tensor([0, 1]))


def everything(**overrides: Any) -> UNetConfig:
    """tiny with every block kind, class and image conditioning, learned sigma, resblock resampling."""
    return tiny(
        blocks=("res,linear_attn,chn_attn", "convnext,cls_attn", "res,attn"),
        num_classes=3,
        image_cond_channels=1,
        learn_sigma=True,
        resample="resblock",
        **overrides,
    )


def test_everything_at_once() -> None:
    cfg = everything(dropout=0.1)
    model = UNet(cfg)
    x, t = inputs(cfg)
    out = model(x, t, torch.tensor([0, 3]), torch.randn(B, 1, 16, 16))
    assert out.shape == (B, 6, 32, 32)


# --------------------------------------------------------------------------- presets


def test_preset_parameter_counts() -> None:
    assert param_count(UNetConfig.preset("ddpm-cifar10")) == 35_746_307  # = google/ddpm-cifar10-32
    assert round(param_count(UNetConfig.preset("iddpm-cifar10")) / 1e6, 1) == 52.5
    assert param_count(UNetConfig.preset("small")) == 8_952_067  # = diffusers (64,128,128,128)
    assert round(param_count(UNetConfig.preset("adm-imagenet64")) / 1e6) == 296
    assert param_count(UNetConfig.preset("tiny")) < 500_000
    assert 1_000_000 <= param_count(UNetConfig.preset("mnist")) <= 3_000_000


def test_ddpm_preset_matches_diffusers_parameter_count() -> None:
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DModel(
            sample_size=32,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=None,
            norm_eps=1e-6,
        )
    assert sum(p.numel() for p in ref.parameters()) == param_count(UNetConfig.preset("ddpm-cifar10"))


def test_mnist_preset_shape() -> None:
    cfg = UNetConfig.preset("mnist")
    assert (cfg.image_size, cfg.in_channels, cfg.num_classes) == (32, 1, 10)
    x, t = inputs(cfg)
    assert UNet(cfg)(x, t, torch.tensor([3, 10])).shape == (B, 1, 32, 32)


def test_preset_errors_and_overrides() -> None:
    with pytest.raises(DifforgeError, match="ddpm-cifar10") as info:
        UNetConfig.preset("cifar")
    for name in PRESETS:
        assert name in str(info.value)
    with pytest.raises(DifforgeError, match="channel_multt"):
        UNetConfig.preset("tiny", channel_multt=(1,))
    assert UNetConfig.preset("small", num_classes=7).num_classes == 7


def test_preset_image_size_override_rescales_attention() -> None:
    assert UNetConfig.preset("mnist", image_size=28).attention_resolutions == (7,)
    assert UNetConfig.preset("ddpm-cifar10", image_size=64).attention_resolutions == (32,)
    explicit = UNetConfig.preset("ddpm-cifar10", image_size=64, attention_resolutions=(16,))
    assert explicit.attention_resolutions == (16,)
    with pytest.raises(DifforgeError, match="channel_mult"):
        UNetConfig.preset("small", image_size=28)  # 28 is not divisible by 2**3


# --------------------------------------------------------------------------- config


def test_config_dict_round_trip() -> None:
    cfg = tiny(blocks=("res", "convnext,cls_attn", "res,attn"), num_classes=3)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert UNetConfig.from_dict(d) == cfg
    assert isinstance(UNetConfig.from_dict(d).channel_mult, tuple)


def test_config_from_dict_unknown_field() -> None:
    d = tiny().to_dict()
    d["num_layers"] = 3
    with pytest.raises(DifforgeError, match="num_layers"):
        UNetConfig.from_dict(d)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"channel_mult": (1, 2, 2, 2, 2, 2, 2)}, "channel_mult"),
        ({"image_size": 20, "channel_mult": (1, 2, 2, 2)}, "channel_mult"),
        ({"attention_resolutions": (4,)}, "attention_resolutions"),
        ({"num_heads": 3}, "num_heads"),
        ({"head_channels": 12}, "head_channels"),
        ({"blocks": ("res", "res,transformer", "res")}, "blocks"),
        ({"blocks": ("res", "res")}, "blocks"),
        ({"blocks": ("attn,res", "res", "res")}, "blocks"),
        ({"mid_blocks": "res,fft"}, "mid_blocks"),
        ({"blocks": ("res,cls_attn", "res", "res")}, "blocks"),
        ({"norm_groups": 7}, "norm_groups"),
        ({"resample": "pixelshuffle"}, "resample"),
        ({"base_channels": 0}, "base_channels"),
        ({"dropout": 1.5}, "dropout"),
        ({"multi_label": True}, "multi_label"),
        ({"num_classes": -1}, "num_classes"),
    ],
)
def test_bad_config_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        UNet(tiny(**overrides))


def test_bad_config_caught_at_model_construction_after_mutation() -> None:
    cfg = tiny()
    cfg.num_heads = 5
    with pytest.raises(DifforgeError, match="num_heads"):
        UNet(cfg)


# --------------------------------------------------------------------------- behaviour


def test_eval_is_deterministic_and_train_dropout_is_not() -> None:
    cfg = tiny(dropout=0.5)
    model = randomized(UNet(cfg))
    x, t = inputs(cfg)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t), rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x, t), model(x, t))


def test_fresh_model_predicts_zero() -> None:
    cfg = tiny()
    x, t = inputs(cfg)
    assert torch.count_nonzero(UNet(cfg)(x, t)) == 0  # zero_init output layer


def test_gradients_reach_every_parameter() -> None:
    cfg = everything()
    model = randomized(UNet(cfg))
    x, t = inputs(cfg)
    out = model(x, t, torch.tensor([0, 2]), torch.randn(B, 1, 32, 32))
    out.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not dead


def test_gradient_checkpointing_matches() -> None:
    cfg = tiny(num_classes=3)
    x, t = inputs(cfg)
    grads = []
    for ckpt in (False, True):
        model = randomized(UNet(tiny(num_classes=3, gradient_checkpointing=ckpt)))
        model(x, t, torch.tensor([1, 3])).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_channels_last_matches_contiguous() -> None:
    x, t = inputs(tiny())
    outs = []
    state = randomized(UNet(tiny(channels_last=False))).state_dict()
    for cl in (False, True):
        model = UNet(tiny(channels_last=cl, num_heads=2)).eval()
        model.load_state_dict(state)
        if cl:
            conv = model.conv_in.weight
            assert conv.is_contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            outs.append(model(x, t))
    assert outs[1].is_contiguous()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_no_data_dependent_host_sync_in_forward() -> None:
    """On the meta device any ``.item()``/``nonzero``/``bool(tensor)`` would raise."""
    cfg = tiny(num_classes=3, image_cond_channels=1, learn_sigma=True)
    with torch.device("meta"):
        model = UNet(cfg)
        x = torch.empty(4, 3, 32, 32)
        out = model(
            x, torch.empty(4, dtype=torch.long), torch.empty(4, dtype=torch.long), torch.empty(4, 1, 8, 8)
        )
    assert out.shape == (4, 6, 32, 32) and out.device.type == "meta"


def test_single_head_folded_attention_is_exact() -> None:
    """One head: the folded projections give the output and every gradient of the plain
    q/k/v path (float64, random non-zero biases, both in the same module)."""
    torch.manual_seed(0)
    attn = SelfAttention(16, tiny(num_heads=1, zero_init=False)).double()
    assert attn.heads == 1 and attn.foldable
    h = torch.randn(3, 20, 16, dtype=torch.float64, requires_grad=True)
    results = []
    for path in (attn.multi_head, attn.single_head):
        attn.zero_grad(set_to_none=True)
        out = path(h)
        (grad_h,) = torch.autograd.grad(out.sin().sum(), h, retain_graph=True)
        out.sin().sum().backward()
        results.append((out, grad_h, {n: p.grad for n, p in attn.named_parameters()}))
    (out_a, gh_a, gp_a), (out_b, gh_b, gp_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh_b, gh_a, rtol=1e-10, atol=1e-12)
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
        torch.testing.assert_close(gp_b[name], gp_a[name], rtol=1e-10, atol=1e-12)
    assert not gp_b["qkv.bias"][16:32].any()  # the key bias: exactly zero, its true gradient


def test_multi_head_and_linear_attention_do_not_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fold(self: SelfAttention, h: torch.Tensor) -> torch.Tensor:
        raise AssertionError("folded path taken")

    monkeypatch.setattr(SelfAttention, "single_head", no_fold)
    x = torch.randn(2, 16, 4, 4)
    for attn in (SelfAttention(16, tiny(num_heads=2)), LinearAttention(16, tiny(num_heads=1))):
        assert attn(x, torch.zeros(2, 1)).shape == x.shape


@pytest.mark.parametrize("heads", [1, 2])
def test_bf16_autocast(heads: int) -> None:
    cfg = tiny(num_heads=heads)
    model = randomized(UNet(cfg)).eval()
    x, t = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


# --------------------------------------------------------------------------- persistence


def test_save_and_load_round_trip_bit_exact(tmp_path: Path) -> None:
    cfg = tiny(num_classes=3, learn_sigma=True)
    model = randomized(UNet(cfg)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.config == cfg
    assert not loaded.training
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b)
    x, t = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(x, t, torch.tensor([0, 3])), loaded(x, t, torch.tensor([0, 3])))


def test_from_pretrained_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DifforgeError, match="config.json"):
        UNet.from_pretrained(tmp_path)
    UNet(tiny()).save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"

    bad = tmp_path / "damaged"
    shutil.copytree(tmp_path / "ok", bad)
    (bad / "model.safetensors").write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DifforgeError, match="damaged.*model.safetensors"):
        UNet.from_pretrained(bad)

    (bad / "model.safetensors").unlink()
    with pytest.raises(DifforgeError, match="model.safetensors"):
        UNet.from_pretrained(bad)

    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "ok", wrong)
    (wrong / "config.json").write_text(json.dumps(tiny(base_channels=32).to_dict()))
    with pytest.raises(DifforgeError, match="model.safetensors"):
        UNet.from_pretrained(wrong)

    (wrong / "config.json").write_text("{not json")
    with pytest.raises(DifforgeError, match="config.json"):
        UNet.from_pretrained(wrong)


# --------------------------------------------------------------------------- compile


def _compile_available() -> bool:
    try:
        import torch._dynamo  # noqa: F401
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        return False
    return True


def _compile_check(backend: str, heads: int = 1) -> None:
    # Two levels (conv downsample, transposed-conv upsample), attention (one head, folded, as in
    # the presets) and class embedding in the bottleneck: every op kind of the presets, at the
    # smallest size (compile time scales with the number of kernels).
    cfg = tiny(
        num_heads=heads,
        image_size=16,
        base_channels=8,
        channel_mult=(1, 2),
        norm_groups=4,
        attention_resolutions=(),
        mid_blocks="res,attn",
        num_classes=3,
    )
    model = randomized(UNet(cfg)).eval()
    x, t = inputs(cfg)
    labels = torch.tensor([0, 3])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, t, labels)
        compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
        out = compiled(x, t, labels)
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("heads", [1, 2])
def test_compile_graph_capture_matches_eager(heads: int) -> None:
    """Dynamo captures the whole forward as one graph (no breaks); quick backend."""
    pytest.importorskip("torch._dynamo")
    _compile_check("aot_eager", heads)


@pytest.mark.slow
@pytest.mark.skipif(not _compile_available(), reason="torch.compile / a C++ compiler unavailable")
def test_compiled_inductor_matches_eager() -> None:
    """Full inductor compile (~20 s on a 2-core CPU, hence `slow`)."""
    _compile_check("inductor")
