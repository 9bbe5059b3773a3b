"""NoiseSchedule: named schedules, derived quantities, respacing, and bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from difforge.errors import DifforgeError
from difforge.schedule import SCHEDULE_NAMES, NoiseSchedule, named_betas, respaced_timesteps


@pytest.mark.parametrize("T", [21, 1000, 4000])
def test_linear_schedule_endpoints_scale_with_T(T):
    betas = named_betas("linear", T)
    assert betas[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-12)
    np.testing.assert_allclose(np.diff(betas), np.diff(betas)[0], rtol=1e-9)


def test_cosine_schedule_follows_alpha_bar_formula():
    T, s = 1000, 0.008
    schedule = NoiseSchedule.named("cosine", T)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # alpha_bar_t = f(t + 1) / f(0) (IDDPM eq. 17) wherever no beta was clipped
    clipped = schedule.betas >= 0.999
    assert clipped.sum() == 1 and clipped[-1]  # only the last step hits the 0.999 cap
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    np.testing.assert_allclose(schedule.alphas_cumprod[:-1], expected[:-1], rtol=1e-9)
    assert schedule.betas.max() == 0.999


def test_quadratic_and_sigmoid_schedules():
    T = 100
    start, end = 1e-4 * 10, 0.02 * 10
    quadratic = named_betas("quadratic", T)
    np.testing.assert_allclose(np.sqrt(quadratic), np.linspace(start**0.5, end**0.5, T), rtol=1e-12)
    sigmoid = named_betas("sigmoid", T)
    x = np.linspace(-6, 6, T)
    np.testing.assert_allclose(sigmoid, start + (end - start) / (1 + np.exp(-x)), rtol=1e-12)
    for name in SCHEDULE_NAMES:
        betas = named_betas(name, T)
        assert np.all(np.diff(betas) >= 0) and np.all((betas > 0) & (betas < 1))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_derived_quantities_satisfy_their_definitions(name):
    s = NoiseSchedule.named(name, 200)
    ab, ab_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    np.testing.assert_allclose(ab, np.cumprod(1 - s.betas), rtol=1e-14)
    assert ab_prev[0] == 1.0 and s.alphas_cumprod_next[-1] == 0.0
    np.testing.assert_allclose(ab_prev[1:], ab[:-1], rtol=0)
    np.testing.assert_allclose(s.posterior_variance, s.betas * (1 - ab_prev) / (1 - ab), rtol=1e-14)
    assert s.posterior_variance[0] == 0.0
    np.testing.assert_allclose(
        s.posterior_log_variance_clipped, np.log(np.append(s.posterior_variance[1], s.posterior_variance[1:]))
    )
    np.testing.assert_allclose(s.posterior_mean_coef1, s.betas * np.sqrt(ab_prev) / (1 - ab), rtol=1e-14)
    np.testing.assert_allclose(s.posterior_mean_coef2, (1 - ab_prev) * np.sqrt(1 - s.betas) / (1 - ab))
    np.testing.assert_allclose(s.snr, ab / (1 - ab), rtol=1e-14)
    np.testing.assert_allclose(s.sigmas, 1 / np.sqrt(s.snr), rtol=1e-14)
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod, s.sigmas, rtol=1e-12)
    assert np.all(np.diff(s.snr) < 0)  # SNR falls with t
    for array in vars(s).values():
        if isinstance(array, np.ndarray) and array.dtype.kind == "f":
            assert array.dtype == np.float64 and array.shape == (200,)


def test_respaced_schedule_keeps_alpha_bar_at_kept_steps():
    schedule = NoiseSchedule.named("cosine", 1000)
    respaced, timestep_map = schedule.respace("10,15,20")
    assert respaced.num_steps == len(timestep_map) == 45 and respaced.is_respaced
    assert not schedule.is_respaced
    # (float64 round-off: 1 - beta' loses digits where alpha_bar is ~1e-9 at the end of cosine)
    np.testing.assert_allclose(respaced.alphas_cumprod, schedule.alphas_cumprod[timestep_map], rtol=1e-10)
    np.testing.assert_array_equal(respaced.timestep_map, timestep_map)
    # respacing a respaced schedule composes, and indices stay original
    twice, twice_map = respaced.respace("ddim15")
    assert set(twice_map) <= set(timestep_map)
    np.testing.assert_allclose(twice.alphas_cumprod, schedule.alphas_cumprod[twice_map], rtol=1e-10)
    # explicit kept indices
    explicit, explicit_map = schedule.respace(np.array([999, 0, 500]))
    assert explicit_map.tolist() == [0, 500, 999]
    assert explicit.betas[0] == schedule.betas[0]


def test_respacing_rules():
    assert respaced_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert respaced_timesteps(100, "100") == list(range(100))
    assert respaced_timesteps(1000, 1) == [0]
    assert respaced_timesteps(300, [10, 15, 20])[:10] == [round(i * 99 / 9) for i in range(10)]
    assert respaced_timesteps(10, "ddim10") == list(range(10))


def test_sigma_to_t_inverts_the_schedule_in_original_indices():
    schedule = NoiseSchedule.named("linear", 1000)
    np.testing.assert_allclose(schedule.sigma_to_t(schedule.sigmas), np.arange(1000), atol=1e-9)
    middle = np.exp(0.5 * (np.log(schedule.sigmas[10]) + np.log(schedule.sigmas[11])))
    assert schedule.sigma_to_t(middle) == pytest.approx(10.5)
    respaced, timestep_map = schedule.respace("ddim10")
    np.testing.assert_allclose(respaced.sigma_to_t(respaced.sigmas), timestep_map)
    assert schedule.sigma_to_t(1e6) == 999 and schedule.sigma_to_t(1e-9) == 0


# ---- bad input ---------------------------------------------------------------------------


def test_unknown_schedule_name_lists_the_names():
    with pytest.raises(ValueError, match="schedule name 'cosin'") as info:
        NoiseSchedule.named("cosin", 100)
    assert isinstance(info.value, DifforgeError)
    for name in SCHEDULE_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("steps", [0, -5, 2.5, True, "100"])
def test_bad_num_steps(steps):
    with pytest.raises(DifforgeError, match=r"the linear schedule needs num_steps >= 21 .*got num_steps=20"):
        named_betas("linear", 20)
    assert named_betas("cosine", 2).shape == (2,) and named_betas("sigmoid", 21)[-1] < 1
    with pytest.raises(DifforgeError, match="num_steps must be a positive integer"):
        named_betas("linear", steps)


@pytest.mark.parametrize(
    ("betas", "message"),
    [
        ([0.1, 0.0, 0.2], r"betas must lie in the open interval \(0, 1\); betas\[1\] = 0.0"),
        ([0.1, 1.0], r"open interval \(0, 1\); betas\[1\] = 1.0"),
        ([-0.1, 0.2], r"open interval \(0, 1\); betas\[0\]"),
        ([0.1, float("nan")], r"open interval \(0, 1\)"),
        ([0.1, 0.3, 0.2], r"betas must be non-decreasing .*betas\[2\] = 0.2 < betas\[1\] = 0.3"),
        ([[0.1, 0.2], [0.3, 0.4]], r"betas must be a non-empty 1-D array, got shape \(2, 2\)"),
        ([], r"non-empty 1-D array, got shape \(0,\)"),
        (["a", "b"], r"betas must be a 1-D array of numbers"),
    ],
)
def test_bad_betas(betas, message):
    with pytest.raises(DifforgeError, match=message):
        NoiseSchedule(betas)


@pytest.mark.parametrize(
    ("T", "spec", "message"),
    [
        (1000, "2000", r"respacing spec '2000': section 0 has 1000 .* asks for 2000; ask for at most 1000"),
        (100, [10, 60], r"section 1 has 50 of the 100 steps but asks for 60; ask for at most 50"),
        (300, "10,15,200", r"section 2 has 100 .* asks for 200"),
        (1000, "ddim2000", r"respacing spec 'ddim2000': no even stride .* exactly 2000 steps"),
        (1000, "ddim300", r"no even stride of the 1000-step schedule gives exactly 300 steps; use .*'300'"),
        (1000, "ddimx", r"'ddim' must be followed by a step count, e.g. 'ddim50'"),
        (1000, "ddim0", r"step count must be >= 1"),
        (1000, "ten", r"expected 'ddimK', a step count such as '50', or comma-separated section counts"),
        (1000, "0", r"section counts must be >= 0 and sum to >= 1"),
        (1000, [3, -1], r"section counts must be >= 0"),
        (1000, 2.5, r"expected 'ddimK', an int, or a list of section counts"),
    ],
)
def test_respacing_specs_that_cannot_be_met(T, spec, message):
    with pytest.raises(DifforgeError, match=message):
        respaced_timesteps(T, spec)
    with pytest.raises(ValueError, match="respacing spec"):
        NoiseSchedule.named("linear", T).respace(spec)


def test_bad_explicit_respacing_and_timestep_map():
    schedule = NoiseSchedule.named("linear", 100)
    with pytest.raises(DifforgeError, match=r"subset of the schedule's timesteps 0..99"):
        schedule.respace(np.array([5, 100]))
    with pytest.raises(DifforgeError, match="timestep_map must be 3 strictly increasing indices"):
        NoiseSchedule([0.1, 0.2, 0.3], timestep_map=[0, 2, 2])


# ---- endpoints and custom betas (DiffusionConfig carries them; diffusers imports need them) ----


def test_linear_endpoints_are_the_ones_given() -> None:
    betas = named_betas("linear", 100, beta_start=5e-3, beta_end=9e-3)
    np.testing.assert_allclose(betas, np.linspace(5e-3, 9e-3, 100), rtol=0, atol=0)
    quadratic = named_betas("quadratic", 10, beta_start=1e-4, beta_end=4e-2)
    np.testing.assert_allclose(np.sqrt(quadratic), np.linspace(1e-2, 0.2, 10), rtol=1e-12)


@pytest.mark.parametrize(
    ("start", "end", "words"),
    [
        (0.0, 0.02, "--beta-start"),
        (1e-4, 1.0, "--beta-end"),
        (0.02, 0.01, "below"),
        (float("nan"), 0.1, "(0, 1)"),
    ],
)
def test_bad_endpoints_are_refused(start: float, end: float, words: str) -> None:
    with pytest.raises(DifforgeError, match=re.escape(words)):
        named_betas("linear", 100, beta_start=start, beta_end=end)


def test_endpoints_of_the_cosine_schedule_are_refused() -> None:
    with pytest.raises(DifforgeError, match="has none"):
        named_betas("cosine", 100, beta_start=1e-4)


def test_custom_betas_in_a_diffusion_config() -> None:
    from difforge.diffusion import DiffusionConfig

    betas = [0.01, 0.02, 0.03, 0.04]
    process = DiffusionConfig(schedule="custom", num_timesteps=4, betas=betas).build()
    np.testing.assert_array_equal(process.schedule.betas, betas)
    round_trip = DiffusionConfig.from_dict(
        DiffusionConfig(schedule="custom", num_timesteps=4, betas=betas).to_dict()
    )
    assert round_trip.betas == betas
    with pytest.raises(DifforgeError, match="4 betas for 5 timesteps"):
        DiffusionConfig(schedule="custom", num_timesteps=5, betas=betas).build()
    with pytest.raises(DifforgeError, match="schedule 'custom'"):
        DiffusionConfig(schedule="linear", num_timesteps=4, betas=betas).build()
    with pytest.raises(DifforgeError, match="non-decreasing"):
        DiffusionConfig(schedule="custom", num_timesteps=4, betas=[0.02, 0.01, 0.03, 0.04]).build()
