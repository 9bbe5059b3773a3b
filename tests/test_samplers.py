"""Samplers: closed-form toy models, identities between samplers, guidance, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difforge.diffusion import GaussianDiffusion
from difforge.errors import DifforgeError
from difforge.sampling import (
    DiscreteDenoiser,
    classifier_free_guidance,
    ddim,
    ddim_var,
    ddpm,
    dpmpp_2m,
    euler,
    heun,
    karras_sigmas,
    logsnr_sigmas,
    model_evaluations,
    noise_levels,
    sample,
    sigmas_for_timesteps,
    uniform_timesteps,
)
from difforge.sampling.registry import RESTART_REPEATS, RESTART_STEPS, sampler_names
from difforge.schedule import NoiseSchedule

F64 = torch.float64
SHAPE = (3, 2, 4, 4)

GAUSSIAN_SAMPLERS = sampler_names("gaussian")


def make(T=1000, name="linear", **kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule.named(name, T), **kwargs)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def interp_sigma(diffusion: GaussianDiffusion, t: torch.Tensor) -> torch.Tensor:
    """sigma at a (fractional) original timestep: the inverse of `sigma_to_t` (log-linear)."""
    schedule = diffusion.schedule
    log_sigma = np.interp(t.double().numpy(), schedule.timestep_map, np.log(schedule.sigmas))
    return torch.from_numpy(np.exp(log_sigma)).reshape(-1, 1, 1, 1)


def gaussian_data_model(diffusion: GaussianDiffusion, mu: float, s: float):
    """Exact eps-prediction for data ~ N(mu, s^2) per pixel: D(x, sigma) = mu + s^2 (x - mu) / (s^2 + sigma^2)
    in VE variables x = x_t sqrt(1 + sigma^2), eps = (x - D) / sigma."""

    def model(x_t, t, **kwargs):
        sigma = interp_sigma(diffusion, t).to(x_t.dtype)
        x = x_t * (1 + sigma**2).sqrt()
        denoised = mu + s**2 * (x - mu) / (s**2 + sigma**2)
        return (x - denoised) / sigma

    return model


# ---- closed-form toy models --------------------------------------------------------------------


def test_all_samplers_land_on_a_single_data_point():
    """Data = one point x*: the exact eps-model gives D(x, sigma) = x*, and every sampler ends on x*."""
    diffusion = make(1000, "cosine")
    target = randn(1, 2, 4, 4, seed=1).clamp(-1, 1)

    def point_model(x_t, t, **kwargs):
        # alpha_bar at the (possibly fractional) timestep, from its noise level
        ab = 1.0 / (1.0 + interp_sigma(diffusion, t) ** 2)
        return (x_t - ab.sqrt() * target) / (1 - ab).sqrt()

    noise = randn(*SHAPE, seed=2)
    options = {"clip_denoised": False}
    # edm's churned levels sigma_hat fall between the schedule's timesteps, which the quantized
    # denoiser rounds (up to 9e-5 off here): its churn is checked in test_stochastic_samplers.py
    churn = {"edm": {"s_churn": 0.0}}
    for name in GAUSSIAN_SAMPLERS:
        for spacing in ("karras", "uniform", "logsnr"):
            settings = {**options, **churn.get(name, {})}
            out = sample(point_model, diffusion, noise, sampler=name, steps=7, spacing=spacing, **settings)
            torch.testing.assert_close(out, target.expand(SHAPE), rtol=1e-7, atol=1e-7, msg=name)
    out = ddim(point_model, diffusion, noise, [0, 400, 999], eta=0.7, generator=torch.Generator(), **options)
    torch.testing.assert_close(out, target.expand(SHAPE), rtol=1e-7, atol=1e-7)


def analytic_ode_error(sampler, steps: int) -> float:
    """Data ~ N(mu, s^2): the probability-flow ODE is solved in closed form,
    x(sigma) - mu = (x(sigma_max) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2);
    the last step (to sigma = 0) of every sampler returns D(x(sigma_min), sigma_min)."""
    diffusion = make(1000, "linear")
    mu, s = 0.3, 0.5
    model = gaussian_data_model(diffusion, mu, s)
    noise = randn(*SHAPE, seed=3)
    sigmas = karras_sigmas(diffusion, steps)
    out = sampler(model, diffusion, noise, sigmas, quantize=False, clip_denoised=False)
    x_start = noise * math.sqrt(1 + sigmas[0] ** 2)
    sigma_min = sigmas[-2]
    x_min = mu + (x_start - mu) * math.sqrt(s**2 + sigma_min**2) / math.sqrt(s**2 + sigmas[0] ** 2)
    exact = mu + s**2 * (x_min - mu) / (s**2 + sigma_min**2)
    return (out - exact).abs().max().item() / exact.abs().max().item()


def test_ode_samplers_converge_to_the_analytic_ode_solution_at_their_order():
    euler_errors = [analytic_ode_error(euler, steps) for steps in (160, 640)]
    assert euler_errors[1] < 1e-2
    assert 3.0 < euler_errors[0] / euler_errors[1] < 5.0  # first order: 4x the steps, 1/4 the error
    for sampler in (heun, dpmpp_2m):
        errors = [analytic_ode_error(sampler, steps) for steps in (40, 160)]
        assert errors[1] < 1e-3, sampler.__name__
        assert errors[0] / errors[1] > 12.0, sampler.__name__  # second order: ~1/16
        assert errors[1] < euler_errors[1]  # 160 steps of a 2nd-order method beat 640 Euler steps


# ---- identities between samplers ----------------------------------------------------------------


def test_ddim_eta0_is_euler_on_the_same_noise_levels(fake_model):
    """DDIM (eta = 0) is Euler's method on the VE ODE at sigma_t of the kept steps."""
    diffusion = make(1000, "cosine")
    timesteps = diffusion.schedule.timesteps("ddim20")
    noise = randn(*SHAPE, seed=4)
    model = fake_model(2)
    out_ddim = ddim(model, diffusion, noise, timesteps, eta=0.0, clip_denoised=False)
    sigmas = sigmas_for_timesteps(diffusion, timesteps)
    out_euler = euler(model, diffusion, noise, sigmas, clip_denoised=False)
    torch.testing.assert_close(out_ddim, out_euler, rtol=1e-9, atol=1e-9)
    ddim_calls, euler_calls = model.calls[:20], model.calls[20:]
    assert [c.tolist() for c in ddim_calls] == [c.tolist() for c in euler_calls]


