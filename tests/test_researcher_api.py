"""The researcher's API: explicit per-step noise, the single reverse steps with a t per example
(and the loops as chains of them), the step's output in the callback, a learned_range process
without a training loss, and improved-diffusion's respacing specs as ``timesteps``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from difforge.diffusion import GaussianDiffusion
from difforge.errors import DifforgeError
from difforge.sampling.samplers import (
    StepInfo,
    StepOutput,
    ddim,
    ddim_step,
    ddpm,
    dpmpp_2m,
    euler,
    heun,
    karras_sigmas,
    p_sample_step,
)
from difforge.schedule import NoiseSchedule

F64 = torch.float64
SHAPE = (3, 2, 4, 4)


def make(T: int = 1000, name: str = "linear", **kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule.named(name, T), **kwargs)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def image_data(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    pixels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    return (pixels / 127.5 - 1.0).to(F64)


class RecordingNoise:
    """A ``step_noise`` callable drawing what a seeded generator would draw, recording each call."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, index: int, like: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(like.shape, generator=self.generator, dtype=like.dtype)
        self.calls.append((index, noise))
        return noise

    def stacked(self, steps: int) -> torch.Tensor:
        """The draws as a (steps, ...) tensor; slices never asked for are NaN (so must be unused)."""
        table = torch.full((steps, *SHAPE), float("nan"), dtype=F64)
        for index, noise in self.calls:
            table[index] = noise
        return table


# ---- explicit noise -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "options"),
    [(ddpm, {}), (ddim, {"eta": 0.5}), (ddim, {"eta": 1.0})],
)
def test_step_noise_replaces_the_generator_draws_exactly(sampler, options, fake_model):
    diffusion = make(1000, "cosine")
    noise = randn(*SHAPE, seed=1)

    def run(**kwargs) -> torch.Tensor:
        return sampler(fake_model(2), diffusion, noise, "ddim10", **options, **kwargs)

    reference = run(generator=torch.Generator().manual_seed(3))
    recorder = RecordingNoise(3)
    assert torch.equal(run(step_noise=recorder), reference)
    assert [index for index, _ in recorder.calls] == list(range(9))  # no noise at the last step
    assert torch.equal(run(step_noise=recorder.stacked(10)), reference)
    assert not torch.equal(run(step_noise=RecordingNoise(4)), reference)


def test_ddim_with_eta_0_asks_for_no_noise(fake_model):
    diffusion = make(1000)
    recorder = RecordingNoise(0)
    out = ddim(fake_model(2), diffusion, randn(*SHAPE, seed=1), "ddim10", step_noise=recorder)
    assert recorder.calls == []
    assert torch.equal(out, ddim(fake_model(2), diffusion, randn(*SHAPE, seed=1), "ddim10"))


def test_zero_step_noise_gives_the_mean_path_of_ddpm(fake_model):
    diffusion = make(1000, "linear", variance="fixed_large")
    noise = randn(*SHAPE, seed=2)
    model = fake_model(2)
    out = ddpm(model, diffusion, noise, "ddim10", step_noise=torch.zeros(10, *SHAPE, dtype=F64))
    process = diffusion.respaced("ddim10")
    x = noise
    for index in reversed(range(10)):
        t = torch.full((SHAPE[0],), index)
        x = process.p_mean_variance(model(x, process.model_timesteps(t)), x, t, clip_denoised=True).mean
    assert torch.equal(out, x)


