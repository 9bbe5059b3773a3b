"""Cold diffusion: the degradations against closed forms and independent float64
computations (SciPy, torch's own convolution and resampling), the two samplers with a
perfect restorer, the Gaussian-mixture prior against scikit-learn, and the process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difforge.cold import ColdConfig, ColdProcess
from difforge.degradations import (
    BLUR_ROUTINES,
    DEGRADATIONS,
    Blur,
    Pixelate,
    blur_stds,
    build_degradation,
    factor_chain,
    gaussian_kernel_1d,
    luma,
)
from difforge.errors import DifforgeError
from difforge.mixture import GaussianMixture, fit_gaussian_mixture
from difforge.sampling import SampleConfig, cold, cold_levels, cold_naive, get_sampler, sample

T = 12


def config(degradation: str, **settings: object) -> ColdConfig:
    return ColdConfig(degradation=degradation, num_timesteps=T, **settings)  # type: ignore[arg-type]


def images(
    channels: int = 3, size: int = 16, batch: int = 4, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Smooth-ish test pictures in [-1, 1] with structure at every scale."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((batch, channels, size, size), generator=generator, dtype=dtype)
    ramp = torch.linspace(-1, 1, size, dtype=dtype)
    return (0.6 * x + 0.4 * ramp[None, None, :, None] * ramp[None, None, None, :]).clamp(0, 1) * 2 - 1


ALL_SETTINGS = [
    ("blur", {}),
    ("blur", {"blur_padding": "reflect", "discrete": False}),
    ("blur", {"blur_routine": "celeba", "blur_size": 5}),
    ("mask", {}),
    ("mask", {"target": "grey", "discrete": False}),
    ("pixelate", {}),
    ("fade", {}),
    ("fade", {"target": "#ff8000"}),
    ("decolorize", {}),
    ("noise", {}),
]
IDS = [f"{name}-{'-'.join(map(str, s.values())) or 'default'}" for name, s in ALL_SETTINGS]


def degrade(
    process: ColdProcess, x0: torch.Tensor, level: int | torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    levels = level if isinstance(level, torch.Tensor) else torch.full((x0.shape[0],), level)
    return process.degrade(x0, levels, noise if process.degradation.needs_noise else None)


# ---- every degradation -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "settings"), ALL_SETTINGS, ids=IDS)
def test_level_zero_is_the_image_and_the_walk_is_deterministic_and_monotone(name, settings) -> None:
    process = config(name, **settings).build()
    x0 = images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=x0.dtype)
    assert torch.equal(degrade(process, x0, 0, noise), x0)
    distances = []
    for level in range(T + 1):
        once = degrade(process, x0, level, noise)
        assert torch.equal(once, degrade(process, x0.clone(), level, noise.clone()))  # deterministic
        distances.append((once - x0).flatten(1).norm(dim=1))
    steps = torch.stack(distances).diff(dim=0)
    assert bool((steps >= -1e-9).all()), steps.min()  # each image moves away from x0, never back
    assert bool((distances[-1] > 0.1).all())


@pytest.mark.parametrize(("name", "settings"), ALL_SETTINGS, ids=IDS)
def test_mixed_levels_in_one_batch_match_one_level_at_a_time(name, settings) -> None:
    process = config(name, **settings).build()
    x0 = images(batch=6)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=x0.dtype)
    levels = torch.tensor([0, 3, T, 1, 7, T - 1])
    mixed = degrade(process, x0, levels, noise)
    for i, level in enumerate(levels.tolist()):
        alone = degrade(process, x0[i : i + 1], level, noise[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "settings"), ALL_SETTINGS, ids=IDS)
@pytest.mark.parametrize("naive", [False, True], ids=["algorithm2", "algorithm1"])
@pytest.mark.parametrize("steps", [T, 5])
def test_a_perfect_restorer_gives_back_x0_with_both_samplers(name, settings, naive, steps) -> None:
    process = config(name, **settings).build()
    x0 = images()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=x0.dtype)
    x_t = degrade(process, x0, T, noise)
    calls = []

    def perfect(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.tolist())
        return x0

    levels = cold_levels(T, steps)
    restored = cold(perfect, process, x_t, levels, naive=naive, generator=torch.Generator().manual_seed(4))
    if process.degradation.needs_noise and not naive:
        torch.testing.assert_close(restored, x0, rtol=0, atol=1e-12)  # z is estimated from x_s
    else:
        assert torch.equal(restored, x0)
    assert [t[0] for t in calls] == [level - 1 for level in levels[:-1]]  # the network sees s - 1


def test_algorithm_2_cancels_a_restorer_error_that_algorithm_1_keeps() -> None:
    """The paper's section 3.3: with R = x0 + e, Algorithm 2 ends near x0 + e - D(e, 1) ...
    for a linear D, and Algorithm 1 at x0 + e: with a smooth-ish D it is the smaller error."""
    process = config("blur", discrete=False).build()
    x0 = images()
    error = 0.2 * images(batch=4).flip(0)
    x_t = degrade(process, x0, T, x0)

    def biased(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x0 + error

    levels = cold_levels(T, T)
    improved = cold(biased, process, x_t, levels, clip_denoised=False)
    naive = cold(biased, process, x_t, levels, clip_denoised=False, naive=True)
    torch.testing.assert_close(naive, x0 + error)  # Algorithm 1 ends at R's output
    # Algorithm 2 telescopes: x_0 = D(x0, T) - D(R, T) + R = x0 + e - D(e, T)
    expected = x0 + error - degrade(process, error, T, x0)
    torch.testing.assert_close(improved, expected)
    assert (improved - x0).norm() < (naive - x0).norm()


# ---- blur --------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["circular", "reflect"])
@pytest.mark.parametrize("routine", BLUR_ROUTINES)
def test_blur_matches_scipy_s_repeated_gaussian_filters_in_float64(padding: str, routine: str) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    size = 5 if routine == "celeba" else 3
    blur = Blur(T, routine=routine, blur_std=0.3, blur_size=size, padding=padding, discrete=False)
    x0 = images(channels=2, size=11)
    mode = {"circular": "wrap", "reflect": "mirror"}[padding]  # scipy's mirror = torch's reflect
    for level in (1, 4, T):
        expected = x0.numpy().copy()
        for std in blur_stds(routine, 0.3, T)[:level]:
            kernel = gaussian_kernel_1d(size, std)
            for axis in (2, 3):
                expected = ndimage.correlate1d(expected, kernel, axis=axis, mode=mode)
        got = blur.degrade(x0, torch.full((4,), level))
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


def test_blur_matches_the_paper_s_conv2d_per_step_in_float32() -> None:
    """The paper's code: one padded 3 x 3 conv2d per step; ours: one FFT for all steps."""
    for padding in ("circular", "reflect"):
        blur = Blur(T, routine="incremental", blur_std=0.1, blur_size=3, padding=padding, discrete=False)
        x0 = images(channels=1, size=16, dtype=torch.float32)
        x = x0
        for level, std in enumerate(blur_stds("incremental", 0.1, T), start=1):
            kernel = torch.from_numpy(np.outer(*(2 * [gaussian_kernel_1d(3, std)]))).float()[None, None]
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode=padding), kernel)
            torch.testing.assert_close(blur.degrade(x0, torch.full((4,), level)), x, rtol=0, atol=2e-6)


