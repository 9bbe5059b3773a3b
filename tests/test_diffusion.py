"""GaussianDiffusion against closed forms; the timestep samplers; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difforge.diffusion import (
    LOSSES,
    PREDICTIONS,
    VARIANCES,
    DiffusionConfig,
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    dynamic_thresholding,
    normal_kl,
)
from difforge.errors import DifforgeError
from difforge.schedule import NoiseSchedule
from difforge.timestep_sampling import LossSecondMomentSampler, UniformTimestepSampler, make_timestep_sampler

F64 = torch.float64


def make(T=100, name="linear", **kwargs) -> GaussianDiffusion:
    if kwargs.get("variance") == "learned_range":
        kwargs.setdefault("loss", "hybrid")
    return GaussianDiffusion(NoiseSchedule.named(name, T), **kwargs)


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- forward process and posterior ---------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_is_the_gaussian_conditional_of_the_forward_chain(name):
    """q(x_{t-1} | x_t, x0) from conditioning the joint of (x_{t-1}, x_t) given x0, in numpy."""
    T = 50
    diffusion = make(T, name)
    s = diffusion.schedule
    x0, x_t = 0.7, -0.4
    for t in range(1, T):
        ab_prev, beta = s.alphas_cumprod[t - 1], s.betas[t]
        # x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) e1 ;  x_t = sqrt(1 - beta) x_{t-1} + sqrt(beta) e2
        mean = np.array([math.sqrt(ab_prev) * x0, math.sqrt(1 - beta) * math.sqrt(ab_prev) * x0])
        cov = np.array(
            [
                [1 - ab_prev, math.sqrt(1 - beta) * (1 - ab_prev)],
                [math.sqrt(1 - beta) * (1 - ab_prev), (1 - beta) * (1 - ab_prev) + beta],
            ]
        )
        cond_mean = mean[0] + cov[0, 1] / cov[1, 1] * (x_t - mean[1])
        cond_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
        got_mean, got_var, got_log_var = diffusion.q_posterior(
            torch.full((1, 1), x0, dtype=F64), torch.full((1, 1), x_t, dtype=F64), torch.tensor([t])
        )
        assert got_mean.item() == pytest.approx(cond_mean, rel=1e-12, abs=1e-14)
        assert got_var.item() == pytest.approx(cond_var, rel=1e-10)
        assert got_log_var.item() == pytest.approx(math.log(cond_var), rel=1e-10)
    # t = 0: x_{-1} is x0 itself, a point mass
    mean, var, _ = diffusion.q_posterior(
        torch.full((1, 1), x0, dtype=F64), torch.ones(1, 1, dtype=F64), torch.tensor([0])
    )
    assert mean.item() == pytest.approx(x0, abs=1e-15) and var.item() == 0.0


def test_q_sample_has_the_right_moments():
    diffusion = make(1000, "cosine")
    n = 20000
    x0 = torch.full((n, 1), 0.8, dtype=F64)
    for step in (0, 100, 500, 999):
        t = torch.full((n,), step)
        samples = diffusion.q_sample(x0, t, randn(n, 1, seed=step))
        mean, variance, log_variance = diffusion.q_mean_variance(x0[:1], t[:1])
        se = math.sqrt(variance.item() / n)
        assert abs(samples.mean().item() - mean.item()) < 5 * se
        assert samples.var().item() == pytest.approx(variance.item(), rel=5 * math.sqrt(2 / n))
        assert mean.item() == pytest.approx(math.sqrt(diffusion.schedule.alphas_cumprod[step]) * 0.8)
        assert log_variance.item() == pytest.approx(math.log(variance.item()))


@pytest.mark.parametrize("T", [10, 1000])
def test_eps_x0_v_conversions_invert_each_other(T):
    diffusion = make(T, "cosine")
    x0, eps = randn(5, 3, 4, 4, seed=1), randn(5, 3, 4, 4, seed=2)
    t = torch.tensor([0, 1, T // 3, T - 2, T - 1])
    x_t = diffusion.q_sample(x0, t, eps)
    ab = torch.from_numpy(diffusion.schedule.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
    v = diffusion.v_target(x0, t, eps)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diffusion.x0_from_eps(x_t, t, eps), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t, t, x0), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(diffusion.x0_from_v(x_t, t, v), x0, rtol=1e-12, atol=1e-12)
    for prediction, target in (("eps", eps), ("x0", x0), ("v", v)):
        process = make(T, "cosine", prediction=prediction)
        torch.testing.assert_close(process.training_target(x0, t, eps), target, rtol=0, atol=0)
        torch.testing.assert_close(process.pred_x0(target, x_t, t), x0, rtol=1e-9, atol=1e-9)
        # with the exact prediction the reverse mean is the true posterior mean
        out = process.p_mean_variance(target, x_t, t)
        torch.testing.assert_close(out.mean, process.q_posterior(x0, x_t, t)[0], rtol=1e-9, atol=1e-9)


def test_variances_fixed_small_fixed_large_and_learned_range():
    T = 100
    t = torch.tensor([0, 1, 50, 99])
    x_t = randn(4, 2, 3, 3)
    s = NoiseSchedule.named("linear", T)
    small = make(T).p_mean_variance(torch.zeros_like(x_t), x_t, t)
    np.testing.assert_allclose(small.variance.flatten(), s.posterior_variance[t])
    np.testing.assert_allclose(small.log_variance.flatten(), s.posterior_log_variance_clipped[t])
    large = make(T, variance="fixed_large").p_mean_variance(torch.zeros_like(x_t), x_t, t)
    # beta_t, except beta~_1 at t = 0 (IDDPM)
    np.testing.assert_allclose(large.variance.flatten(), [s.posterior_variance[1], *s.betas[[1, 50, 99]]])
    learned = make(T, variance="learned_range")
    for v, expected in (
        (-1.0, s.posterior_log_variance_clipped[t]),
        (1.0, np.log(s.betas[t])),
        (0.0, 0.5 * (np.log(s.betas[t]) + s.posterior_log_variance_clipped[t])),
    ):
        output = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
        out = learned.p_mean_variance(output, x_t, t)
        np.testing.assert_allclose(out.log_variance[:, 0, 0, 0], expected, rtol=1e-12)
        torch.testing.assert_close(out.variance, out.log_variance.exp())


def test_clipping_and_dynamic_thresholding():
    diffusion = make(100, prediction="x0")
    x_t = randn(2, 1, 4, 4)
    prediction = torch.tensor([[-3.0, -0.5, 0.5, 2.0] * 4, [0.1, -0.2, 0.3, 0.9] * 4], dtype=F64).reshape(
        2, 1, 4, 4
    )
    t = torch.tensor([10, 10])
    clipped = diffusion.p_mean_variance(prediction, x_t, t, clip_denoised=True).pred_x0
    torch.testing.assert_close(clipped, prediction.clamp(-1, 1))
    thresholded = diffusion.p_mean_variance(prediction, x_t, t, dynamic_threshold=0.9).pred_x0
    s = torch.quantile(prediction[0].abs().flatten(), 0.9).item()
    torch.testing.assert_close(thresholded[0], prediction[0].clamp(-s, s) / s)
    torch.testing.assert_close(thresholded[1], prediction[1])  # s = max(1, ...) = 1: unchanged
    assert torch.equal(dynamic_thresholding(prediction, 1.0)[0], prediction[0] / 3.0)
    with pytest.raises(DifforgeError, match=r"dynamic_threshold must be a percentile in \(0, 1\]"):
        dynamic_thresholding(prediction, 1.5)


# ---- likelihood ------------------------------------------------------------------------------


def test_normal_kl_matches_torch_distributions():
    m1, m2 = randn(10, seed=1), randn(10, seed=2)
    lv1, lv2 = randn(10, seed=3), randn(10, seed=4)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)


def test_discretized_gaussian_likelihood_sums_to_one_over_the_256_bins():
    bins = torch.arange(256, dtype=F64) / 127.5 - 1.0
    for mean, log_scale in ((0.1, -3.0), (-0.95, -5.0), (0.999, -1.0), (0.0, 1.0)):
        log_p = discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale)
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_true_noise_gives_near_zero_kl_terms_and_the_prior_closed_form():
    """A model that returns the exact noise of a single data point: every KL term (t > 0)
    vanishes with the posterior variance; the decoder NLL (t = 0) and prior are positive."""
    T = 200
    diffusion = make(T, "cosine")
    x0 = (torch.randint(0, 256, (1, 3, 4, 4), generator=torch.Generator().manual_seed(0)) / 127.5 - 1).to(F64)
    s = diffusion.schedule

    def true_noise(x_t, t):
        ab = torch.from_numpy(s.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    t = torch.arange(T)
    x0s = x0.expand(T, -1, -1, -1)
    x_t = diffusion.q_sample(x0s, t, randn(T, 3, 4, 4, seed=5))
    vb, pred_x0 = diffusion.vb_terms_bpd(true_noise(x_t, t), x0s, x_t, t)
    assert vb[1:].abs().max().item() < 1e-9
    assert vb[0].item() > 0
    torch.testing.assert_close(pred_x0, x0s, rtol=1e-8, atol=1e-8)
    # with beta_t instead (fixed_large) only the variance mismatch is left: 1/2 (r - 1 - log r)
    large = make(T, "cosine", variance="fixed_large")
    vb_large, _ = large.vb_terms_bpd(true_noise(x_t, t), x0s, x_t, t)
    ratio = s.posterior_variance[2:] / s.betas[2:]
    expected = 0.5 * (ratio - 1 - np.log(ratio)) / math.log(2)
    np.testing.assert_allclose(vb_large[2:].numpy(), expected, rtol=1e-7)
    # prior: KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) averaged over dims, in bits
    ab = s.alphas_cumprod[-1]
    prior = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * (x0**2)).mean().item() / math.log(2)
    assert diffusion.prior_bpd(x0).item() == pytest.approx(prior, rel=1e-10)


def test_calc_bpd_loop_columns_are_indexed_by_t_and_sum_to_the_total(fake_model):
    diffusion = make(12, "cosine")
    model = fake_model(3)
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(1)) / 127.5 - 1).to(F64)
    out = diffusion.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(2))
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (2, 12)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    # replay the noise: the loop goes t = T-1 .. 0 drawing one noise tensor per step
    generator = torch.Generator().manual_seed(2)
    for step in reversed(range(12)):
        noise = torch.randn(x0.shape, generator=generator, dtype=F64)
        t = torch.full((2,), step)
        x_t = diffusion.q_sample(x0, t, noise)
        vb, _ = diffusion.vb_terms_bpd(model(x_t, t), x0, x_t, t, clip_denoised=True)
        torch.testing.assert_close(out["vb"][:, step], vb)
    assert [int(c[0]) for c in model.calls[:12]] == list(range(11, -1, -1))
    respaced = diffusion.respaced("ddim4")
    model.calls.clear()
    respaced.calc_bpd_loop(model, x0)
    assert [int(c[0]) for c in model.calls] == [9, 6, 3, 0]  # original indices


# ---- training losses ------------------------------------------------------------------------


def test_simple_losses_and_min_snr_weights():
    T = 100
    x0, noise = randn(4, 2, 3, 3, seed=1), randn(4, 2, 3, 3, seed=2)
    t = torch.tensor([0, 5, 50, 99])
    s = NoiseSchedule.named("linear", T)
    snr = torch.from_numpy(s.snr)[t]
    for prediction in PREDICTIONS:
        for loss in ("mse", "l1", "huber"):
            diffusion = make(T, prediction=prediction, loss=loss, huber_delta=0.5)
            output = randn(4, 2, 3, 3, seed=3)
            terms = diffusion.training_losses(lambda x, tt, o=output: o, x0, t, noise)
            error = output - diffusion.training_target(x0, t, noise)
            simple = {
                "mse": (error**2).mean((1, 2, 3)),
                "l1": error.abs().mean((1, 2, 3)),
                "huber": torch.where(error.abs() < 0.5, 0.5 * error**2, 0.5 * (error.abs() - 0.25)).mean(
                    (1, 2, 3)
                ),
            }[loss]
            torch.testing.assert_close(terms["loss"], simple)
            torch.testing.assert_close(terms["mse"], (error**2).mean((1, 2, 3)))
            # min-SNR-gamma: the weight in x0 space is min(SNR, gamma) (Hang et al. 2023)
            weighted = make(T, prediction=prediction, loss=loss, huber_delta=0.5, min_snr_gamma=5.0)
            weight = {
                "eps": snr.clamp(max=5) / snr,
                "x0": snr.clamp(max=5),
                "v": snr.clamp(max=5) / (snr + 1),
            }
            got = weighted.training_losses(lambda x, tt, o=output: o, x0, t, noise)["loss"]
            torch.testing.assert_close(got, simple * weight[prediction])


def test_hybrid_loss_stops_the_gradient_of_the_vb_term_on_the_mean():
    T = 100
    diffusion = make(T, variance="learned_range", loss="hybrid")
    x0, noise, t = randn(3, 2, 3, 3, seed=1), randn(3, 2, 3, 3, seed=2), torch.tensor([0, 10, 99])
    output = randn(3, 4, 3, 3, seed=3).requires_grad_()
    terms = diffusion.training_losses(lambda x, tt: output, x0, t, noise)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * T * terms["vb"])
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:].abs().max() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert grad_mse[:, 2:].abs().max() == 0
    vlb = make(T, variance="learned_range", loss="vlb")
    terms = vlb.training_losses(lambda x, tt: output, x0, t, noise)
    torch.testing.assert_close(terms["loss"], T * terms["vb"])
    (grad,) = torch.autograd.grad(terms["loss"].sum(), output)
    assert grad[:, :2].abs().max() > 0  # the full bound trains the mean too


def test_training_losses_call_the_model_with_original_timesteps(fake_model):
    diffusion = make(1000).respaced("ddim10")
    model = fake_model(2)
    diffusion.training_losses(model, randn(2, 2, 3, 3), torch.tensor([0, 9]))
    assert model.calls[0].tolist() == [0, 900]


def test_config_round_trip_and_build():
    config = DiffusionConfig(schedule="cosine", num_timesteps=50, prediction="v", min_snr_gamma=5.0)
    assert DiffusionConfig.from_dict(config.to_dict()) == config
    diffusion = config.build()
    assert diffusion.num_timesteps == 50 and diffusion.prediction == "v"
    np.testing.assert_array_equal(diffusion.schedule.betas, NoiseSchedule.named("cosine", 50).betas)


# ---- timestep sampling -----------------------------------------------------------------------


def test_importance_sampler_is_uniform_until_warm_then_unbiased():
    T, history = 6, 3
    sampler = LossSecondMomentSampler(T, history=history)
    torch.testing.assert_close(sampler.probabilities(), torch.full((T,), 1 / T, dtype=F64))
    table = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1], dtype=F64)  # toy per-t losses
    for _ in range(history - 1):
        sampler.update(torch.arange(T), table)
    assert not sampler.warmed_up
    sampler.update(torch.arange(T - 1), table[:-1])
    assert not sampler.warmed_up
    sampler.update(torch.tensor([T - 1]), table[-1:])
    assert sampler.warmed_up
    p = sampler.probabilities()
    expected = table / table.sum() * (1 - 0.001) + 0.001 / T  # sqrt(E[L^2]) = L for a constant loss
    torch.testing.assert_close(p, expected)
    # exact unbiasedness: E_p[w L] = mean L with w = 1 / (T p)
    assert (p * (1 / (T * p)) * table).sum().item() == pytest.approx(table.mean().item(), rel=1e-12)
    t, weights = sampler.sample(200000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weights.double(), 1 / (T * p[t]), rtol=1e-6, atol=0)
    assert (weights.double() * table[t]).mean().item() == pytest.approx(table.mean().item(), rel=0.02)
    # the history is a ring of the last `history` losses
    sampler.update(torch.tensor([0]), torch.tensor([10.0]))
    assert sampler.loss_history[0].tolist() == [4.0, 4.0, 10.0]


def test_uniform_sampler_and_state_dict_round_trip():
    uniform = UniformTimestepSampler(10)
    t, weights = uniform.sample(64, generator=torch.Generator().manual_seed(1))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 10
    assert torch.all(weights == 1)
    sampler = LossSecondMomentSampler(4, history=2)
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.arange(8, dtype=F64) + 1)
    restored = LossSecondMomentSampler(4, history=2)
    restored.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(restored.probabilities(), sampler.probabilities())
    assert restored.warmed_up
    with pytest.raises(DifforgeError, match=r"history has shape \(4, 2\), expected \(5, 2\)"):
        LossSecondMomentSampler(5, history=2).load_state_dict(sampler.state_dict())
    assert isinstance(make_timestep_sampler("importance", 5), LossSecondMomentSampler)
    with pytest.raises(DifforgeError, match="timestep sampler must be one of uniform, .*, got 'lol'"):
        make_timestep_sampler("lol", 5)
    with pytest.raises(DifforgeError, match="lognormal"):
        make_timestep_sampler("lognormal", 5)  # without the chain's noise levels


def test_lognormal_timesteps_follow_edm_noise_distribution():
    """p(t) against SciPy's normal CDF over each timestep's cell in ln sigma; no reweighting."""
    from scipy.stats import norm

    diffusion = GaussianDiffusion(NoiseSchedule.named("linear", 1000))
    sampler = diffusion.timestep_sampler("lognormal")
    abar = diffusion.schedule.alphas_cumprod
    log_sigma = 0.5 * np.log((1 - abar) / abar)
    edges = np.concatenate([[-np.inf], (log_sigma[1:] + log_sigma[:-1]) / 2, [np.inf]])
    expected = np.diff(norm.cdf(edges, loc=-1.2, scale=1.2))
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-9, atol=1e-15)
    assert sampler.probabilities().sum().item() == pytest.approx(1.0, abs=1e-12)
    t, weights = sampler.sample(20000, generator=torch.Generator().manual_seed(0))
    assert torch.all(weights == 1)
    drawn_log_sigma = torch.from_numpy(log_sigma)[t]
    assert drawn_log_sigma.mean().item() == pytest.approx(-1.2, abs=0.05)  # discretised N(-1.2, 1.2^2)
    assert drawn_log_sigma.std().item() == pytest.approx(1.2, abs=0.05)
    assert not sampler.learns and LossSecondMomentSampler(3).learns


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value", "allowed"),
    [("prediction", "epsilon", PREDICTIONS), ("variance", "learned", VARIANCES), ("loss", "kl", LOSSES)],
)
def test_unknown_names_list_the_allowed_values(argument, value, allowed):
    with pytest.raises(ValueError, match=f"{argument} must be one of .*; got '{value}'") as info:
        make(50, **{argument: value})
    assert all(name in str(info.value) for name in allowed)


def test_bad_settings_and_shapes():
    with pytest.raises(
        DifforgeError, match="variance 'learned_range' .* use loss 'hybrid' or 'vlb', not 'mse'"
    ):
        GaussianDiffusion(NoiseSchedule.named("linear", 50), variance="learned_range", loss="mse")
    with pytest.raises(DifforgeError, match="schedule must be a NoiseSchedule"):
        GaussianDiffusion(np.linspace(1e-4, 0.02, 10))
    with pytest.raises(DifforgeError, match="vlb_weight must be a finite number >= 0"):
        make(50, vlb_weight=-1.0)
    with pytest.raises(DifforgeError, match="min_snr_gamma must be > 0"):
        make(50, min_snr_gamma=0.0)
    with pytest.raises(DifforgeError, match="unknown diffusion setting.*foo; known: "):
        DiffusionConfig.from_dict({"foo": 1})
    with pytest.raises(DifforgeError, match="schedule must be one of linear, cosine, quadratic, sigmoid"):
        DiffusionConfig(schedule="cos").build()
    diffusion = make(50)
    x0 = randn(2, 3, 4, 4)
    with pytest.raises(DifforgeError, match=r"noise shape \(2, 3, 4, 5\) != x0 shape \(2, 3, 4, 4\)"):
        diffusion.q_sample(x0, torch.tensor([1, 2]), randn(2, 3, 4, 5))
    with pytest.raises(DifforgeError, match=r"t must have shape \(2,\), got \(3,\)"):
        diffusion.q_sample(x0, torch.tensor([1, 2, 3]), x0)
    with pytest.raises(
        DifforgeError, match=r"model output shape \(2, 6, 4, 4\) != x_t shape .*expects 3 channels"
    ):
        diffusion.p_mean_variance(randn(2, 6, 4, 4), x0, torch.tensor([1, 2]))
    learned = make(50, variance="learned_range")
    with pytest.raises(
        DifforgeError, match=r"learned_range model must output 6 channels .* got \(2, 3, 4, 4\)"
    ):
        learned.p_mean_variance(x0, x0, torch.tensor([1, 2]))
    with pytest.raises(DifforgeError, match=r"x0 shape .* != x_t shape"):
        diffusion.q_posterior(x0, randn(2, 3, 2, 2), torch.tensor([1, 2]))