def test_calc_bpd_loop_takes_explicit_noise(fake_model):
    diffusion = make(12, "cosine")
    x0 = image_data(1)
    reference = diffusion.calc_bpd_loop(fake_model(2), x0, generator=torch.Generator().manual_seed(2))
    recorder = RecordingNoise(2)
    recorded = diffusion.calc_bpd_loop(fake_model(2), x0, step_noise=recorder)
    assert [index for index, _ in recorder.calls] == list(range(12))
    tabled = diffusion.calc_bpd_loop(fake_model(2), x0, step_noise=recorder.stacked(12))
    for key, value in reference.items():
        assert torch.equal(recorded[key], value) and torch.equal(tabled[key], value), key
    # slice 0 is step 0, i.e. t = T-1: column t of the result used slice T-1-t
    t = torch.full((SHAPE[0],), 4)
    x_t = diffusion.q_sample(x0, t, recorder.stacked(12)[12 - 1 - 4])
    vb, _ = diffusion.vb_terms_bpd(fake_model(2)(x_t, t), x0, x_t, t, clip_denoised=True)
    assert torch.equal(reference["vb"][:, 4], vb)


def test_bad_step_noise_is_a_one_line_error(fake_model):
    diffusion = make(100)
    noise = randn(*SHAPE)
    model = fake_model(2)
    cases: list[tuple[str, Callable[[], object]]] = [
        (
            r"step_noise must have shape \(10, 3, 2, 4, 4\) \(one slice per step\), got \(9, 3, 2, 4, 4\)",
            lambda: ddpm(model, diffusion, noise, "10", step_noise=torch.zeros(9, *SHAPE)),
        ),
        (
            r"step_noise must have shape \(100, 3, 2, 4, 4\)",
            lambda: diffusion.calc_bpd_loop(model, image_data(), step_noise=torch.zeros(100, 3, 2, 4, 5)),
        ),
        (
            r"step_noise\(0, x\) must return a tensor of shape \(3, 2, 4, 4\), got \(1, 2, 4, 4\)",
            lambda: ddim(model, diffusion, noise, "10", eta=1.0, step_noise=lambda index, like: like[:1]),
        ),
        (
            "pass either generator or step_noise, not both",
            lambda: ddpm(
                model, diffusion, noise, "10", generator=torch.Generator(), step_noise=torch.zeros(10)
            ),
        ),
        (
            "step_noise must be a tensor or a callable",
            lambda: ddpm(model, diffusion, noise, "10", step_noise=[0.0] * 10),
        ),
        (
            r"noise must have x's shape \(3, 2, 4, 4\), got \(2, 2, 4, 4\)",
            lambda: p_sample_step(model, diffusion, noise, torch.tensor([1, 2, 3]), noise=noise[:2]),
        ),
    ]
    for pattern, call in cases:
        with pytest.raises(DifforgeError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)


# ---- single steps with a t per example ------------------------------------------------------


