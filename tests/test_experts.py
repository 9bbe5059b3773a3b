"""Timestep-expert ensembles: routing by t, range-restricted timestep samplers, branching a
run, training the experts one after another, resume, and sampling with every sampler."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from tiny_settings import TINY

from difforge.cli import main
from difforge.nn import UNet, UNetConfig
from difforge.nn.experts import ExpertRouter, ExpertsConfig, check_bounds, equal_mass_bounds
from difforge.pipeline import Pipeline
from difforge.process import process_config_from_dict
from difforge.runs.config import RunConfig, TrainConfig
from difforge.schedule import NoiseSchedule
from difforge.timestep_sampling import LogNormalSigmaSampler, LossSecondMomentSampler, UniformTimestepSampler
from difforge.training import Trainer, prepare_run

pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")

COMMON = ["--batch-size", "8", "--no-tensorboard", "--no-progress", "--preview-images", "4",
          "--preview-steps", "2", "--threads", "2", "--sample-every", "0"]  # fmt: skip
CLI_TINY = ["--preset", "tiny", "--image-size", "8", *COMMON]  # a branched run takes the rest from its parent


class Recorder(torch.nn.Module):
    """An expert that records the t it is called with and answers its own number."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.clone())
        for value in kwargs.values():
            assert value.shape[0] == x.shape[0]  # conditions are split with their examples
        return torch.full_like(x, float(self.number))


def _router(bounds: tuple[int, ...]) -> ExpertRouter:
    config = ExpertsConfig(
        bounds, [UNetConfig.preset("tiny", image_size=8, in_channels=1)] * (len(bounds) - 1)
    )
    return ExpertRouter(config, [Recorder(i) for i in range(len(bounds) - 1)])


def test_the_router_calls_exactly_the_expert_whose_range_holds_t() -> None:
    router = _router((0, 300, 700, 1000))
    t = torch.tensor([0, 299, 300, 699, 700, 999, 299.5, 300.0, 699.99, 0.2, 999.0])
    x = torch.zeros(len(t), 1, 8, 8)
    out = router(x, t, class_labels=torch.arange(len(t)))
    expected = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 1, 0, 2])  # [b_k, b_k+1) on the real line
    assert torch.equal(out[:, 0, 0, 0].long(), expected)
    for number, expert in enumerate(router.experts):
        assert torch.equal(torch.cat(expert.seen), t[expected == number])  # type: ignore[attr-defined]
    for expert in router.experts:
        expert.seen.clear()  # type: ignore[attr-defined]
    router(x[:3], torch.tensor([310, 320, 690]))
    assert [len(e.seen) for e in router.experts] == [0, 1, 0]  # type: ignore[attr-defined]  # one call


def test_an_ensemble_of_copies_samples_what_the_network_alone_samples() -> None:
    config = UNetConfig.preset("tiny", image_size=8, in_channels=1, num_classes=3)
    torch.manual_seed(0)
    network = UNet(config).eval()
    for parameter in network.parameters():  # zero-initialised branches would make it trivial
        torch.nn.init.normal_(parameter, std=0.05)
    router = ExpertRouter(ExpertsConfig((0, 10, 25, 40), [config] * 3), [network, network, network]).eval()
    process = process_config_from_dict({"num_timesteps": 40})
    data = {"class_names": ["a", "b", "c"]}
    single = RunConfig(config, process, TrainConfig(**TINY, p_uncond=0.1), data=_data(data))
    ensemble = RunConfig(router.config, process, TrainConfig(**TINY, p_uncond=0.1), data=_data(data))
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "heun"):
        settings = {"sampler": sampler, "steps": 6, "seed": 3, "guidance": 2.0}
        alone = Pipeline(network, process.build(), single, torch.device("cpu"))(4, **settings)
        routed = Pipeline(router, process.build(), ensemble, torch.device("cpu"))(4, **settings)
        assert np.array_equal(alone, routed), sampler


def _data(values: dict[str, list[str]]):  # noqa: ANN202
    from difforge.runs.config import DataInfo

    return DataInfo(**values)


