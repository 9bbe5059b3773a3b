"""diffusers interoperability: `difforge import` of UNet2DModel folders and `difforge export`
of runs as DDPMPipeline folders, checked against diffusers itself (no downloads: every model
is built here with random weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import one_line_error

from difforge.cli import main
from difforge.cold import ColdConfig
from difforge.diffusion import DiffusionConfig
from difforge.nn import UNet, UNetConfig
from difforge.runs.config import DataInfo, RunConfig, TrainConfig
from difforge.runs.models import load_model
from difforge.runs.storage import load_tensors, write_checkpoint
from difforge.sampling import ddpm

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-5

# The DDPM CIFAR-10 model's configuration (google/ddpm-cifar10-32): [sin | cos] features with
# freq_shift 1, TensorFlow's SAME padding of the downsampling convolutions.
DDPM_CIFAR10 = dict(
    sample_size=32,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=None,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    norm_eps=1e-6,
    dropout=0.1,
)
SMALL = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=16,
    norm_num_groups=8,
)
UNETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ddpm-cifar10": (DDPM_CIFAR10, {}),
    "small": (SMALL, {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 200}),
    "class-conditional": (
        {**SMALL, "num_class_embeds": 5, "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8},
        {"beta_start": 0.0005, "beta_end": 0.03, "prediction_type": "v_prediction"},
    ),
    "learned-sigma": (
        {**SMALL, "out_channels": 6, "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8},
        {
            "variance_type": "learned_range",
            "beta_schedule": "scaled_linear",
            "beta_start": 1e-4,
            "beta_end": 0.02,
        },
    ),
    "grey, no bottleneck attention": (
        {**SMALL, "in_channels": 1, "out_channels": 1, "add_attention": False, "attention_head_dim": 32},
        {"prediction_type": "sample", "variance_type": "fixed_large"},
    ),
}


def make_pipeline_folder(folder: Path, unet_kwargs: dict[str, Any], scheduler_kwargs: dict[str, Any]) -> Any:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**unet_kwargs).eval()
    scheduler = diffusers.DDPMScheduler(**scheduler_kwargs)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    return unet


def inputs(
    channels: int, size: int, classes: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, channels, size, size, generator=generator)
    t = torch.tensor([0, 37, 199])
    labels = torch.tensor([0, 3, 4]) % classes if classes else None
    return x, t, labels


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error < TOL, f"{what}: relative error {error:.2e}"


@pytest.mark.parametrize("name", list(UNETS))
def test_import_computes_what_diffusers_computes(name: str, tmp_path: Path) -> None:
    unet_kwargs, scheduler_kwargs = UNETS[name]
    unet = make_pipeline_folder(tmp_path / "pipe", unet_kwargs, scheduler_kwargs)
    assert main(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "run")]) == 0
    config = RunConfig.load(tmp_path / "run")
    ours = load_model(tmp_path / "run", config).eval()
    x, t, labels = inputs(unet.config.in_channels, unet.config.sample_size, unet.config.num_class_embeds or 0)
    with torch.no_grad():
        expected = unet(x, t, class_labels=labels).sample
        actual = ours(x, t, class_labels=labels)
    assert_close(actual, expected, name)
    # the schedule is diffusers' own, to the precision of its float32 cumulative product
    theirs = diffusers.DDPMScheduler(**scheduler_kwargs).alphas_cumprod.double()
    ours_alpha_bar = torch.from_numpy(config.diffusion.build().schedule.alphas_cumprod)
    torch.testing.assert_close(ours_alpha_bar, theirs, rtol=1e-4, atol=0)
    if name == "learned-sigma":
        assert config.diffusion.variance == "learned_range" and config.model.learn_sigma


def test_import_of_a_unet_folder_finds_the_scheduler_beside_it(tmp_path: Path) -> None:
    make_pipeline_folder(tmp_path / "pipe", SMALL, {})
    assert main(["import", str(tmp_path / "pipe" / "unet"), "--out", str(tmp_path / "run")]) == 0
    assert RunConfig.load(tmp_path / "run").diffusion.num_timesteps == 1000


def test_imported_run_samples_evaluates_and_fine_tunes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grey = {**SMALL, "in_channels": 1, "out_channels": 1, "sample_size": 8, "block_out_channels": (16, 32)}
    grey.update(
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")
    )
    make_pipeline_folder(tmp_path / "pipe", grey, {"num_train_timesteps": 100})
    run, child = tmp_path / "run", tmp_path / "child"
    assert main(["import", str(tmp_path / "pipe"), "--out", str(run)]) == 0
    assert main(["sample", str(run), "-n", "2", "--steps", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["info", str(run)]) == 0
    nll = ["eval", "nll", str(run), "--data", "digits", "-n", "4", "--respace", "5", "--quiet"]
    assert main(nll) == 0
    capsys.readouterr()
    assert "--data" in one_line_error(capsys, nll[:3])
    command = [
        "train",
        "digits",
        "--init-from",
        str(run),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--out",
        str(child),
    ]
    assert (
        main([*command, "--no-conditional", "--no-progress", "--preview-images", "2", "--preview-steps", "2"])
        == 0
    )
    assert RunConfig.load(child).model == RunConfig.load(run).model


# ---- export ------------------------------------------------------------------------------------


def write_run(folder: Path, model: UNetConfig, process: DiffusionConfig | ColdConfig | None = None) -> UNet:
    """A run folder holding a network with random weights (no zero-initialised layers)."""
    torch.manual_seed(0)
    network = UNet(model).eval()
    with torch.no_grad():
        for parameter in network.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)
    classes = [f"c{i}" for i in range(model.num_classes)]
    train = TrainConfig(data="digits", image_size=model.image_size, channels=model.in_channels)
    config = RunConfig(
        model, process or DiffusionConfig(), train, DataInfo(source="digits", class_names=classes)
    )
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config.to_json())
    state = network.state_dict()
    files = {name: (state, {}) for name in ("model.safetensors", "ema.safetensors")}
    write_checkpoint(folder, 1, {**files, "trainer.safetensors": ({"step": torch.ones(1)}, {})}, keep=1)
    return network


PRESETS = {
    "tiny": (UNetConfig.preset("tiny"), DiffusionConfig()),
    "mnist": (UNetConfig.preset("mnist"), DiffusionConfig(schedule="cosine", prediction="v")),
    "small": (UNetConfig.preset("small"), DiffusionConfig(variance="fixed_large", prediction="x0")),
    # the two CIFAR-10 networks at 16 px: the same tensors (35.7M, 52.5M), a quarter of the work
    "ddpm-cifar10": (UNetConfig.preset("ddpm-cifar10", image_size=16), DiffusionConfig()),
    "iddpm-cifar10": (
        UNetConfig.preset("iddpm-cifar10", image_size=16),
        DiffusionConfig(schedule="cosine", variance="learned_range", loss="hybrid", num_timesteps=400),
    ),
}


def diffusers_trajectory(scheduler: Any, network: Any, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' DDPM loop (DDPMPipeline's) over ``network(x, t)``."""
    generator = torch.Generator().manual_seed(3)
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        with torch.no_grad():
            output = network(x, t)
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("name", list(PRESETS))
def test_export_loads_in_diffusers_and_computes_the_same(name: str, tmp_path: Path) -> None:
    model, process = PRESETS[name]
    network = write_run(tmp_path / "run", model, process)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "export"))
    exported = load_tensors(tmp_path / "export/unet/diffusion_pytorch_model.safetensors")
    assert set(pipe.unet.state_dict()) == set(exported)
    pipe.unet.eval()
    x, t, labels = inputs(model.in_channels, model.image_size, model.num_classes)
    t = t * process.num_timesteps // 200
    with torch.no_grad():
        assert_close(network(x, t, class_labels=labels), pipe.unet(x, t, class_labels=labels).sample, name)

    # DDPM sampling, 4 steps from the same noise, with the same step noise
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(2, model.in_channels, model.image_size, model.image_size, generator=generator)
    labels = labels[:2] if labels is not None else None

    def ours_net(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return network(x, t.reshape(-1).expand(x.shape[0]), class_labels=labels)

    def theirs_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return pipe.unet(x, t, class_labels=labels).sample

    theirs = diffusers_trajectory(pipe.scheduler, theirs_net, noise, 4)
    timesteps = pipe.scheduler.timesteps.numpy()
    with torch.no_grad():
        ours = ddpm(ours_net, process.build(), noise, timesteps, generator=torch.Generator().manual_seed(3))
    # the exported scheduler config is difforge's process: the same network in both loops
    # Tolerance 1e-4, not 1e-5: diffusers keeps its tables in float32, and the first step's
    # x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) multiplies every float32 rounding
    # by 1 / sqrt(alpha_bar_T) ~ 160 (measured: 3e-6 to 6e-5, the largest for learned_range).
    same = diffusers_trajectory(pipe.scheduler, ours_net, noise, 4)
    error = float((ours - same).abs().max() / same.abs().max())
    assert error < 1e-4, f"{name} DDPM steps: {error:.2e}"
    # diffusers end to end: its U-Net in its loop
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error < 1e-4, f"{name} DDPM trajectory through diffusers' U-Net: {error:.2e}"


def test_unconditional_export_samples_with_ddpm_pipeline(tmp_path: Path) -> None:
    write_run(
        tmp_path / "run",
        UNetConfig.preset("tiny", image_size=16, in_channels=1),
        DiffusionConfig(num_timesteps=50),
    )
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--weights", "raw"]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "export"))
    images = pipe(
        batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)
    )
    assert images.images.shape == (2, 16, 16, 1)


