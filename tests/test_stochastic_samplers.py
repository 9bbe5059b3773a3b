"""The stochastic samplers (euler_ancestral, dpmpp_2m_sde, edm) against diffusers, against
their deterministic limits, and every registered Gaussian sampler against a closed form.

The closed form: for data x0 ~ N(0, s^2 I) the exact denoiser is
E[x0 | x0 + sigma n = x] = s^2 / (s^2 + sigma^2) x, so an eps-model built from it is perfect
and a correct sampler must return samples of standard deviation s (up to its discretisation
error, which shrinks with the steps).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from difforge.diffusion import GaussianDiffusion
from difforge.errors import DifforgeError
from difforge.sampling import (
    RestartInterval,
    SampleConfig,
    ancestral_levels,
    dpmpp_2m,
    dpmpp_2m_sde,
    edm,
    euler,
    euler_ancestral,
    get_sampler,
    heun,
    karras_sigmas,
    restart,
    sample,
    sampler_names,
)
from difforge.schedule import NoiseSchedule, named_betas

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

T = 1000
SHAPE = (2, 3, 4, 4)


def eps_model(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
    """The deterministic test model of tests/test_reference_diffusers.py."""
    t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
    return 0.3 * x + 0.01 * (t.to(x.dtype) / 1000.0).reshape(-1, 1, 1, 1)


def setup():
    betas = named_betas("linear", T)
    return (
        betas,
        GaussianDiffusion(NoiseSchedule(betas)),
        torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)),
    )


def recorded_noise(seed: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_sde_matches_diffusers_sde_dpmsolver(steps, assert_rel):
    betas, diffusion, noise = setup()
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=betas.tolist(),
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        use_karras_sigmas=True,
        lower_order_final=False,
    )
    scheduler.set_timesteps(steps)
    draws = recorded_noise(5, steps)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(eps_model(x, t), t, x, variance_noise=draws[i]).prev_sample
    sigmas = karras_sigmas(diffusion, steps)
    np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=2e-4)
    ours = dpmpp_2m_sde(
        eps_model,
        diffusion,
        noise,
        sigmas,
        quantize=True,
        clip_denoised=False,
        step_noise=lambda i, _: draws[i],
    )
    # diffusers' float32 sigmas (see tests/test_reference_diffusers.py) enter the noise terms
    # sigma_next sqrt(1 - e^{-2h}) z directly: 2e-5 here, against 1e-5 for the ODE solvers
    assert_rel(ours, x, 3e-5, "dpmpp_2m_sde")


@pytest.mark.parametrize("steps", [10, 30])
def test_euler_ancestral_matches_diffusers(steps, assert_rel):
    betas, diffusion, noise = setup()
    scheduler = EulerAncestralDiscreteScheduler(num_train_timesteps=T, trained_betas=betas.tolist())
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(6)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(
            eps_model(scheduler.scale_model_input(x, t), t), t, x, generator=generator
        ).prev_sample
    draws = recorded_noise(6, steps)  # diffusers draws at every step, the last one unused
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    ours = euler_ancestral(
        eps_model,
        diffusion,
        noise,
        sigmas,
        quantize=False,
        clip_denoised=False,
        step_noise=lambda i, _: draws[i],
    )
    assert_rel(ours, x, 3e-5, "euler_ancestral")  # float32 sigma_up, as for dpmpp_2m_sde


def test_ancestral_levels_closed_form():
    down, up = ancestral_levels(2.0, 1.0)
    assert up == pytest.approx(math.sqrt(3.0) / 2.0) and down == pytest.approx(0.5)
    assert down**2 + up**2 == pytest.approx(1.0)  # the level after the noise is sigma_next
    assert ancestral_levels(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    assert ancestral_levels(2.0, 0.0) == (0.0, 0.0)
    assert ancestral_levels(2.0, 1.9, eta=100.0)[1] == 1.9  # sigma_up never exceeds sigma_next


@pytest.mark.parametrize(
    ("stochastic", "options", "deterministic"),
    [
        (euler_ancestral, {"eta": 0.0}, euler),
        (dpmpp_2m_sde, {"eta": 0.0}, dpmpp_2m),
        (edm, {"s_churn": 0.0}, heun),
        (edm, {"s_churn": 50.0, "s_tmin": 1e4}, heun),  # churn outside every level
        (restart, {"intervals": ()}, heun),
        (restart, {"intervals": (RestartInterval(10, 2.0, 3, 0),)}, heun),  # zero repeats
    ],
)
def test_no_noise_limits_are_the_ode_solvers(stochastic, options, deterministic):
    _, diffusion, noise = setup()
    sigmas = karras_sigmas(diffusion, 12)
    asked: list[int] = []

    def never(index: int, x: torch.Tensor) -> torch.Tensor:
        asked.append(index)
        return torch.zeros_like(x)

    ours = stochastic(eps_model, diffusion, noise, sigmas, step_noise=never, **options)
    torch.testing.assert_close(ours, deterministic(eps_model, diffusion, noise, sigmas), rtol=1e-6, atol=1e-6)
    assert asked == []


def edm_alg2_float64(denoise, x: np.ndarray, sigmas, draws, s_churn, s_tmin, s_tmax, s_noise) -> np.ndarray:
    """EDM Alg. 2 line by line in float64 (the reference for `edm`)."""
    n = len(sigmas) - 1
    for i in range(n):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * draws[i]
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if t_next != 0:
            d_prime = (x - denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


def test_edm_matches_algorithm_2_in_float64():
    _, diffusion, noise = setup()
    scale = 0.7

    def denoise(x, sigma):  # the closed-form denoiser of N(0, scale^2) data
        return scale**2 / (scale**2 + sigma**2) * x

    def model(x_t, t, **kwargs):  # the same denoiser as an eps-model at fractional t
        sigma = torch.as_tensor(_sigma_at(diffusion, t.double()), dtype=torch.float64).reshape(-1, 1, 1, 1)
        x = x_t.double() * torch.sqrt(1 + sigma**2)
        return ((x - denoise(x, sigma)) / sigma).to(x_t.dtype)

    sigmas = karras_sigmas(diffusion, 10, sigma_max=40.0)
    draws = recorded_noise(7, 10)
    churn = {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 20.0, "s_noise": 1.007}
    start = noise.double() * math.sqrt(1 + sigmas[0] ** 2)
    ref = edm_alg2_float64(denoise, start.numpy(), sigmas, [d.double().numpy() for d in draws], **churn)
    ours = edm(
        model,
        diffusion,
        noise.double(),
        sigmas,
        quantize=False,
        clip_denoised=False,
        step_noise=lambda i, _: draws[i],
        **churn,
    )
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=1e-9)


def _sigma_at(diffusion: GaussianDiffusion, t: torch.Tensor) -> np.ndarray:
    """The noise level of a fractional timestep: the inverse of ``schedule.sigma_to_t``."""
    log_sigmas = np.log(diffusion.schedule.sigmas)
    return np.exp(np.interp(t.detach().cpu().numpy(), np.arange(len(log_sigmas)), log_sigmas))


def gaussian_data_model(diffusion: GaussianDiffusion, scale: float):
    """The perfect eps-model of x0 ~ N(0, scale^2 I) at any (fractional) timestep."""

    def model(x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        sigma = torch.as_tensor(_sigma_at(diffusion, t.double()), dtype=torch.float64)
        alpha_bar = (1.0 / (1.0 + sigma**2)).reshape(-1, 1, 1, 1)
        x = x_t.double()
        x0 = scale**2 * alpha_bar.sqrt() * x / (scale**2 * alpha_bar + 1 - alpha_bar)
        return ((x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()).to(x_t.dtype)

    return model


@pytest.mark.parametrize("name", sampler_names("gaussian"))
def test_every_sampler_draws_gaussian_data_with_its_std(name):
    _, diffusion, _ = setup()
    scale = 0.5
    noise = torch.randn((64, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    options = {"s_churn": 10.0} if name == "edm" else {}
    config = SampleConfig(sampler=name, steps=1000, clip=False, **options)
    out = sample(
        gaussian_data_model(diffusion, scale),
        diffusion,
        noise,
        config,
        generator=torch.Generator().manual_seed(2),
    )
    # 16384 values: the std of the sample std is ~0.5% of scale; at 50 steps the first-order
    # samplers (ddpm, ddim, euler, euler_ancestral) are still 5-12% low, at 1000 within 1%
    assert float(out.std()) == pytest.approx(scale, rel=0.015), name
    assert abs(float(out.mean())) < 0.02


def test_sampler_options_default_from_the_registry_and_refuse_foreign_ones():
    config = SampleConfig()
    from difforge.sampling import get_sampler

    assert config.sampler_options(get_sampler("ddim")) == {"eta": 0.0}
    assert config.sampler_options(get_sampler("euler_ancestral")) == {"eta": 1.0, "s_noise": 1.0}
    assert SampleConfig(eta=0.3).sampler_options(get_sampler("dpmpp_2m_sde"))["eta"] == 0.3
    assert get_sampler("dpmpp_2m").options == {}
    with pytest.raises(DifforgeError, match="--eta does not apply to sampler 'dpmpp_2m'"):
        SampleConfig(sampler="dpmpp_2m", eta=0.5).validate()
    with pytest.raises(DifforgeError, match="--s-churn does not apply to sampler 'ddim' .its options: --eta"):
        SampleConfig(sampler="ddim", s_churn=5.0).validate()
    with pytest.raises(DifforgeError, match="--s-tmax must be >= --s-tmin"):
        SampleConfig(sampler="edm", s_tmin=2.0, s_tmax=1.0).validate()
    with pytest.raises(DifforgeError, match="--s-noise"):
        SampleConfig(sampler="edm", s_noise=-1.0).validate()


def test_restart_retraces_its_interval_and_counts_its_evaluations():
    _, diffusion, noise = setup()
    calls: list[float] = []

    def counting(x, t, **kwargs):
        calls.append(float(t[0]))
        return eps_model(x, t)

    for steps in (1, 2, 8):
        calls.clear()
        sample(
            counting,
            diffusion,
            noise,
            SampleConfig(sampler="restart", steps=steps),
            generator=torch.Generator(),
        )
        assert len(calls) == get_sampler("restart").evaluations(steps)
    # with 8 levels: 15 calls on the way down, then twice 3 Heun steps (6 calls) from 0.3 down to ~0.06
    assert len(calls) == 15 + 2 * 6
    sigmas = karras_sigmas(diffusion, 8)
    draws = recorded_noise(3, 2)
    seen: list[float] = []
    restart(
        eps_model, diffusion, noise, sigmas, intervals=(RestartInterval(6, 1.0, 2, 2),),
        step_noise=lambda i, _: draws[i], callback=lambda info: seen.append(info.timestep),
    )  # fmt: skip
    assert len(seen) == 8 + 2 * 2 and seen[6] > seen[5] and seen[8] > seen[7]  # climbed back up twice
    with pytest.raises(DifforgeError, match="a restart interval needs 0 < index < 8"):
        restart(eps_model, diffusion, noise, sigmas, intervals=(RestartInterval(8, 1.0, 2, 1),))
    with pytest.raises(DifforgeError, match="sigma_high > sigmas.index."):
        restart(eps_model, diffusion, noise, sigmas, intervals=(RestartInterval(2, 0.01, 2, 1),))


@pytest.mark.parametrize("name", sampler_names("gaussian"))
@pytest.mark.parametrize("clip", [True, False])
def test_every_sampler_ends_on_its_last_x0_prediction_and_clips_it(name, clip):
    """The last step lands on sigma = 0 (t = -1): the sample is the denoiser's last predicted
    x0, so no residual noise is left; with clip that prediction is clamped to [-1, 1]. The
    model here over-shoots (data of std 3), so clipping has something to do."""
    _, diffusion, _ = setup()
    noise = torch.randn((8, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    seen: list = []
    out = sample(
        gaussian_data_model(diffusion, 3.0),
        diffusion,
        noise,
        SampleConfig(sampler=name, steps=6, clip=clip),
        generator=torch.Generator().manual_seed(4),
        callback=seen.append,
    )
    last = seen[-1]
    assert last.index == last.total - 1
    torch.testing.assert_close(out, last.x_next, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, last.pred_x0, rtol=1e-5, atol=1e-5)
    if clip:
        assert float(out.abs().max()) <= 1.0
    else:
        assert float(out.abs().max()) > 1.0