def test_blur_of_a_constant_image_is_that_image_and_discrete_ends_at_the_mean() -> None:
    for padding in ("circular", "reflect"):
        process = config("blur", blur_padding=padding, blur_std=2.0, blur_size=7, discrete=True).build()
        constant = torch.full((2, 3, 9, 9), 0.3, dtype=torch.float64)
        for level in range(T + 1):
            torch.testing.assert_close(
                degrade(process, constant, level, constant), constant, rtol=0, atol=1e-12
            )
        x0 = images()
        top = degrade(process, x0, T, x0)
        torch.testing.assert_close(top, x0.mean(dim=(2, 3), keepdim=True).expand_as(x0), rtol=0, atol=1e-12)
        assert process.degradation.endpoint == "mean"


def test_circular_blur_keeps_the_mean_colour() -> None:
    process = config("blur", discrete=False, blur_std=1.0, blur_size=5).build()
    x0 = images()
    for level in (1, 6, T):
        blurred = degrade(process, x0, level, x0)
        torch.testing.assert_close(blurred.mean(dim=(2, 3)), x0.mean(dim=(2, 3)), rtol=0, atol=1e-12)


# ---- pixelate, mask, fade, decolorize, noise -------------------------------------------------------


def test_pixelate_at_factor_k_is_area_downsampling_then_nearest_upsampling() -> None:
    assert factor_chain(32, 1) == [1, 2, 4, 8, 16, 32] and factor_chain(28, 1) == [1, 2, 4, 28]
    assert factor_chain(32, 4) == [1, 2, 4, 8]
    pixelate = Pixelate(4, pixelate_min=1)  # one level per factor of 16: 1, 2, 4, 8, 16
    x0 = images(size=16)
    for level, k in enumerate([1, 2, 4, 8, 16]):
        expected = F.interpolate(F.interpolate(x0, size=16 // k, mode="area"), size=16, mode="nearest")
        torch.testing.assert_close(
            pixelate.degrade(x0, torch.full((4,), level)), expected, rtol=0, atol=1e-12
        )
    mean = x0.mean(dim=(2, 3), keepdim=True).expand_as(x0)
    torch.testing.assert_close(pixelate.degrade(x0, torch.full((4,), 4)), mean, rtol=0, atol=1e-12)


def test_pixelate_levels_between_factors_blend_the_two() -> None:
    pixelate = Pixelate(8, pixelate_min=1)  # two levels per factor of 16
    x0 = images(size=16)

    def at(k: int) -> torch.Tensor:
        return F.interpolate(F.avg_pool2d(x0, k), size=16, mode="nearest")

    torch.testing.assert_close(pixelate.degrade(x0, torch.full((4,), 3)), 0.5 * at(2) + 0.5 * at(4))
    with pytest.raises(DifforgeError, match="leaves nothing to pixelate"):
        Pixelate(8, pixelate_min=16).degrade(x0, torch.full((4,), 3))


def test_mask_fades_from_the_centre_out_towards_its_target() -> None:
    mask = build_degradation(config("mask", discrete=False).degradation_settings())
    keep = mask.keep(16, 16)  # type: ignore[attr-defined]
    assert np.all(keep[0] == 1) and np.all((keep >= 0) & (keep <= 1)) and np.all(np.diff(keep, axis=0) <= 0)
    assert keep[1, 7, 7] < keep[1, 0, 0]  # the centre goes first
    stds = 0.1 * (np.arange(T) + 11.0)
    expected = np.prod(
        1 - np.exp(-(0.5**2 + 7.5**2) / (2 * stds**2))
    )  # pixel (7, 0): distance^2 0.25 + 56.25
    assert keep[T, 7, 0] == pytest.approx(expected, rel=1e-12)
    x0 = images()
    black = config("mask", target="black", discrete=True).build()
    assert torch.equal(degrade(black, x0, T, x0), torch.full_like(x0, -1.0))
    assert black.degradation.endpoint is None  # a constant end cannot generate
    assert config("mask", discrete=True).build().degradation.endpoint == "mean"


def test_fade_and_decolorize_are_linear_blends() -> None:
    x0 = images()
    fade = config("fade", target="#ff0000").build()
    red = torch.tensor([1.0, -1.0, -1.0], dtype=x0.dtype).reshape(1, 3, 1, 1)
    torch.testing.assert_close(degrade(fade, x0, 3, x0), (1 - 3 / T) * x0 + (3 / T) * red)
    grey = config("decolorize").build()
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x0.dtype)
    expected = torch.einsum("bchw,c->bhw", x0, weights)[:, None].expand_as(x0)
    torch.testing.assert_close(degrade(grey, x0, T, x0), expected)
    torch.testing.assert_close(luma(x0), expected)
    with pytest.raises(DifforgeError, match="decolorize needs RGB"):
        degrade(grey, images(channels=1), 2, x0)
    with pytest.raises(DifforgeError, match="a colour needs RGB"):
        degrade(fade, images(channels=1), 2, x0)


def test_noise_is_the_gaussian_chain_and_its_noise_estimate_inverts_it() -> None:
    from difforge.schedule import NoiseSchedule

    process = config("noise").build()
    x0 = images()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=x0.dtype)
    alpha_bar = NoiseSchedule.named("cosine", T).alphas_cumprod
    for level in (1, 5, T):
        a = float(alpha_bar[level - 1])
        x_t = degrade(process, x0, level, z)
        torch.testing.assert_close(x_t, a**0.5 * x0 + (1 - a) ** 0.5 * z)
        torch.testing.assert_close(process.estimate_noise(x_t, x0, torch.full((4,), level)), z)
    with pytest.raises(DifforgeError, match="needs noise"):
        process.degrade(x0, torch.full((4,), 2))


