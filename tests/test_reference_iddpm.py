"""difforge against improved-diffusion's maths, in float64, to 1e-7 relative.

The reference is openai's guided-diffusion (package ``guided_diffusion``), whose
gaussian_diffusion.py / respace.py / losses.py carry improved-diffusion's maths unchanged.
Its ``_extract_into_tensor`` casts every coefficient to float32; it is patched here to keep
float64 so that both sides compute in float64 end to end. Both sides get the same
deterministic fake model (a fixed linear function of x and t) and the same noise.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from difforge.diffusion import GaussianDiffusion
from difforge.sampling import ddim, ddpm
from difforge.schedule import NoiseSchedule, respaced_timesteps

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp deprecations in guided_diffusion.nn
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion import respace

TOL = 1e-7
MEAN_TYPES = {"eps": gd.ModelMeanType.EPSILON, "x0": gd.ModelMeanType.START_X}
VAR_TYPES = {
    "fixed_small": gd.ModelVarType.FIXED_SMALL,
    "fixed_large": gd.ModelVarType.FIXED_LARGE,
    "learned_range": gd.ModelVarType.LEARNED_RANGE,
}
# our loss -> theirs: "hybrid" is RESCALED_MSE with a learned range, "vlb" is RESCALED_KL
LOSS_TYPES = {"mse": gd.LossType.MSE, "hybrid": gd.LossType.RESCALED_MSE, "vlb": gd.LossType.RESCALED_KL}
SHAPE = (4, 3, 4, 4)


@pytest.fixture(autouse=True)
def float64_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the reference's coefficient tables in float64 (it casts them to float32)."""

    def extract(arr, timesteps, broadcast_shape):
        res = torch.from_numpy(np.asarray(arr)).to(device=timesteps.device)[timesteps]
        while res.ndim < len(broadcast_shape):
            res = res[..., None]
        return res.expand(broadcast_shape)

    monkeypatch.setattr(gd, "_extract_into_tensor", extract)


def seeded_randn_like(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Make the reference's ``th.randn_like`` draw from a seeded generator (same stream as ours)."""
    generator = torch.Generator().manual_seed(seed)

    def randn_like(x, **kwargs):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype)

    monkeypatch.setattr(gd.th, "randn_like", randn_like)


def pair(
    name: str = "linear",
    T: int = 1000,
    prediction: str = "eps",
    variance: str = "fixed_small",
    loss: str | None = None,
) -> tuple[GaussianDiffusion, gd.GaussianDiffusion]:
    """The same process on both sides."""
    loss = loss or ("hybrid" if variance == "learned_range" else "mse")
    schedule = NoiseSchedule.named(name, T)
    ours = GaussianDiffusion(schedule, prediction=prediction, variance=variance, loss=loss)
    theirs = gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule(name, T),
        model_mean_type=MEAN_TYPES[prediction],
        model_var_type=VAR_TYPES[variance],
        loss_type=LOSS_TYPES[loss],
        rescale_timesteps=False,
    )
    return ours, theirs


def spaced_reference(name: str, T: int, spec, variance: str = "fixed_small", prediction: str = "eps"):
    loss = "hybrid" if variance == "learned_range" else "mse"
    return respace.SpacedDiffusion(
        use_timesteps=respace.space_timesteps(T, spec),
        betas=gd.get_named_beta_schedule(name, T),
        model_mean_type=MEAN_TYPES[prediction],
        model_var_type=VAR_TYPES[variance],
        loss_type=LOSS_TYPES[loss],
        rescale_timesteps=False,
    )


