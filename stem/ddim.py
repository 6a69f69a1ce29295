"""The reference's DDIM schedule, inversion and sampling, in ComfyUI's sigma space.

REFERENCE §2-3. A latent at training timestep ``t`` is ``x = x0 + sigma_t * eps`` (the
k-diffusion form ComfyUI samples in) with ``sigma_t = sqrt((1 - abar_t) / abar_t)``; its
variance-preserving form, which diffusers and the reference use, is
``x_vp = x / sqrt(1 + sigma_t^2) = sqrt(abar_t) * x``.

DDIM with eta = 0 is exactly an Euler step of the probability-flow ODE in sigma,
``x_next = x + (sigma_next - sigma) * eps`` (Song et al. 2021, eq. 14 rewritten in
``x / sqrt(abar)``); inversion runs the same step towards larger sigma.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_STEPS_OFFSET = 1  # SD 1.5's scheduler config; DDIMScheduler's own class default is 0


def scaled_linear_alphas_cumprod(
    beta_start: float = SD_BETA_START,
    beta_end: float = SD_BETA_END,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """``abar[t]`` for SD's "scaled_linear" betas, float64 ``[num_train_timesteps]``."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigma_from_abar(abar: torch.Tensor | float) -> torch.Tensor:
    """``sigma = sqrt((1 - abar) / abar)``."""
    abar = torch.as_tensor(abar, dtype=torch.float64)
    return ((1.0 - abar) / abar).sqrt()


def abar_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`sigma_from_abar`: ``abar = 1 / (1 + sigma^2)``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma**2)


def ddim_timesteps(
    steps: int,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    steps_offset: int = SD_STEPS_OFFSET,
) -> list[int]:
    """DDIMScheduler's "leading" timesteps in denoising order (REFERENCE §2).

    ``ratio = 1000 // steps``; for 50 steps: 981, 961, ..., 21, 1.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps // steps
    return [i * ratio + steps_offset for i in reversed(range(steps))]


@dataclass(frozen=True)
class DDIMSchedule:
    """The reference schedule in both forms.

    ``timesteps`` are in denoising order (981 ... 1 for 50 steps). ``sigmas[i]`` is the level
    of ``timesteps[i]``; ``final_sigma`` is the level past the last step, ``abar[0]``
    (``set_alpha_to_one = False``), which is also the level the clean VAE latent enters at.
    """

    timesteps: list[int]
    sigmas: torch.Tensor  # float64 [S]
    final_sigma: float

    @classmethod
    def create(cls, steps: int, alphas_cumprod: torch.Tensor | None = None, steps_offset: int = SD_STEPS_OFFSET):
        abar = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.double()
        ts = ddim_timesteps(steps, len(abar), steps_offset)
        sig = sigma_from_abar(abar[ts])
        return cls(ts, sig, float(sigma_from_abar(abar[0])))

    @property
    def sampling_levels(self) -> list[tuple[int, float, float]]:
        """``(timestep, sigma, sigma_next)`` per sampling step, noisiest first."""
        nxt = [*self.sigmas.tolist()[1:], self.final_sigma]
        return list(zip(self.timesteps, self.sigmas.tolist(), nxt))

    @property
    def inversion_levels(self) -> list[tuple[int, float, float]]:
        """``(timestep, sigma_prev, sigma)`` per inversion step, cleanest first: the model
        sees the latent at ``sigma_prev`` with the target timestep (REFERENCE §3)."""
        return [(t, s_next, s) for t, s, s_next in reversed(self.sampling_levels)]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """One DDIM (eta = 0) step in k-diffusion form: ``x + (sigma_to - sigma_from) * eps``.

    Sampling steps go to a smaller sigma, inversion steps to a larger one; written in the
    reference's VP form this is ``x0_hat = (x - sqrt(1-a) eps) / sqrt(a)`` followed by
    ``x' = sqrt(a') x0_hat + sqrt(1-a') eps``.
    """
    return x + (sigma_to - sigma_from) * eps


def eps_from_model_output(
    output: torch.Tensor, x_vp: torch.Tensor, abar: float | torch.Tensor, prediction: str = "eps"
) -> torch.Tensor:
    """The noise estimate from a model's raw output on the VP latent ``x_vp`` at level abar.

    ``eps``: the output is the noise. ``v``: ``v = sqrt(abar) eps - sqrt(1-abar) x0`` with
    ``x_vp = sqrt(abar) x0 + sqrt(1-abar) eps``, so ``eps = sqrt(abar) v + sqrt(1-abar) x_vp``.
    """
    if prediction == "eps":
        return output
    if prediction == "v":
        a = torch.as_tensor(abar, dtype=torch.float64)
        return float(a.sqrt()) * output + float((1 - a).sqrt()) * x_vp
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def to_vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """k-diffusion latent at ``sigma`` to its VP form ``x / sqrt(1 + sigma^2)``."""
    return x / (1.0 + sigma**2) ** 0.5


def from_vp(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
    """VP latent at ``sigma`` to k-diffusion form ``x_vp * sqrt(1 + sigma^2)``."""
    return x_vp * (1.0 + sigma**2) ** 0.5


# eps_fn(x_vp, timestep, step_index) -> eps; the model always sees a VP latent.
EpsFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def ddim_invert(
    x0: torch.Tensor,
    eps_fn: EpsFn,
    schedule: DDIMSchedule,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """DDIM inversion (REFERENCE §3) of the clean latent ``x0`` (VAE mean * 0.18215).

    Returns the k-diffusion latents after each step, cleanest first, so that ``[-1]`` is the
    noisiest latent at ``schedule.sigmas[0]`` and entry ``i`` sits at
    ``schedule.sigmas[-1 - i]``. No guidance: ``eps_fn`` is the conditional branch.
    """
    x = from_vp(x0, schedule.final_sigma)  # the clean latent counts as level abar[0]
    out = []
    for i, (t, sigma_prev, sigma) in enumerate(schedule.inversion_levels):
        eps = eps_fn(to_vp(x, sigma_prev), t, i)
        x = ddim_step(x, eps, sigma_prev, sigma)
        out.append(x)
        if callback is not None:
            callback(i, x)
    return out


def ddim_sample(
    x: torch.Tensor,
    eps_fn: EpsFn,
    schedule: DDIMSchedule,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Plain DDIM sampling from the k-diffusion latent ``x`` at ``schedule.sigmas[0]``.

    Returns the VP latent at the final level ``abar[0]``, which is what the reference hands
    to the VAE (``x * sqrt(abar[0])``).
    """
    for i, (t, sigma, sigma_next) in enumerate(schedule.sampling_levels):
        eps = eps_fn(to_vp(x, sigma), t, i)
        x = ddim_step(x, eps, sigma, sigma_next)
        if callback is not None:
            callback(i, x)
    return to_vp(x, schedule.final_sigma)
