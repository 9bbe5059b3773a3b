"""Shared helpers for the tests: a deterministic fake denoiser and a relative-error check."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


class LinearFakeModel:
    """A deterministic stand-in for a network: out = W x + (a t / 1000 + b), channel-wise.

    A fixed linear function of both the input and the timestep, so two implementations fed
    the same (x, t) get identical outputs. ``out_channels = 2 * channels`` makes a
    learned-range model (prediction channels, then variance channels). Every call's
    timesteps are recorded in ``calls`` (to check which indices the model sees).
    """

    def __init__(self, channels: int, out_channels: int | None = None, seed: int = 0, scale: float = 0.3):
        out_channels = out_channels or channels
        generator = torch.Generator().manual_seed(seed)
        self.weight = scale * torch.randn(out_channels, channels, generator=generator, dtype=torch.float64)
        self.time_coef = torch.randn(out_channels, generator=generator, dtype=torch.float64)
        self.bias = 0.1 * torch.randn(out_channels, generator=generator, dtype=torch.float64)
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.calls.append(t.detach().clone())
        weight = self.weight.to(x.dtype)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        time = (t.to(x.dtype) / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
        return (
            torch.einsum("oc,bc...->bo...", weight, x)
            + self.time_coef.to(x.dtype).reshape(shape) * time
            + self.bias.to(x.dtype).reshape(shape)
        )


@pytest.fixture
def fake_model() -> Callable[..., LinearFakeModel]:
    """Factory: ``fake_model(channels, out_channels=None, seed=0)`` -> `LinearFakeModel`."""
    return LinearFakeModel


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (max-norm relative error; 0 for two zeros)."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


@pytest.fixture
def assert_rel() -> Callable[..., None]:
    """``assert_rel(actual, expected, tol, what="")``: max-norm relative error <= tol."""

    def check(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
        error = relative_error(actual, expected)
        assert error <= tol, f"{what}: relative error {error:.3e} > {tol:.1e}"

    return check


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN202 - a generator fixture
    """Keep every test's cached statistics out of the user's ~/.cache/difforge."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFORGE_CACHE", str(tmp_path_factory.mktemp("difforge-cache")))
        yield
