"""Choosing the training timesteps t ~ p(t), with weights that keep the loss unbiased.

The training objective is E_{t ~ U}[L_t]. Drawing t from p(t) instead and weighting each
term by w_t = 1 / (T p(t)) keeps the estimate unbiased: E_{t ~ p}[w_t L_t] = E_{t ~ U}[L_t].
Importance sampling with p(t) proportional to sqrt(E[L_t^2]) (IDDPM section 3.3, eq. 18)
lowers the variance of the L_vlb estimate.

`LogNormalSigmaSampler` is the exception: it changes the objective on purpose. EDM (Karras et
al. 2022, section 5 and Table 1) trains on noise levels ln(sigma) ~ N(P_mean, P_std^2) and
weights nothing back, so the network's capacity goes to the middle noise levels that decide
what a sample looks like.
"""

from __future__ import annotations

import numpy as np
import torch

from difforge.errors import DifforgeError


class UniformTimestepSampler:
    """t ~ U{0, ..., T-1}; all weights 1."""

    learns = False
    """Whether `update` changes p(t) (the trainer only gathers losses for samplers that learn)."""

    def __init__(self, num_timesteps: int) -> None:
        if num_timesteps < 1:
            raise DifforgeError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        """(T,) float64 p(t)."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    reweights = True
    """Whether the weights undo p(t) (1 / (n p(t))); False: p(t) is the loss weighting."""

    def probabilities_in(self, low: int, high: int) -> torch.Tensor:
        """(high - low,) float64 p(t | low <= t < high): p restricted to the range, renormalised."""
        p = self.probabilities()[low:high]
        return p / p.sum()

    def sample(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        timestep_range: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (t, weights): (B,) int64 timesteps and (B,) float32 weights 1 / (n p(t)).

        ``timestep_range`` (low, high): draw only low <= t < high, from p restricted to the
        range (a timestep expert's training), with n = high - low, so the weighted loss is an
        unbiased estimate of the uniform average over the range. None: the whole chain,
        n = T."""
        low, high = timestep_range if timestep_range is not None else (0, self.num_timesteps)
        if not 0 <= low < high <= self.num_timesteps:
            raise DifforgeError(f"timestep range [{low}, {high}) is not inside 0..{self.num_timesteps}")
        p = (
            self.probabilities()
            if (low, high) == (0, self.num_timesteps)
            else self.probabilities_in(low, high)
        )
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = (1.0 / ((high - low) * p[t])).float() if self.reweights else torch.ones(batch_size)
        return (t + low).to(device), weights.to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses (B,) at timesteps t (B,); nothing to learn here."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        del state


class LossSecondMomentSampler(UniformTimestepSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over the last ``history`` losses of each t.

    Uniform until every t has ``history`` losses (the warm-up), then mixed with a small
    uniform part ``uniform_prob`` so that no t is starved (IDDPM section 3.3).
    """

    learns = True

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        if history < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise DifforgeError("history must be >= 1 and uniform_prob in [0, 1]")
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    @property
    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        return self.probabilities_in(0, self.num_timesteps)

    def probabilities_in(self, low: int, high: int) -> torch.Tensor:
        """The IDDPM rule on the timesteps of [low, high) alone: uniform there until each has
        ``history`` losses, then sqrt(E[L_t^2]) mixed with ``uniform_prob`` of uniform."""
        count = high - low
        if not bool((self.loss_counts[low:high] == self.history).all()):
            return torch.full((count,), 1.0 / count, dtype=torch.float64)
        weights = self.loss_history[low:high].pow(2).mean(dim=-1).sqrt()
        weights = weights / weights.sum() * (1.0 - self.uniform_prob)
        return weights + self.uniform_prob / count

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each example's loss to its timestep's history (a ring of length ``history``)."""
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            count = int(self.loss_counts[step])
            if count == self.history:
                self.loss_history[step, :-1] = self.loss_history[step, 1:].clone()
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, count] = loss
                self.loss_counts[step] = count + 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        history, counts = state["loss_history"], state["loss_counts"]
        if history.shape != self.loss_history.shape or counts.shape != self.loss_counts.shape:
            raise DifforgeError(
                f"importance-sampling history has shape {tuple(history.shape)}, "
                f"expected {tuple(self.loss_history.shape)} (was T or the history length changed?)"
            )
        self.loss_history = history.to(torch.float64).clone()
        self.loss_counts = counts.to(torch.long).clone()


EDM_P_MEAN = -1.2
EDM_P_STD = 1.2
"""EDM's training noise distribution ln(sigma) ~ N(-1.2, 1.2^2), for data in [-1, 1]."""


class LogNormalSigmaSampler(UniformTimestepSampler):
    """p(t) = P(ln sigma falls in t's cell) for ln sigma ~ N(p_mean, p_std^2), all weights 1.

    ``sigmas`` (T,) are the chain's noise levels sigma_t = sqrt((1 - abar_t) / abar_t),
    increasing; t's cell in ln sigma runs between the midpoints to its neighbours (the first
    and last cells are open), so p(t) = Phi(z_hi) - Phi(z_lo), z = (edge - p_mean) / p_std.
    The weights are 1, not 1 / (T p(t)): the distribution is the loss weighting (EDM)."""

    def __init__(self, sigmas: np.ndarray, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD) -> None:
        super().__init__(len(sigmas))
        log_sigma = np.log(np.asarray(sigmas, dtype=np.float64))
        if not np.all(np.diff(log_sigma) > 0) or not p_std > 0:
            raise DifforgeError("log-normal timesteps need increasing noise levels and p_std > 0")
        edges = np.concatenate([[-np.inf], (log_sigma[1:] + log_sigma[:-1]) / 2, [np.inf]])
        cdf = torch.special.ndtr(torch.from_numpy((edges - p_mean) / p_std))
        self._p = torch.diff(cdf)

    reweights = False

    def probabilities(self) -> torch.Tensor:
        return self._p


TIMESTEP_SAMPLERS = ("uniform", "importance", "loss-second-moment", "lognormal")
"""The names `make_timestep_sampler` takes (``loss-second-moment`` is ``importance``)."""


def make_timestep_sampler(
    name: str, num_timesteps: int, sigmas: np.ndarray | None = None
) -> UniformTimestepSampler:
    """``uniform``, ``importance`` (loss second moment) or ``lognormal`` (EDM's noise levels;
    needs the chain's ``sigmas``)."""
    if name == "uniform":
        return UniformTimestepSampler(num_timesteps)
    if name in ("importance", "loss-second-moment"):
        return LossSecondMomentSampler(num_timesteps)
    if name == "lognormal":
        if sigmas is None:
            raise DifforgeError("timestep sampler 'lognormal' needs the chain's noise levels (sigmas)")
        return LogNormalSigmaSampler(sigmas)
    raise DifforgeError(f"timestep sampler must be one of {', '.join(TIMESTEP_SAMPLERS)}, got {name!r}")