@pytest.mark.parametrize("kind", ["uniform", "importance", "lognormal"])
def test_range_restricted_timestep_samplers_never_leave_their_range(kind: str) -> None:
    total = 100
    if kind == "uniform":
        sampler: UniformTimestepSampler = UniformTimestepSampler(total)
    elif kind == "importance":
        sampler = LossSecondMomentSampler(total, history=2)
        for t in range(total):  # warm it up everywhere, with losses that grow with t
            sampler.update(torch.tensor([t, t]), torch.tensor([1.0 + t, 1.0 + t]))
    else:
        sampler = LogNormalSigmaSampler(NoiseSchedule.named("linear", total).sigmas)
    generator = torch.Generator().manual_seed(0)
    t, weights = sampler.sample(4000, generator=generator, timestep_range=(30, 55))
    assert int(t.min()) >= 30 and int(t.max()) <= 54 and len(torch.unique(t)) == 25
    p = sampler.probabilities_in(30, 55)
    assert abs(float(p.sum()) - 1) < 1e-12
    if sampler.reweights:  # E_p[w f(t)] is the uniform mean of f over the range, exactly
        w = 1 / (25 * p)
        assert torch.allclose((p * w).sum(), torch.tensor(1.0, dtype=torch.float64))
        assert torch.allclose(weights, (1 / (25 * p[t - 30])).float())
    else:
        assert torch.equal(weights, torch.ones(4000))
    whole, _ = sampler.sample(8, generator=torch.Generator().manual_seed(1))
    again, _ = sampler.sample(8, generator=torch.Generator().manual_seed(1), timestep_range=(0, total))
    assert torch.equal(whole, again)  # the whole range is the unrestricted sampler, draw for draw


def test_equal_mass_bounds() -> None:
    assert equal_mass_bounds(np.full(1000, 1e-3), 2) == (0, 500, 1000)
    assert equal_mass_bounds(np.full(1000, 1e-3), 3) == (0, 334, 667, 1000)
    sigmas = NoiseSchedule.named("linear", 1000).sigmas
    p = LogNormalSigmaSampler(sigmas).probabilities().numpy()
    bounds = equal_mass_bounds(p, 2)
    below = p[: bounds[1]].sum()
    assert below >= 0.5 and below - p[bounds[1] - 1] < 0.5  # the first t at which half is reached
    assert equal_mass_bounds(np.array([0.97, 0.01, 0.01, 0.01]), 3) == (0, 1, 2, 4)  # never empty


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ((0, 500), "at least 0, one cut and T"),
        ((0, 600, 500, 1000), "increase strictly"),
        ((0, 500, 500, 1000), "increase strictly"),
        ((10, 500, 1000), "from 0 to T = 1000"),
        ((0, 500, 999), "from 0 to T = 1000"),
    ],
)
def test_malformed_bounds_are_refused(bounds: tuple[int, ...], message: str) -> None:
    from difforge.errors import DifforgeError

    with pytest.raises(DifforgeError, match=message):
        check_bounds(bounds, 1000)


# ---- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("experts") / "parent"
    assert main(["train", "digits", "--out", str(run), "--steps", "3", "--timesteps", "40", *CLI_TINY]) == 0
    return run


def _ensemble_trainer(parent: Path, run: Path) -> Trainer:
    train = TrainConfig(**{**TINY, "image_size": 8, "steps": 6, "checkpoint_every": 1}, init_from=str(parent),
                        experts=2, timestep_sampler="importance")  # fmt: skip
    model, process, dataset, run_config = prepare_run(train, process_config_from_dict({}))
    return Trainer(model, process, dataset, run_config, run, device=torch.device("cpu"), progress=False)