def test_p_sample_step_with_a_t_per_example_equals_the_single_t_steps(fake_model):
    process = make(1000, "cosine", variance="learned_range").respaced("ddim50")
    model = fake_model(2, 4)
    x, z = randn(4, 2, 4, 4, seed=1), randn(4, 2, 4, 4, seed=2)
    t = torch.tensor([0, 7, 49, 23])
    batched = p_sample_step(model, process, x, t, noise=z)
    assert isinstance(batched, StepOutput) and batched.x_prev.shape == batched.pred_x0.shape == x.shape
    assert model.calls[-1].tolist() == process.schedule.timestep_map[t.numpy()].tolist()  # original indices
    for i in range(4):
        single = p_sample_step(model, process, x[i : i + 1], t[i : i + 1], noise=z[i : i + 1])
        torch.testing.assert_close(batched.x_prev[i : i + 1], single.x_prev, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(batched.pred_x0[i : i + 1], single.pred_x0, rtol=1e-13, atol=1e-13)
    mean = process.p_mean_variance(model(x, process.model_timesteps(t)), x, t, clip_denoised=True).mean
    assert torch.equal(batched.x_prev[0], mean[0])  # no noise where t = 0
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    at_zero = p_sample_step(model, process, x, torch.zeros(4, dtype=torch.long), generator=generator)
    assert torch.equal(generator.get_state(), state)  # nothing drawn when every t = 0
    assert torch.isfinite(at_zero.x_prev).all()


def test_ddim_step_with_a_t_and_t_prev_per_example_equals_the_single_steps(fake_model):
    process = make(1000, "linear")
    model = fake_model(2)
    x, z = randn(4, 2, 4, 4, seed=3), randn(4, 2, 4, 4, seed=4)
    t, t_prev = torch.tensor([999, 500, 3, 0]), torch.tensor([980, 499, -1, -1])
    for eta in (0.0, 0.5):
        batched = ddim_step(model, process, x, t, t_prev, eta=eta, noise=z)
        for i in range(4):
            rows = slice(i, i + 1)
            single = ddim_step(model, process, x[rows], t[rows], t_prev[rows], eta=eta, noise=z[rows])
            torch.testing.assert_close(batched.x_prev[rows], single.x_prev, rtol=1e-13, atol=1e-13)
        assert torch.equal(batched.x_prev[2:], batched.pred_x0[2:])  # t_prev = -1: the step to x0_hat
    with pytest.raises(DifforgeError, match=r"ddim_step needs -1 <= t_prev < t <= 999 per example"):
        ddim_step(model, process, x, t, t)
    with pytest.raises(DifforgeError, match=r"t and t_prev must have shape \(4,\)"):
        ddim_step(model, process, x, t, t_prev[:2])
    with pytest.raises(DifforgeError, match=r"noise must have x's shape \(4, 2, 4, 4\), got \(1, 2, 4, 4\)"):
        ddim_step(model, process, x, t, t_prev, eta=1.0, noise=z[:1])
    with pytest.raises(DifforgeError, match="eta must be >= 0"):
        ddim_step(model, process, x, t, t_prev, eta=-0.5)


def test_the_loops_are_chains_of_the_single_steps(fake_model):
    diffusion = make(1000, "cosine")
    noise = randn(*SHAPE, seed=5)
    table = randn(10, *SHAPE, seed=6)
    process = diffusion.respaced("ddim10")
    for sampler, step, options in ((ddpm, p_sample_step, {}), (ddim, ddim_step, {"eta": 0.7})):
        model = fake_model(2)
        out = sampler(model, diffusion, noise, "ddim10", step_noise=table, **options)
        x = noise
        for k, index in enumerate(reversed(range(10))):
            t = torch.full((SHAPE[0],), index)
            args = (t,) if step is p_sample_step else (t, t - 1)
            x = step(model, process, x, *args, noise=table[k] if index > 0 else None, **options).x_prev
        assert torch.equal(out, x), sampler.__name__
    # DDIM on kept steps = ddim_step on the full chain, jumping t -> t_prev directly
    model = fake_model(2)
    out = ddim(model, diffusion, noise, [0, 400, 999], eta=0.5, step_noise=table[:3])
    x = noise
    for k, (now, prev) in enumerate(((999, 400), (400, 0), (0, -1))):
        t, t_prev = torch.full((SHAPE[0],), now), torch.full((SHAPE[0],), prev)
        x = ddim_step(model, diffusion, x, t, t_prev, eta=0.5, noise=table[k]).x_prev
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


# ---- the step's output in the callback ------------------------------------------------------


def _runs(diffusion: GaussianDiffusion) -> dict[str, Callable[..., torch.Tensor]]:
    sigmas = karras_sigmas(diffusion, 6)
    return {
        "ddpm": lambda model, noise, **kw: ddpm(
            model, diffusion, noise, "6", generator=torch.Generator(), **kw
        ),
        "ddim": lambda model, noise, **kw: ddim(
            model, diffusion, noise, "ddim6", eta=0.5, generator=torch.Generator(), **kw
        ),
        "euler": lambda model, noise, **kw: euler(model, diffusion, noise, sigmas, **kw),
        "heun": lambda model, noise, **kw: heun(model, diffusion, noise, sigmas, **kw),
        "dpmpp_2m": lambda model, noise, **kw: dpmpp_2m(model, diffusion, noise, sigmas, **kw),
    }


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun", "dpmpp_2m"])
def test_callback_x_next_is_the_trajectory_and_ends_on_the_sample(name, fake_model):
    assert StepInfo._fields == ("index", "total", "timestep", "x", "pred_x0", "x_next")
    diffusion = make(1000, "linear")
    seen: list[StepInfo] = []
    out = _runs(diffusion)[name](fake_model(2), randn(*SHAPE, seed=7), callback=seen.append)
    assert [info.index for info in seen] == list(range(6))
    for info, following in zip(seen, seen[1:], strict=False):
        assert torch.equal(info.x_next, following.x)
    assert torch.equal(seen[-1].x_next, out)


# ---- learned_range without a training loss --------------------------------------------------


def test_learned_range_process_without_a_loss_samples_and_evaluates_but_does_not_train(fake_model):
    schedule = NoiseSchedule.named("cosine", 20)
    process = GaussianDiffusion(schedule, variance="learned_range")
    assert process.loss_type is None and process.settings()["loss"] is None
    respaced = process.respaced("5")
    assert respaced.loss_type is None and respaced.variance == "learned_range"
    assert make(20, "cosine").loss_type == "mse"  # the fixed variances keep their default
    model = fake_model(2, 4)
    noise = randn(*SHAPE, seed=8)
    assert torch.isfinite(ddpm(model, process, noise, "10", generator=torch.Generator())).all()
    assert torch.isfinite(ddim(model, respaced, noise, "5")).all()
    trained = GaussianDiffusion(schedule, variance="learned_range", loss="hybrid")
    x0 = image_data(9)
    bpd = process.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(1))
    expected = trained.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(bpd["total_bpd"], expected["total_bpd"])
    with pytest.raises(
        DifforgeError, match=r"no training loss \(loss=None\): build it with loss 'hybrid' or 'vlb'"
    ):
        process.training_losses(model, x0, torch.tensor([0, 5, 19]))
    with pytest.raises(
        DifforgeError, match="variance 'learned_range' .* use loss 'hybrid' or 'vlb', not 'mse'"
    ):
        GaussianDiffusion(schedule, variance="learned_range", loss="mse")