def test_bad_levels_and_settings_are_one_line_errors() -> None:
    process = config("blur").build()
    x0 = images()
    with pytest.raises(DifforgeError, match=r"levels must be integers in 0\.\.12"):
        process.degrade(x0, torch.full((4,), T + 1))
    with pytest.raises(DifforgeError, match="must be a"):
        process.degrade(x0, torch.full((3,), 1))
    for bad, message in [
        ({"degradation": "smudge"}, "--degradation must be one of"),
        ({"blur_size": 4}, "--blur-size must be an odd"),
        ({"blur_routine": "wobbly"}, "--blur-routine must be one of"),
        ({"blur_padding": "zeros"}, "--blur-padding must be one of"),
        ({"target": "#12345"}, "--target must be mean"),
        ({"loss": "huber"}, "--loss of a cold process must be one of l1, mse"),
        ({"num_timesteps": 0}, "--timesteps must be"),
        ({"prior_noise": -1.0}, "--prior-noise must be"),
    ]:
        with pytest.raises(DifforgeError, match=message):
            ColdConfig(**bad).build()  # type: ignore[arg-type]
    assert set(DEGRADATIONS) == {"blur", "mask", "pixelate", "fade", "decolorize", "noise"}


# ---- the process and the samplers in the registry -----------------------------------------------