def test_experts_train_one_after_another_and_resume_inside_the_second(parent: Path, tmp_path: Path) -> None:
    straight = _ensemble_trainer(parent, tmp_path / "a")
    start = {k: v.clone() for k, v in straight.model.state_dict().items()}
    assert straight.run_config.model.bounds == (0, 20, 40)
    straight.train(stop_after=3)  # the first expert's three steps
    moved = {k for k, v in straight.model.state_dict().items() if not torch.equal(v, start[k])}
    assert moved and all(k.startswith("experts.0.") for k in moved)
    straight.train()
    later = {k for k, v in straight.model.state_dict().items() if not torch.equal(v, start[k])}
    assert any(k.startswith("experts.1.") for k in later)

    first = _ensemble_trainer(parent, tmp_path / "b")
    first.train(stop_after=4)  # one step into the second expert
    torch.manual_seed(999)
    second = _ensemble_trainer(parent, tmp_path / "b")
    assert second.resume() == 4
    second.train()
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    for a, b in zip(
        straight.ema.model.state_dict().values(), second.ema.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    first_plan = [straight.lr_at(step) for step in range(3)]
    assert first_plan == [straight.lr_at(step) for step in range(3, 6)] and first_plan[0] < first_plan[2]


def test_an_ensemble_is_a_run_like_any_other(
    parent: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "ens"
    argv = ["train", "digits", "--init-from", str(parent), "--expert-bounds", "0,10,40", "--steps", "4",
            "--out", str(run), *COMMON]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["kind"] == "experts" and config["model"]["bounds"] == [0, 10, 40]
    assert (
        config["model"]["parent"]["run"] == str(parent) and len(config["model"]["parent"]["ema_sha256"]) == 64
    )
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "heun"):
        out = tmp_path / f"{sampler}.png"
        assert (
            main(["sample", str(run), "-n", "2", "--steps", "3", "--sampler", sampler, "--out", str(out)])
            == 0
        )
    assert main(["info", str(run)]) == 0
    assert "2 over t in [0, 10), [10, 40)" in capsys.readouterr().out
    fid = [
        "eval",
        "fid",
        str(run),
        "digits[:12]",
        "-n",
        "4",
        "--steps",
        "2",
        "--json",
        "--quiet",
        "--no-cache",
    ]
    assert main(fid) == 0
    assert json.loads(capsys.readouterr().out)["fid"] > 0
    pipe = Pipeline.from_run(run)
    assert isinstance(pipe.model, ExpertRouter) and pipe(2, steps=2).shape == (2, 8, 8, 1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--expert-bounds", "0,20"], "at least 0, one cut and T"),
        (["--expert-bounds", "0,30,20,40"], "increase strictly"),
        (["--expert-bounds", "0,20,1000"], "from 0 to T = 40"),
        (["--expert-bounds", "0,a,40"], "not a comma-separated list"),
        (["--experts", "1"], "--experts must be"),
        (["--experts", "2", "--expert-bounds", "0,20,40"], "give one"),
    ],
)
def test_malformed_expert_flags_are_one_line_errors(
    parent: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = [
        "train",
        "digits",
        "--init-from",
        str(parent),
        *flags,
        "--out",
        str(tmp_path / "x"),
        "--steps",
        "2",
    ]
    assert message in one_line_error(capsys, argv)
    assert not (tmp_path / "x").exists()
    assert "add --init-from" in one_line_error(
        capsys, ["train", "digits", "--experts", "2", "--out", str(tmp_path / "y")]
    )


def test_an_expert_of_another_width_starts_fresh_where_the_parent_does_not_fit(
    parent: Path, caplog: pytest.LogCaptureFixture
) -> None:
    width = RunConfig.load(parent).model.base_channels
    train = TrainConfig(**{**TINY, "image_size": 8, "steps": 2}, init_from=str(parent), experts=2,
                        expert_channels=f"{width},{2 * width}")  # fmt: skip
    with caplog.at_level("WARNING", logger="difforge.training"):
        model, _, _, run_config = prepare_run(train, process_config_from_dict({}))
    assert [e.base_channels for e in run_config.model.experts] == [width, 2 * width]
    parent_state = Pipeline.from_run(parent).model.state_dict()
    assert all(torch.equal(v, parent_state[k]) for k, v in model.experts[0].state_dict().items())
    assert "expert 1 differs in size from the parent" in caplog.text and "expert 0" not in caplog.text
    with pytest.raises(Exception, match="gives 3 widths for 2 experts"):
        prepare_run(replace(train, expert_channels="8,8,8"), process_config_from_dict({}))