def test_ddim_eta1_is_ddpm_with_the_posterior_variance(fake_model):
    diffusion = make(1000, "linear")
    timesteps = diffusion.schedule.timesteps("25")
    noise = randn(*SHAPE, seed=5)
    model = fake_model(2)
    out_ddim = ddim(model, diffusion, noise, timesteps, eta=1.0, generator=torch.Generator().manual_seed(1))
    out_ddpm = ddpm(model, diffusion, noise, timesteps, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out_ddim, out_ddpm, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_discrete_denoiser_matches_the_process_pred_x0(prediction, fake_model):
    diffusion = make(1000, "cosine", prediction=prediction)
    model = fake_model(2)
    denoiser = DiscreteDenoiser(model, diffusion, clip_denoised=False)
    x_t = randn(*SHAPE, seed=6)
    for t in (0, 321, 999):
        sigma = float(diffusion.schedule.sigmas[t])
        got = denoiser(x_t * math.sqrt(1 + sigma**2), sigma)
        tt = torch.full((SHAPE[0],), t)
        expected = diffusion.pred_x0(model(x_t, tt), x_t, tt)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        assert denoiser.timestep(sigma) == t and model.calls[-2].dtype == torch.long


def test_model_sees_original_timesteps_under_respacing(fake_model):
    diffusion = make(1000, "linear")
    respaced = diffusion.respaced("ddim10")
    noise = randn(*SHAPE, seed=7)
    original = list(range(900, -1, -100))
    for run in (
        lambda m: ddpm(m, respaced, noise, respaced.schedule.timestep_map),
        lambda m: ddim(m, diffusion, noise, diffusion.schedule.timesteps("ddim10")),
        lambda m: euler(m, respaced, noise, sigmas_for_timesteps(respaced, original)),
    ):
        model = fake_model(2)
        run(model)
        assert [int(c[0]) for c in model.calls] == original


# ---- noise levels ---------------------------------------------------------------------------------


def test_noise_level_spacings():
    diffusion = make(1000, "linear")
    sigmas = diffusion.schedule.sigmas
    karras = karras_sigmas(diffusion, 10)
    assert (
        karras[0] == pytest.approx(sigmas[-1]) and karras[-2] == pytest.approx(sigmas[0]) and karras[-1] == 0
    )
    ramp = np.linspace(0, 1, 10)
    expected = (sigmas[-1] ** (1 / 7) + ramp * (sigmas[0] ** (1 / 7) - sigmas[-1] ** (1 / 7))) ** 7
    np.testing.assert_allclose(karras[:-1], expected, rtol=1e-12)
    logsnr = logsnr_sigmas(diffusion, 10)
    np.testing.assert_allclose(np.diff(np.log(logsnr[:-1])), np.log(sigmas[0] / sigmas[-1]) / 9, rtol=1e-10)
    assert uniform_timesteps(1000, 4).tolist() == [999, 749, 500, 250]
    np.testing.assert_array_equal(
        noise_levels(diffusion, 4, "uniform"), np.append(sigmas[[999, 749, 500, 250]], 0)
    )
    for spacing in ("uniform", "logsnr", "karras"):
        levels = noise_levels(diffusion, 6, spacing)
        assert len(levels) == 7 and np.all(np.diff(levels) < 0) and levels[-1] == 0
    assert model_evaluations("heun", 10) == 19 and model_evaluations("euler", 10) == 10


# ---- guidance -----------------------------------------------------------------------------------


class CountingConditionalModel:
    """out = x * (1 + y) (+ variance channels that also depend on y), counting calls and batch sizes."""

    def __init__(self, learned: bool = False):
        self.learned = learned
        self.batches: list[int] = []

    def __call__(self, x, t, y, image=None, scale=1.0):
        self.batches.append(x.shape[0])
        yy = y.to(x.dtype).reshape(-1, 1, 1, 1)
        out = scale * x * (1 + yy) + (0 if image is None else image)
        if self.learned:
            out = torch.cat([out, torch.tanh(yy).expand_as(x) + 0 * x], dim=1)
        return out


@pytest.mark.parametrize("learned", [False, True])
def test_classifier_free_guidance(learned):
    x, t = randn(*SHAPE, seed=8), torch.tensor([5, 6, 7])
    y, image = torch.tensor([1, 2, 3]), randn(*SHAPE, seed=9)
    kwargs = {"y": y, "image": image, "scale": 2.0}
    model = CountingConditionalModel(learned)
    cond = model(x, t, **kwargs)
    uncond = model(x, t, **{**kwargs, "y": torch.zeros_like(y)})
    model.batches.clear()
    for w in (0.0, 1.0):
        torch.testing.assert_close(
            classifier_free_guidance(model, w, {"y": 0})(x, t, **kwargs), [uncond, cond][int(w)]
        )
    assert model.batches == [3, 3]  # w = 0 and w = 1 need one branch only
    model.batches.clear()
    for w in (0.5, 3.0):
        out = classifier_free_guidance(model, w, {"y": 0})(x, t, **kwargs)
        c = x.shape[1]
        torch.testing.assert_close(out[:, :c], uncond[:, :c] + w * (cond[:, :c] - uncond[:, :c]))
        if learned:
            torch.testing.assert_close(out[:, c:], cond[:, c:])  # variance from the conditional branch
        assert out.shape == cond.shape
    assert model.batches == [6, 6]  # one batched call of 2B per guided evaluation


def test_guided_model_runs_in_a_sampler_with_one_call_per_step():
    model = CountingConditionalModel()
    guided = classifier_free_guidance(model, 2.0, {"y": torch.tensor(0)})
    diffusion = make(1000)
    sample(
        guided,
        diffusion,
        randn(*SHAPE),
        sampler="dpmpp_2m",
        steps=5,
        model_kwargs={"y": torch.tensor([1, 1, 2])},
    )
    assert model.batches == [6] * 5


# ---- reproducibility, callbacks, dispatcher ---------------------------------------------------------


STOCHASTIC = {
    "ddpm": {},
    "ddim": {"eta": 1.0},
    "euler_ancestral": {},
    "dpmpp_2m_sde": {},
    "edm": {"s_churn": 10.0},
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_samplers_are_reproducible_with_a_generator(name, fake_model):
    diffusion = make(1000, "linear")
    noise = randn(*SHAPE, seed=10)

    def run(seed):
        return sample(
            fake_model(2),
            diffusion,
            noise,
            sampler=name,
            steps=8,
            generator=torch.Generator().manual_seed(seed),
            **STOCHASTIC[name],
        )

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.allclose(run(1), run(2))


@pytest.mark.parametrize("name", GAUSSIAN_SAMPLERS)
def test_callback_once_per_step_with_shapes(name, fake_model):
    diffusion = make(1000, "linear")
    seen = []
    steps = 6
    out = sample(
        fake_model(2), diffusion, randn(*SHAPE, seed=11), sampler=name, steps=steps, callback=seen.append
    )
    assert out.shape == SHAPE and torch.isfinite(out).all()
    total = steps + (RESTART_STEPS * RESTART_REPEATS if name == "restart" else 0)  # + the retraced steps
    assert [info.index for info in seen] == list(range(total))
    assert all(info.total == total and info.x.shape == SHAPE and info.pred_x0.shape == SHAPE for info in seen)
    timesteps = [info.timestep for info in seen]
    assert timesteps[-1] >= 0 and timesteps[0] <= 999
    if name != "restart":  # restart climbs back up its interval
        assert timesteps == sorted(timesteps, reverse=True)


def test_dispatcher_rejects_bad_arguments(fake_model):
    diffusion = make(100)
    noise = randn(*SHAPE)
    with pytest.raises(ValueError, match="sampler must be one of ddpm, ddim, .*, cold_naive; got .plms."):
        sample(fake_model(2), diffusion, noise, sampler="plms")
    with pytest.raises(DifforgeError, match=r"steps must be an integer in 1..100 for this model; got 101"):
        sample(fake_model(2), diffusion, noise, sampler="ddim", steps=101)
    with pytest.raises(DifforgeError, match="spacing must be one of uniform, logsnr, karras; got 'cosine'"):
        sample(fake_model(2), diffusion, noise, sampler="euler", spacing="cosine")
    with pytest.raises(DifforgeError, match="eta must be >= 0"):
        ddim(fake_model(2), diffusion, noise, [0, 50], eta=-1.0)
    with pytest.raises(
        DifforgeError, match="sigmas must be a strictly decreasing list of noise levels ending in 0"
    ):
        euler(fake_model(2), diffusion, noise, [1.0, 2.0, 0.0])
    with pytest.raises(
        DifforgeError, match="timesteps must be a non-empty subset of the process's timesteps"
    ):
        sigmas_for_timesteps(diffusion, [5, 100])
    with pytest.raises(DifforgeError, match="timesteps must not repeat"):
        ddpm(fake_model(2), diffusion, noise, [5, 5, 7])
    with pytest.raises(DifforgeError, match=r"model output shape \(3, 4, 4, 4\) != x_t shape"):
        ddpm(fake_model(2, 4), diffusion, noise, [0, 50])


# ---- DDIM with the learned variance ----------------------------------------------------------


def _variance_pinned(model, value: float):
    """``model``'s prediction channels with the variance channels pinned to ``value``."""

    def pinned(x: torch.Tensor, t: torch.Tensor, **kwargs: object) -> torch.Tensor:
        out = model(x, t)
        channels = x.shape[1]
        return torch.cat([out[:, :channels], torch.full_like(out[:, channels:], value)], dim=1)

    return pinned


def test_ddim_var_at_the_posterior_variance_is_ddim_with_eta_1(fake_model, assert_rel) -> None:
    diffusion = make(T=200, variance="learned_range", loss="hybrid")
    model = _variance_pinned(fake_model(3, out_channels=6), -1.0)  # v = -1: Sigma = beta~_t
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    steps = torch.randn(10, 2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    learned = ddim_var(model, diffusion, noise, "10", step_noise=steps)
    eta_one = ddim(model, diffusion, noise, "10", eta=1.0, step_noise=steps)
    assert_rel(learned, eta_one, 1e-12, "ddim_var(v=-1) vs ddim(eta=1)")


def test_ddim_var_follows_its_closed_form(fake_model, assert_rel) -> None:
    diffusion = make(T=100, variance="learned_range", loss="hybrid")
    network = fake_model(3, out_channels=6)
    noise = torch.randn(1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    steps = torch.randn(5, 1, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = ddim_var(network, diffusion, noise, "5", step_noise=steps, clip_denoised=False)
    # float64 by hand on the respaced chain: sigma^2 = min(Sigma_theta, 1 - alpha_bar_s)
    kept = diffusion.schedule.timesteps("5")
    alpha_bar = diffusion.schedule.alphas_cumprod[kept]
    x = noise.clone()
    for step, index in enumerate(reversed(range(len(kept)))):
        a_t = float(alpha_bar[index])
        a_s = float(alpha_bar[index - 1]) if index > 0 else 1.0
        beta = 1 - a_t / a_s
        beta_tilde = (1 - a_s) / (1 - a_t) * beta if index > 0 else (1 - float(alpha_bar[0])) / 1.0
        if index == 0:  # IDDPM's clipped log: beta~ of the next step
            a_1 = float(alpha_bar[1])
            beta_tilde = (1 - a_t) / (1 - a_1) * (1 - a_1 / a_t)
        out = network(x, torch.full((1,), int(kept[index])))
        eps, v = out[:, :3], out[:, 3:]
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        frac = (v + 1) / 2
        sigma_sq = torch.minimum(torch.exp(frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)),
                                 torch.tensor(1 - a_s, dtype=torch.float64))  # fmt: skip
        x = math.sqrt(a_s) * x0 + torch.sqrt((1 - a_s) - sigma_sq) * eps + torch.sqrt(sigma_sq) * steps[step]
    assert_rel(ours, x, 1e-10, "ddim_var closed form")


def test_ddim_var_of_a_fixed_variance_model_uses_that_variance(fake_model, assert_rel) -> None:
    model = fake_model(3)
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    steps = torch.randn(8, 2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    small = make(T=100)  # fixed_small: sigma^2 = beta~_t, DDIM's eta = 1
    ours = ddim_var(model, small, noise, "8", step_noise=steps)
    assert_rel(ours, ddim(model, small, noise, "8", eta=1.0, step_noise=steps), 1e-12, "fixed_small")