def test_cold_samplers_are_registered_for_cold_processes_only() -> None:
    assert get_sampler("cold", "cold").function is cold
    assert get_sampler("cold_naive", "cold").function is cold_naive
    with pytest.raises(DifforgeError, match="does not apply to a 'gaussian' process"):
        get_sampler("cold", "gaussian")
    with pytest.raises(DifforgeError, match="does not apply to a 'cold' process"):
        get_sampler("ddim", "cold")
    assert cold_levels(10, 10).tolist() == list(range(10, -1, -1))
    levels = cold_levels(50, 20)
    assert levels[0] == 50 and levels[-1] == 0 and len(levels) == 21 and np.all(np.diff(levels) < 0)
    with pytest.raises(DifforgeError, match="steps must be an integer in 1..50"):
        cold_levels(50, 51)


def test_sample_walks_back_from_the_prior_and_restores_from_a_level() -> None:
    process = config("blur").build()
    x0 = images(dtype=torch.float32)
    model = lambda x, t: x0  # noqa: E731
    restored = sample(model, process.up_to(5), degrade(process, x0, 5, x0), SampleConfig(steps=5))
    assert torch.equal(restored, x0)
    info = []
    sample(model, process, degrade(process, x0, T, x0), SampleConfig(steps=4), callback=info.append)
    assert [i.timestep for i in info] == [T - 1, 8, 5, 2] and info[-1].total == 4
    with pytest.raises(DifforgeError, match="--from-t must be"):
        process.up_to(T + 1)
    with pytest.raises(DifforgeError, match="no fitted prior"):
        process.prior_sample((2, 3, 8, 8))
    with pytest.raises(DifforgeError, match="cannot generate from nothing"):
        config("blur", discrete=False).build().prior_sample((2, 3, 8, 8))
    with pytest.raises(DifforgeError, match="lognormal needs a Gaussian process"):
        process.timestep_sampler("lognormal")


