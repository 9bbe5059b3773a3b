"""Every knob from the command line: model flags on top of a preset, beta endpoints and custom
betas, `train --dry-run` and the architecture `info` prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error

from difforge.cli import main
from difforge.nn import UNetConfig
from difforge.nn.summary import forward_flops, parameter_count
from difforge.runs import RunConfig

pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")

FAST = ["--steps", "1", "--batch-size", "4", "--no-progress", "--no-tensorboard", "--preview-images", "2",
        "--preview-steps", "2", "--timesteps", "50", "--warmup-steps", "0"]  # fmt: skip

COMBINATIONS = {
    "widths and depth": (
        ["--base-channels", "24", "--channel-mult", "1,2", "--num-res-blocks", "2", "--attention-res", "8",
         "--norm-groups", "8"],
        dict(base_channels=24, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(8,),
             norm_groups=8),
    ),
    "recipes": (
        ["--channel-mult", "1,2,2", "--blocks", "res/convnext,linear_attn/res,cls_attn,chn_attn",
         "--mid-blocks", "res,res", "--attention-res", "none", "--head-channels", "16",
         "--convnext-mult", "3", "--cls-attn-tokens", "2"],
        dict(channel_mult=(1, 2, 2), blocks=("res", "convnext,linear_attn", "res,cls_attn,chn_attn"),
             mid_blocks="res,res", attention_resolutions=(), head_channels=16, convnext_mult=3,
             cls_attn_tokens=2),
    ),
    "embedding and regularisation": (
        ["--dropout", "0.2", "--time-embed-dim", "96", "--no-scale-shift", "--resample", "resblock",
         "--gradient-checkpointing", "--num-heads", "4"],
        dict(dropout=0.2, time_embed_dim=96, scale_shift=False, resample="resblock",
             gradient_checkpointing=True, num_heads=4),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_model_flags_build_the_network_python_builds(name: str, tmp_path: Path, capsys) -> None:
    flags, fields = COMBINATIONS[name]
    run = tmp_path / "run"
    assert main(["train", "digits", "--image-size", "16", *FAST, *flags, "--out", str(run)]) == 0
    saved = RunConfig.load(run).model
    expected = UNetConfig.preset("mnist", image_size=16, num_classes=10, **fields)
    assert saved == expected
    assert parameter_count(saved) == parameter_count(expected)
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{parameter_count(expected) / 1e6:.2f}M parameters" in out
    assert f"{forward_flops(expected) / 1e9:.3g} GFLOPs per 16x16 image" in out


def test_dry_run_prints_the_architecture_and_writes_nothing(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train", "digits", "--image-size", "16", "--channel-mult", "1,2", "--attention-res", "8"]
    assert main([*argv, "--dry-run", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "nothing trained, nothing written" in out
    assert "level 1  8x8  64 ch  down 1 x res,attn  up 2 x res,attn, 2 heads" in out
    assert "bottleneck  8x8  64 ch  res,attn,res" in out
    assert not run.exists()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--attention-res", "2"], "--attention-res contains 2, a resolution the network never reaches"),
        (["--channel-mult", "1,2"], "they are the mnist preset's: give --attention-res"),
        (
            ["--channel-mult", "1,2,2", "--blocks", "res/res"],
            "--blocks has 2 recipes but --channel-mult has 3",
        ),
        (["--num-heads", "3"], "--num-heads=3 does not divide the 64 channels"),
        (["--head-channels", "48"], "--head-channels=48 does not divide"),
        (["--blocks", "res/res,mlp/res"], "unknown block kind 'mlp'; valid kinds: res, convnext"),
        (["--resample", "pixelshuffle"], "--resample must be one of conv, resblock"),
        (["--channel-mult", "1,2,x"], "--channel-mult: expected whole numbers"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--beta-start", "0", "--beta-end", "0.02"], "--beta-start must be a number in (0, 1)"),
        (["--beta-start", "0.02", "--beta-end", "0.01"], "--beta-start 0.02 must be below --beta-end 0.01"),
        (["--beta-end", "1.2"], "--beta-end must be a number in (0, 1)"),
        (["--schedule", "cosine", "--beta-end", "0.01"], "the cosine schedule has none"),
    ],
)
def test_bad_knobs_are_one_line_errors(flags: list[str], words: str, tmp_path: Path, capsys) -> None:
    line = one_line_error(capsys, ["train", "digits", *flags, "--dry-run", "--out", str(tmp_path / "run")])
    assert words in line, line


def test_model_flags_do_not_change_a_resumed_or_parent_run(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "digits", "--image-size", "16", *FAST, "--out", str(run)]) == 0
    capsys.readouterr()
    resumed = ["train", "--resume", "--out", str(run), "--base-channels", "16"]
    assert "--base-channels: when resuming the network is the run's own" in one_line_error(capsys, resumed)
    child = ["train", "digits", "--init-from", str(run), "--dropout", "0.1", "--out", str(tmp_path / "child")]
    assert "--dropout: with --init-from the network is the run's own" in one_line_error(capsys, child)


def test_beta_endpoints_and_custom_betas_reach_the_run(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train", "digits", "--image-size", "16", *FAST, "--beta-start", "5e-3", "--beta-end", "9e-3"]
    assert main([*argv, "--out", str(run)]) == 0
    process = RunConfig.load(run).diffusion
    assert (process.beta_start, process.beta_end) == (5e-3, 9e-3)
    np.testing.assert_allclose(process.build().schedule.betas, np.linspace(5e-3, 9e-3, 50), rtol=0, atol=0)

    betas = np.linspace(1e-3, 0.05, 40)
    text = tmp_path / "betas.txt"
    text.write_text(", ".join(repr(float(b)) for b in betas))
    custom = tmp_path / "custom"
    argv = ["train", "digits", "--image-size", "16", *[a for a in FAST if a not in ("--timesteps", "50")]]
    assert main([*argv, "--betas", str(text), "--out", str(custom)]) == 0
    saved = RunConfig.load(custom).diffusion
    assert saved.schedule == "custom" and saved.num_timesteps == 40
    np.testing.assert_array_equal(saved.build().schedule.betas, betas)
    np.save(tmp_path / "betas.npy", betas)
    dry = [*argv, "--betas", str(tmp_path / "betas.npy"), "--dry-run", "--out", str(tmp_path / "npy")]
    assert main(dry) == 0
    capsys.readouterr()

    (tmp_path / "falling.txt").write_text("0.02 0.01 0.03")
    bad = {
        "falling.txt": "non-decreasing",
        "missing.txt": "no such file",
        "betas.txt --timesteps 50": "holds 40 betas, --timesteps says 50",
        "betas.txt --schedule linear": "drop --schedule",
    }
    (tmp_path / "words.txt").write_text("0.1 zero")
    bad["words.txt"] = "not a list of numbers"
    for spec, words in bad.items():
        name, *more = spec.split()
        line = one_line_error(
            capsys, ["train", "digits", "--betas", str(tmp_path / name), *more, "--dry-run"]
        )
        assert words in line, line


def test_train_help_is_grouped(capsys) -> None:
    from difforge.cli import _TRAIN_GROUPS, _TRAIN_HELP

    grouped = [name for names in _TRAIN_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(_TRAIN_HELP)  # every train flag in exactly one section
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    sections = [
        "data and conditioning:",
        "model (the preset",
        "process:",
        "optimisation:",
        "previews:",
        "checkpoints and logs:",
    ]
    assert all(s in out for s in sections)
    model_section = out.split("model (the preset")[1].split("\nprocess:\n")[0]
    assert "--channel-mult" in model_section and "--attention-res" in model_section


def test_preview_switches(tmp_path: Path, capsys) -> None:
    base = ["train", "digits", "--image-size", "16", *FAST]
    none = tmp_path / "none"
    assert main([*base, "--no-previews", "--out", str(none)]) == 0
    assert not list(none.glob("samples/*.png"))
    epochs = tmp_path / "epochs"
    # 1797 digits in batches of 64: 29 steps an epoch (the last batch is dropped: 28)
    argv = [a if a != "1" else "60" for a in base]
    assert main([*argv, "--batch-size", "64", "--sample-every-epoch", "--out", str(epochs)]) == 0
    grids = sorted(p.name for p in (epochs / "samples").glob("step_*.png"))
    assert grids == ["step_00000028.png", "step_00000056.png", "step_00000060.png"]  # 2 epochs, the end
    capsys.readouterr()
    line = one_line_error(capsys, [*base, "--no-previews", "--sample-every-epoch", "--dry-run"])
    assert "--sample-every-epoch with --no-previews" in line


def test_sample_prefix_names_the_image_files(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "digits", "--image-size", "16", *FAST, "--no-previews", "--out", str(run)]) == 0
    images = tmp_path / "images"
    sample = ["sample", str(run), "-n", "2", "--steps", "2", "--no-grid", "--images-dir", str(images)]
    assert main([*sample, "--prefix", "seed0-"]) == 0
    assert sorted(p.name for p in images.iterdir()) == ["seed0-00000.png", "seed0-00001.png"]
    capsys.readouterr()
    assert "use at most 64 letters" in one_line_error(capsys, [*sample, "--prefix", "../up"])
    assert "add --images-dir" in one_line_error(capsys, ["sample", str(run), "--prefix", "x"])
    assert "--fps" in one_line_error(
        capsys, ["sample", str(run), "--gif", str(tmp_path / "a.gif"), "--fps", "0"]
    )


def test_noise_draws_x_t_under_a_named_schedule(tmp_path: Path, capsys) -> None:
    import torch
    from PIL import Image

    from difforge.data import load_image_files
    from difforge.diffusion import DiffusionConfig
    from difforge.images import make_grid, to_uint8

    picture = tmp_path / "square.png"
    array = np.zeros((40, 40, 3), np.uint8)
    array[10:30, 10:30] = (250, 120, 0)
    Image.fromarray(array).save(picture)
    strip = tmp_path / "strip.png"
    argv = ["noise", str(picture), "--schedule", "cosine", "--timesteps", "200", "--image-size", "16"]
    assert main([*argv, "--t", "0,20,199", "--out", str(strip), "--seed", "3"]) == 0
    images, _, _ = load_image_files([str(picture)], 16, 3)
    process = DiffusionConfig(schedule="cosine", num_timesteps=200).build()
    generator = torch.Generator().manual_seed(3)
    columns = [process.q_sample(images, torch.full((1,), t), torch.randn(images.shape, generator=generator))
               for t in (0, 20, 199)]  # fmt: skip
    expected = make_grid(to_uint8(torch.cat(columns)), columns=3)
    np.testing.assert_array_equal(np.asarray(Image.open(strip)), expected)
    assert main(["noise", str(picture), "--out", str(tmp_path / "default.png")]) == 0
    assert "t = 0, 50, 100, 250, 500, 999 of 1000" in capsys.readouterr().err
    for bad, words in (
        (["--t", "0,1000"], "--t must be >= 0 and <= 999"),
        (["--t", "a"], "--t 'a': give whole numbers"),
        (["--schedule", "wavy"], "schedule"),
        (["--run", str(tmp_path)], "config.json"),
    ):
        assert words in one_line_error(capsys, ["noise", str(picture), "--out", str(strip), *bad])
    assert "no such file" in one_line_error(
        capsys, ["noise", str(tmp_path / "nope.png"), "--out", str(strip)]
    )