def test_round_trip_gives_the_same_run_bit_for_bit(tmp_path: Path) -> None:
    write_run(tmp_path / "run", UNetConfig.preset("mnist"), DiffusionConfig(schedule="quadratic"))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    assert main(["import", str(tmp_path / "export"), "--out", str(tmp_path / "back")]) == 0
    before, after = (
        load_tensors(tmp_path / "run/ema.safetensors"),
        load_tensors(tmp_path / "back/ema.safetensors"),
    )
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert RunConfig.load(tmp_path / "back").to_dict() == RunConfig.load(tmp_path / "run").to_dict()


# ---- refusals ----------------------------------------------------------------------------------

REFUSED_MODELS = {
    "convnext": (UNetConfig.preset("tiny", blocks=("res", "convnext", "res")), "'convnext' block"),
    "linear attention": (
        UNetConfig.preset("tiny", blocks=("res", "res,linear_attn", "res")),
        "'linear_attn'",
    ),
    "channel attention": (UNetConfig.preset("tiny", blocks=("res,chn_attn", "res", "res")), "'chn_attn'"),
    "image conditioning": (UNetConfig.preset("tiny", image_cond_channels=3), "image conditioning"),
    "resblock resampling": (UNetConfig.preset("tiny", resample="resblock"), "resblock"),
    "heads of two widths": (UNetConfig.preset("tiny", attention_resolutions=(32, 16)), "different widths"),
}