def test_the_prior_is_fitted_to_the_mean_colours_and_sampled_as_flat_images() -> None:
    x = images(batch=40, size=8)
    fitted = config("blur", prior_components=2).fit_to_data(lambda i: x[i].float(), 40)
    assert (
        fitted.prior is not None
        and config("blur", discrete=False).fit_to_data(lambda i: x[i], 40).prior is None
    )
    again = ColdConfig.from_dict(fitted.to_dict())
    assert again == fitted  # the prior survives config.json
    process = again.build()
    assert process.can_generate and not process.up_to(3).can_generate
    drawn = process.prior_sample((5, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    flat = drawn - drawn.mean(dim=(2, 3), keepdim=True)
    assert drawn.shape == (5, 3, 8, 8) and 0.0005 < float(flat.std()) < 0.004  # the 0.002 noise
    repeat = process.prior_sample((5, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, repeat)
    damaged = fitted.to_dict()
    damaged["prior"]["weights"] = [0.5]
    with pytest.raises(DifforgeError, match="cold prior .* is damaged"):
        ColdConfig.from_dict(damaged).build()


# ---- the Gaussian mixture ------------------------------------------------------------------------


def test_the_mixture_fit_matches_scikit_learn_s() -> None:
    mixture_module = pytest.importorskip("sklearn.mixture")
    rng = np.random.default_rng(0)
    points = np.concatenate(
        [
            rng.multivariate_normal([-0.5, 0.2, 0.0], 0.01 * np.eye(3), 600),
            rng.multivariate_normal([0.4, -0.3, 0.5], [[0.02, 0.01, 0], [0.01, 0.03, 0], [0, 0, 0.01]], 400),
        ]
    )
    ours = fit_gaussian_mixture(points, 2, seed=0)
    theirs = mixture_module.GaussianMixture(2, covariance_type="full", random_state=0).fit(points)
    assert ours.log_likelihood(points) == pytest.approx(theirs.score(points), abs=1e-3)
    order = np.argsort(ours.means[:, 0])
    their_order = np.argsort(theirs.means_[:, 0])
    np.testing.assert_allclose(ours.means[order], theirs.means_[their_order], atol=1e-3)
    np.testing.assert_allclose(ours.weights[order], theirs.weights_[their_order], atol=1e-3)
    np.testing.assert_allclose(ours.covariances[order], theirs.covariances_[their_order], atol=1e-4)


def test_mixture_samples_have_its_moments_and_bad_data_is_refused() -> None:
    mixture = GaussianMixture(np.array([0.3, 0.7]), np.array([[-1.0], [2.0]]), np.array([[[0.25]], [[1.0]]]))
    draws = mixture.sample(200_000, torch.Generator().manual_seed(0)).double().numpy()[:, 0]
    mean = 0.3 * -1 + 0.7 * 2
    variance = 0.3 * (0.25 + 1) + 0.7 * (1 + 4) - mean**2
    assert draws.mean() == pytest.approx(mean, abs=0.01) and draws.var() == pytest.approx(variance, abs=0.02)
    single = fit_gaussian_mixture(np.full((5, 2), 0.25), 10)  # identical points: one component
    assert single.weights.shape == (1,)
    with pytest.raises(DifforgeError, match="at least 2 finite points"):
        fit_gaussian_mixture(np.array([[np.nan, 0.0], [0.0, 0.0]]))


# ---- restoration metrics ---------------------------------------------------------------------------


def test_psnr_and_ssim_match_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    from difforge.evaluation.restoration import psnr, ssim

    clean = images(channels=3, size=24, batch=3)
    noisy = clean + 0.1 * torch.randn(
        clean.shape, generator=torch.Generator().manual_seed(0), dtype=clean.dtype
    )
    blurred = degrade(config("blur", discrete=False).build(), clean, 6, clean)
    for restored in (noisy, blurred):
        ours_psnr, ours_ssim = psnr(restored, clean), ssim(restored, clean)
        for i in range(3):
            a, b = restored[i].numpy(), clean[i].numpy()
            theirs = metrics.structural_similarity(
                a,
                b,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=2.0,
                channel_axis=0,
            )
            assert float(ours_ssim[i]) == pytest.approx(theirs, abs=1e-10)
            assert float(ours_psnr[i]) == pytest.approx(
                metrics.peak_signal_noise_ratio(b, a, data_range=2.0), abs=1e-10
            )
    assert float(ssim(clean, clean)[0]) == pytest.approx(1.0) and torch.isinf(psnr(clean, clean)).all()


def test_every_degradation_on_arbitrary_shapes_and_levels() -> None:
    """Property: for any image size, channel count, T and mix of levels, D is finite, keeps
    the shape, is x0 at level 0 and stays in the convex hull of [-1, 1] images."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(
        name=st.sampled_from([n for n in DEGRADATIONS if n != "noise"]),
        size=st.integers(2, 20),
        channels=st.sampled_from([1, 3]),
        steps=st.integers(1, 30),
        seed=st.integers(0, 2**16),
    )
    def check(name: str, size: int, channels: int, steps: int, seed: int) -> None:
        if name == "decolorize" and channels == 1:
            return
        settings = {"blur_size": 5, "blur_padding": "reflect"} if seed % 2 else {}
        process = ColdConfig(degradation=name, num_timesteps=steps, **settings).build()  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(seed)
        x0 = torch.rand((3, channels, size, size), generator=generator) * 2 - 1
        levels = torch.randint(0, steps + 1, (3,), generator=generator)
        levels[0] = 0
        out = process.degrade(x0, levels)
        assert out.shape == x0.shape and bool(torch.isfinite(out).all())
        assert torch.equal(out[0], x0[0])
        assert float(out.abs().max()) <= 1 + 1e-5

    check()


def test_training_restores_x0_from_degraded_inputs_rounded_to_8_bits() -> None:
    seen = []

    def spy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    x0 = images(dtype=torch.float32)
    t = torch.tensor([0, 3, 7, T - 1])
    for quantize in (True, False):
        seen.clear()
        process = config("blur", quantize=quantize).build()
        terms = process.training_losses(spy, x0, t)
        x_in, t_in = seen[0]
        exact = process.degrade(x0, t + 1)
        assert torch.equal(t_in, t)  # the network sees t; D applied t + 1 levels
        levels = (x_in + 1) * 127.5
        if quantize:
            torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
            assert float((x_in - exact).abs().max()) <= 1 / 255 + 1e-6
        else:
            assert torch.equal(x_in, exact)
        torch.testing.assert_close(terms["loss"], x0.abs().mean(dim=(1, 2, 3)))
        assert set(terms) == {"loss", "l1"}


def test_algorithm_2_on_the_noise_degradation_is_ddim_with_eta_0() -> None:
    """An independent reference: the Gaussian process's DDIM (eta = 0) with an x0-predicting
    model on the same schedule walks the same path (level s <-> timestep s - 1)."""
    from difforge.diffusion import DiffusionConfig
    from difforge.sampling import ddim

    process = config("noise").build()
    gaussian = DiffusionConfig(schedule="cosine", num_timesteps=T, prediction="x0").build()

    def restorer(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.7 * x + 0.05 * t.to(x.dtype).reshape(-1, 1, 1, 1))

    x_t = torch.randn((3, 2, 6, 6), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = cold(restorer, process, x_t, cold_levels(T, T), clip_denoised=False)
    reference = ddim(restorer, gaussian, x_t, list(range(T)), eta=0.0, clip_denoised=False)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)