def image_data(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    """8-bit data in [-1, 1] (so the decoder's edge bins are used too)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, shape, generator=generator).to(torch.float64)
    pixels.view(-1)[:2] = torch.tensor([0.0, 255.0], dtype=torch.float64)
    return pixels / 127.5 - 1.0


def batch_t(T: int) -> torch.Tensor:
    return torch.tensor([0, 1, T // 2, T - 1])


def randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 4000])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_named_schedule_and_tables_match_reference(name, T, assert_rel):
    ours, theirs = pair(name, T)
    schedule = ours.schedule
    np.testing.assert_allclose(schedule.betas, gd.get_named_beta_schedule(name, T), rtol=TOL, atol=0)
    for table in (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "alphas_cumprod_next",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    ):
        np.testing.assert_allclose(getattr(schedule, table), getattr(theirs, table), rtol=TOL, atol=0)


@pytest.mark.parametrize("T", [1000, 4000])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_process_and_posterior_match_reference(name, T, assert_rel):
    ours, theirs = pair(name, T)
    x0, noise, t = image_data(), randn(1), batch_t(T)
    x_t = ours.q_sample(x0, t, noise)
    assert_rel(x_t, theirs.q_sample(x0, t, noise=noise), TOL, "q_sample")
    for mine, ref in zip(ours.q_mean_variance(x0, t), theirs.q_mean_variance(x0, t), strict=True):
        assert_rel(mine.expand_as(ref), ref, TOL, "q_mean_variance")
    ref_posterior = theirs.q_posterior_mean_variance(x0, x_t, t)
    for mine, ref in zip(ours.q_posterior(x0, x_t, t), ref_posterior, strict=True):
        assert_rel(mine.expand_as(ref), ref, TOL, "q_posterior")


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x0"])
@pytest.mark.parametrize("T", [1000, 4000])
def test_p_mean_variance_matches_reference(T, prediction, variance, clip, fake_model, assert_rel):
    ours, theirs = pair("linear" if T == 1000 else "cosine", T, prediction, variance)
    model = fake_model(3, 6 if variance == "learned_range" else 3)
    t = batch_t(T)
    x_t = ours.q_sample(image_data(), t, randn(1))
    mine = ours.p_mean_variance(model(x_t, t), x_t, t, clip_denoised=clip)
    ref = theirs.p_mean_variance(model, x_t, t, clip_denoised=clip)
    for key, value in zip(("mean", "variance", "log_variance", "pred_xstart"), mine, strict=True):
        assert_rel(value.expand_as(ref[key]), ref[key], TOL, key)
    if clip:
        assert mine.pred_x0.abs().max() <= 1.0
        assert ours.pred_x0(model(x_t, t)[:, :3], x_t, t).abs().max() > 1.0  # the clip did something


def test_denoised_fn_applies_before_clipping_as_in_reference(fake_model, assert_rel):
    ours, theirs = pair("linear", 1000)
    model, t = fake_model(3), batch_t(1000)
    x_t = ours.q_sample(image_data(), t, randn(1))

    def shift(x):
        return 0.5 * x + 0.9

    mine = ours.p_mean_variance(model(x_t, t), x_t, t, clip_denoised=True, denoised_fn=shift)
    ref = theirs.p_mean_variance(model, x_t, t, clip_denoised=True, denoised_fn=shift)
    assert_rel(mine.pred_x0, ref["pred_xstart"], TOL, "pred_x0")
    assert_rel(mine.mean, ref["mean"], TOL, "mean")


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_vb_terms_and_prior_match_reference(prediction, variance, clip, fake_model, assert_rel):
    for name, T in (("linear", 1000), ("cosine", 4000)):
        ours, theirs = pair(name, T, prediction, variance)
        model = fake_model(3, 6 if variance == "learned_range" else 3, seed=T)
        x0, t = image_data(), batch_t(T)
        x_t = ours.q_sample(x0, t, randn(2))
        mine, pred_x0 = ours.vb_terms_bpd(model(x_t, t), x0, x_t, t, clip_denoised=clip)
        ref = theirs._vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip)
        assert_rel(mine, ref["output"], TOL, "vb")
        assert_rel(pred_x0, ref["pred_xstart"], TOL, "pred_x0")
        assert_rel(ours.prior_bpd(x0), theirs._prior_bpd(x0), TOL, "prior_bpd")


TRAINING_CASES = [
    ("eps", "fixed_small", "mse"),
    ("x0", "fixed_large", "mse"),
    ("eps", "learned_range", "hybrid"),
    ("x0", "learned_range", "hybrid"),
    ("eps", "learned_range", "vlb"),
    ("eps", "fixed_small", "vlb"),
]


@pytest.mark.parametrize("T", [1000, 4000])
@pytest.mark.parametrize(("prediction", "variance", "loss"), TRAINING_CASES)
def test_training_losses_and_gradients_match_reference(T, prediction, variance, loss, fake_model, assert_rel):
    ours, theirs = pair("linear" if T == 1000 else "cosine", T, prediction, variance, loss)
    base = fake_model(3, 6 if variance == "learned_range" else 3, seed=7)
    x0, t, noise = image_data(3), batch_t(T), randn(4)

    def run(compute):
        # a per-channel gain as the "parameters": the gradient shows where the loss flows
        gain = torch.ones(base.weight.shape[0], dtype=torch.float64, requires_grad=True)
        seen = []

        def model(x, timesteps, **kwargs):
            seen.append(timesteps.clone())
            return base(x, timesteps) * gain.reshape(1, -1, 1, 1)

        terms = compute(model)
        terms["loss"].sum().backward()
        return terms, gain.grad, seen

    mine, my_grad, my_t = run(lambda m: ours.training_losses(m, x0, t, noise=noise))
    ref, ref_grad, ref_t = run(lambda m: theirs.training_losses(m, x0, t, noise=noise))
    assert_rel(mine["loss"], ref["loss"], TOL, "loss")
    assert_rel(my_grad, ref_grad, TOL, "d loss / d gain")
    assert all(torch.equal(a, t) for a in my_t + ref_t)
    if "mse" in ref:
        assert_rel(mine["mse"], ref["mse"], TOL, "mse")
    if "vb" in ref:  # theirs is already rescaled by T / 1000 (RESCALED_MSE)
        assert_rel(mine["vb"] * T / 1000.0, ref["vb"], TOL, "vb")
    if loss == "hybrid":
        assert_rel(mine["loss"], mine["mse"] + 0.001 * T * mine["vb"], 1e-12, "hybrid = mse + 0.001 T vb")


SPECS = ["ddim50", "ddim25", "10", "10,15,20", [5, 7], 250, "1,0,3", "ddim1000"]


@pytest.mark.parametrize("T", [1000, 4000, 37])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_respacing_matches_space_timesteps(T, spec, assert_rel):
    reference_spec = [spec] if isinstance(spec, int) else spec
    try:
        expected = sorted(respace.space_timesteps(T, reference_spec))
    except ValueError:
        with pytest.raises(ValueError, match="respacing spec"):
            respaced_timesteps(T, spec)
        return
    assert respaced_timesteps(T, spec) == expected
    schedule = NoiseSchedule.named("linear", T)
    assert schedule.timesteps(spec).tolist() == expected
    respaced, timestep_map = schedule.respace(spec)
    spaced = spaced_reference("linear", T, reference_spec)
    assert timestep_map.tolist() == spaced.timestep_map == expected
    for table in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        np.testing.assert_allclose(getattr(respaced, table), getattr(spaced, table), rtol=TOL, atol=0)
    np.testing.assert_allclose(respaced.alphas_cumprod, schedule.alphas_cumprod[expected], rtol=1e-12)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_ddim_50_steps_matches_reference_and_model_sees_original_timesteps(
    prediction, clip, fake_model, assert_rel
):
    ours, _ = pair("linear", 1000, prediction)
    spaced = spaced_reference("linear", 1000, "ddim50", prediction=prediction)
    noise = randn(5)
    mine_model, ref_model = fake_model(3, seed=1), fake_model(3, seed=1)
    timesteps = ours.schedule.timesteps("ddim50")
    mine = ddim(mine_model, ours, noise, timesteps, eta=0.0, clip_denoised=clip)
    ref = spaced.ddim_sample_loop(ref_model, SHAPE, noise=noise, clip_denoised=clip, device="cpu", eta=0.0)
    assert_rel(mine, ref, TOL, "ddim50")
    expected_t = list(range(980, -1, -20))
    assert [int(c[0]) for c in mine_model.calls] == expected_t
    assert [int(c[0]) for c in ref_model.calls] == expected_t


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_matches_reference_with_same_noise(eta, monkeypatch, fake_model, assert_rel):
    ours, _ = pair("cosine", 1000, "eps")
    spaced = spaced_reference("cosine", 1000, "ddim25")
    noise = randn(6)
    mine = ddim(
        fake_model(3),
        ours,
        noise,
        ours.schedule.timesteps("ddim25"),
        eta=eta,
        generator=torch.Generator().manual_seed(11),
    )
    seeded_randn_like(monkeypatch, 11)
    ref = spaced.ddim_sample_loop(fake_model(3), SHAPE, noise=noise, device="cpu", eta=eta)
    assert_rel(mine, ref, TOL, f"ddim eta={eta}")


@pytest.mark.parametrize(
    ("variance", "T", "spec"),
    [("learned_range", 1000, "10"), ("fixed_large", 1000, "ddim10"), ("fixed_small", 30, "30")],
)
def test_ddpm_steps_match_reference_p_sample(variance, T, spec, monkeypatch, fake_model, assert_rel):
    ours, _ = pair("linear", T, "eps", variance)
    spaced = spaced_reference("linear", T, spec, variance)
    channels_out = 6 if variance == "learned_range" else 3
    mine_model, ref_model = fake_model(3, channels_out, seed=2), fake_model(3, channels_out, seed=2)
    noise = randn(8)
    timesteps = ours.schedule.timesteps(spec)
    mine = ddpm(mine_model, ours, noise, timesteps, generator=torch.Generator().manual_seed(5))
    seeded_randn_like(monkeypatch, 5)
    x = noise
    for index in reversed(range(spaced.num_timesteps)):
        x = spaced.p_sample(ref_model, x, torch.full((SHAPE[0],), index), clip_denoised=True)["sample"]
    assert_rel(mine, x, TOL, "ddpm")
    expected_t = timesteps[::-1].tolist()
    assert [int(c[0]) for c in mine_model.calls] == [int(c[0]) for c in ref_model.calls] == expected_t


@pytest.mark.parametrize(
    ("variance", "prediction", "spec"),
    [("fixed_small", "eps", None), ("learned_range", "eps", None), ("fixed_large", "x0", "5,3")],
)
def test_calc_bpd_loop_matches_reference(variance, prediction, spec, monkeypatch, fake_model, assert_rel):
    T = 20
    ours, theirs = pair("cosine", T, prediction, variance)
    if spec is not None:
        ours = ours.respaced(spec)
        theirs = spaced_reference("cosine", T, spec, variance, prediction)
    channels_out = 6 if variance == "learned_range" else 3
    mine_model, ref_model = fake_model(3, channels_out, seed=3), fake_model(3, channels_out, seed=3)
    x0 = image_data(4)
    mine = ours.calc_bpd_loop(mine_model, x0, generator=torch.Generator().manual_seed(9))
    seeded_randn_like(monkeypatch, 9)
    ref = theirs.calc_bpd_loop(ref_model, x0)
    assert_rel(mine["total_bpd"], ref["total_bpd"], TOL, "total_bpd")
    assert_rel(mine["prior_bpd"], ref["prior_bpd"], TOL, "prior_bpd")
    for key in ("vb", "xstart_mse", "mse"):  # theirs: column 0 is t = T-1; ours: column t is t
        assert_rel(mine[key], ref[key].flip(dims=[1]), TOL, key)
    assert [int(c[0]) for c in mine_model.calls] == [int(c[0]) for c in ref_model.calls]
    assert [int(c[0]) for c in mine_model.calls] == ours.schedule.timestep_map[::-1].tolist()
