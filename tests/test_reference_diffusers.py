"""difforge's samplers against diffusers' schedulers, full sampling loops, to 1e-5 relative.

Both sides get identical betas (``trained_betas``), the same timesteps, the same injected
noise and the same deterministic eps-model f(x, t) = 0.3 x + 0.01 t / 1000. diffusers works
in float32 (its alpha_bar and sigmas are float32 tensors), so the comparison is in float32:
our samplers run on float32 tensors with coefficients from float64 tables, and the final
samples must agree to 1e-5 relative (max-norm). The float32 schedule makes diffusers' own
sigma_min off by up to ~1e-4 relative (1 - alpha_bar_0 = beta_0 ~ 1e-4 loses ~4 of float32's
7 digits), which moves the final samples by a few 1e-6 at most — inside the tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from difforge.diffusion import GaussianDiffusion
from difforge.sampling import (
    ddim,
    ddpm,
    dpmpp_2m,
    euler,
    heun,
    karras_sigmas,
    noise_levels,
    sigmas_for_timesteps,
)
from difforge.schedule import NoiseSchedule, named_betas

# diffusers' own numpy 2 deprecation notices, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOL = 1e-5
T = 1000
SHAPE = (2, 3, 4, 4)


def eps_model(calls: list | None = None):
    def model(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        if calls is not None:
            calls.append(float(t[0]))
        return 0.3 * x + 0.01 * (t.to(x.dtype) / 1000.0).reshape(-1, 1, 1, 1)

    return model


def setup(name: str = "linear"):
    betas = named_betas(name, T)
    diffusion = GaussianDiffusion(NoiseSchedule(betas))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    return betas, diffusion, noise


def run_scheduler(scheduler, noise, variance_noise=None, generator=None, calls=None):
    """diffusers' own loop: init_noise_sigma, scale_model_input, step."""
    model = eps_model(calls)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        output = model(scheduler.scale_model_input(x, t), t)
        kwargs = {}
        if variance_noise is not None:
            kwargs["variance_noise"] = variance_noise[i]
        if generator is not None:
            kwargs["generator"] = generator
        x = scheduler.step(output, t, x, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_matches_ddpm_scheduler(name, steps, assert_rel):
    betas, diffusion, noise = setup(name)
    scheduler = DDPMScheduler(
        num_train_timesteps=T, trained_betas=betas.tolist(), variance_type="fixed_small", clip_sample=False
    )
    scheduler.set_timesteps(steps)
    theirs_calls: list[float] = []
    theirs = run_scheduler(scheduler, noise, generator=torch.Generator().manual_seed(3), calls=theirs_calls)
    calls: list[float] = []
    ours = ddpm(
        eps_model(calls),
        diffusion,
        noise,
        scheduler.timesteps.numpy(),
        clip_denoised=False,
        generator=torch.Generator().manual_seed(3),
    )
    assert calls == theirs_calls
    assert_rel(ours, theirs, TOL, "ddpm")


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_ddim_scheduler(steps, eta, assert_rel):
    betas, diffusion, noise = setup("linear")
    scheduler = DDIMScheduler(
        num_train_timesteps=T,
        trained_betas=betas.tolist(),
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(steps)
    # diffusers also draws noise at the last step (where its std is 0); ours draws K - 1
    generator = torch.Generator().manual_seed(4)
    variance_noise = [torch.randn(SHAPE, generator=generator) for _ in range(steps)]
    x = noise
    model = eps_model()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(x, t), t, x, eta=eta, variance_noise=variance_noise[i]).prev_sample
    ours = ddim(
        eps_model(),
        diffusion,
        noise,
        scheduler.timesteps.numpy(),
        eta=eta,
        clip_denoised=False,
        generator=torch.Generator().manual_seed(4),
    )
    assert_rel(ours, x, TOL, f"ddim eta={eta}")


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("spacing", ["uniform", "karras"])
def test_dpmpp_2m_matches_dpm_solver_multistep(spacing, steps, assert_rel):
    betas, diffusion, noise = setup("linear")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=betas.tolist(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_karras_sigmas=spacing == "karras",
        # diffusers also drops to first order at the second-to-last step when steps < 15;
        # the first-order last step (to sigma = 0) stays, as in ours
        lower_order_final=False,
    )
    scheduler.set_timesteps(steps)
    theirs_calls: list[float] = []
    theirs = run_scheduler(scheduler, noise, calls=theirs_calls)
    if spacing == "karras":
        sigmas = karras_sigmas(diffusion, steps)
    else:
        sigmas = sigmas_for_timesteps(diffusion, scheduler.timesteps.numpy())
        np.testing.assert_array_equal(sigmas, noise_levels(diffusion, steps, "uniform"))
    # diffusers' sigmas come from its float32 alpha_bar (see the module docstring)
    np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=2e-4)
    calls: list[float] = []
    # DPM-Solver starts from x_T = noise (init_noise_sigma = 1); ours from the same x_T
    ours = dpmpp_2m(eps_model(calls), diffusion, noise, sigmas, quantize=True, clip_denoised=False)
    assert calls == theirs_calls == scheduler.timesteps.tolist()
    assert_rel(ours, theirs, TOL, f"dpmpp_2m {spacing}")


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize(
    ("sampler", "scheduler_class"), [(euler, EulerDiscreteScheduler), (heun, HeunDiscreteScheduler)]
)
def test_euler_and_heun_match_diffusers_with_karras_sigmas(sampler, scheduler_class, steps, assert_rel):
    betas, diffusion, noise = setup("linear")
    scheduler = scheduler_class(num_train_timesteps=T, trained_betas=betas.tolist(), use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    theirs_calls: list[float] = []
    theirs = run_scheduler(scheduler, noise, calls=theirs_calls)
    sigmas = karras_sigmas(diffusion, steps)
    calls: list[float] = []
    # Their first x is noise * init_noise_sigma (= sigma_max with their "linspace" spacing);
    # ours is noise * sqrt(1 + sigma_max^2) (the x_T of the discrete chain in VE variables):
    # rescale the noise so both start from the same point.
    start = noise * (float(scheduler.init_noise_sigma) / math.sqrt(1.0 + sigmas[0] ** 2))
    ours = sampler(eps_model(calls), diffusion, start, sigmas, quantize=False, clip_denoised=False)
    # their model timesteps are fractional (float32); ours are the same log-sigma interpolation
    np.testing.assert_allclose(calls, theirs_calls, rtol=1e-4, atol=1e-3)
    assert len(calls) == (2 * steps - 1 if sampler is heun else steps)
    assert_rel(ours, theirs, TOL, sampler.__name__)