# ---- respacing specs as timesteps -----------------------------------------------------------


@pytest.mark.parametrize("spec", ["ddim10", "10", "3,2,4"])
def test_spec_strings_are_read_by_the_schedule(spec, fake_model):
    diffusion = make(1000)
    noise = randn(*SHAPE, seed=10)
    kept = diffusion.schedule.timesteps(spec)
    for sampler, options in ((ddpm, {}), (ddim, {"eta": 0.3})):
        by_spec, by_list = fake_model(2), fake_model(2)
        a = sampler(by_spec, diffusion, noise, spec, generator=torch.Generator().manual_seed(1), **options)
        b = sampler(by_list, diffusion, noise, kept, generator=torch.Generator().manual_seed(1), **options)
        assert torch.equal(a, b)
        assert [int(c[0]) for c in by_spec.calls] == kept[::-1].tolist()
    with pytest.raises(
        DifforgeError, match="no even stride of the 1000-step schedule gives exactly 999 steps"
    ):
        ddim(fake_model(2), diffusion, noise, "ddim999")


def test_sample_steps_50_is_the_section_spacing_not_ddim50(fake_model):
    from difforge.sampling import sample

    diffusion = make(1000)
    fifty, ddim50 = diffusion.schedule.timesteps("50"), diffusion.schedule.timesteps("ddim50")
    assert fifty[:4].tolist() == [0, 20, 41, 61] and fifty[-2:].tolist() == [979, 999]
    assert ddim50.tolist() == list(range(0, 1000, 20))
    assert sorted(set(fifty.tolist()) & set(ddim50.tolist())) == [0, 20]
    model = fake_model(2)
    sample(model, diffusion, randn(*SHAPE, seed=11), sampler="ddim", steps=50)
    assert [int(c[0]) for c in model.calls] == fifty[::-1].tolist()
