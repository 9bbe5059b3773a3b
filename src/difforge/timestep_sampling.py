"""Choosing the training timesteps t ~ p(t), with weights that keep the loss unbiased.

The training objective is E_{t ~ U}[L_t]. Drawing t from p(t) instead and weighting each
term by w_t = 1 / (T p(t)) keeps the estimate unbiased: E_{t ~ p}[w_t L_t] = E_{t ~ U}[L_t].
Importance sampling with p(t) proportional to sqrt(E[L_t^2]) (IDDPM section 3.3, eq. 18)
lowers the variance of the L_vlb estimate.
"""

from __future__ import annotations

import torch

from difforge.errors import DifforgeError


class UniformTimestepSampler:
    """t ~ U{0, ..., T-1}; all weights 1."""

    def __init__(self, num_timesteps: int) -> None:
        if num_timesteps < 1:
            raise DifforgeError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        """(T,) float64 p(t)."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (t, weights): (B,) int64 timesteps and (B,) float32 weights 1 / (T p(t))."""
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = (1.0 / (self.num_timesteps * p[t])).float()
        return t.to(device), weights.to(device)

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
        if not self.warmed_up:
            return super().probabilities()
        weights = self.loss_history.pow(2).mean(dim=-1).sqrt()
        weights = weights / weights.sum() * (1.0 - self.uniform_prob)
        return weights + self.uniform_prob / self.num_timesteps

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


def make_timestep_sampler(name: str, num_timesteps: int) -> UniformTimestepSampler:
    """``uniform`` or ``importance`` (loss second moment)."""
    if name == "uniform":
        return UniformTimestepSampler(num_timesteps)
    if name in ("importance", "loss-second-moment"):
        return LossSecondMomentSampler(num_timesteps)
    raise DifforgeError(f"timestep sampler must be 'uniform' or 'importance', got {name!r}")