@pytest.mark.parametrize("name", list(REFUSED_MODELS))
def test_export_refuses_what_diffusers_cannot_hold(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, words = REFUSED_MODELS[name]
    write_run(tmp_path / "run", model)
    line = one_line_error(capsys, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert words in line and "the nearest exportable preset is tiny" in line
    assert not (tmp_path / "export").exists()


def test_export_refuses_a_cold_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "run", UNetConfig.preset("tiny"), ColdConfig())
    line = one_line_error(capsys, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert "cold run" in line
    assert not (tmp_path / "export").exists()


def test_export_refuses_an_existing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "run", UNetConfig.preset("tiny"))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "keep.txt").write_text("mine")
    line = one_line_error(capsys, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    assert "already exists" in line
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["keep.txt"]


def test_import_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"

    def refused(folder: Path) -> str:
        line = one_line_error(capsys, ["import", str(folder), "--out", str(out)])
        assert not out.exists()
        return line

    (tmp_path / "empty").mkdir()
    assert "neither model_index.json nor config.json" in refused(tmp_path / "empty")
    assert "does not exist" in refused(tmp_path / "nowhere")

    make_pipeline_folder(tmp_path / "pickle", SMALL, {})
    unet = tmp_path / "pickle" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    line = refused(tmp_path / "pickle")
    assert "pickle" in line and "safe_serialization=True" in line

    make_pipeline_folder(
        tmp_path / "skip",
        {
            **SMALL,
            "down_block_types": ("DownBlock2D", "AttnSkipDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnSkipUpBlock2D", "UpBlock2D"),
        },
        {},
    )
    line = refused(tmp_path / "skip")
    assert "AttnSkipDownBlock2D" in line and "AttnSkipUpBlock2D" in line

    make_pipeline_folder(tmp_path / "latent", {**SMALL, "in_channels": 4, "out_channels": 4}, {})
    assert "in_channels=4" in refused(tmp_path / "latent")

    make_pipeline_folder(tmp_path / "zero-snr", SMALL, {"rescale_betas_zero_snr": True})
    assert "rescale_betas_zero_snr" in refused(tmp_path / "zero-snr")

    make_pipeline_folder(tmp_path / "mismatch", {**SMALL, "out_channels": 6}, {})
    assert "learned_range" in refused(tmp_path / "mismatch")

    make_pipeline_folder(tmp_path / "cut", SMALL, {})
    weights = tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "damaged" in refused(tmp_path / "cut")

    make_pipeline_folder(tmp_path / "bad-json", SMALL, {})
    (tmp_path / "bad-json" / "unet" / "config.json").write_text("{not json")
    assert "damaged" in refused(tmp_path / "bad-json")

    make_pipeline_folder(tmp_path / "no-scheduler", SMALL, {})
    (tmp_path / "no-scheduler" / "scheduler" / "scheduler_config.json").unlink()
    assert "no scheduler config" in refused(tmp_path / "no-scheduler")

    make_pipeline_folder(tmp_path / "edited", SMALL, {})
    config = tmp_path / "edited" / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layers_per_block": 2}))
    assert "does not fit" in refused(tmp_path / "edited")


def test_the_class_conditional_recipe_of_docs_interop_runs(tmp_path: Path) -> None:
    write_run(tmp_path / "run", UNetConfig.preset("mnist"), DiffusionConfig(num_timesteps=100))
    exported = str(tmp_path / "export")
    assert main(["export", str(tmp_path / "run"), "--out", exported]) == 0
    unet = diffusers.UNet2DModel.from_pretrained(exported, subfolder="unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(exported, subfolder="scheduler")
    assert unet.config.num_class_embeds == 11  # ten classes and the null label
    scheduler.set_timesteps(2)
    x, y = torch.randn(8, 1, 32, 32), torch.tensor([3] * 8)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=y).sample, t, x).prev_sample
    assert x.shape == (8, 1, 32, 32) and torch.isfinite(x).all()
