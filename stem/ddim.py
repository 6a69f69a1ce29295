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

import math
from dataclasses import dataclass
from typing import Callable, Sequence

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
    def sampling_sigmas(self) -> list[float]:
        """The levels :func:`ddim_sample` walks: every step's sigma, then the final one."""
        return [*self.sigmas.tolist(), self.final_sigma]

    @property
    def inversion_sigmas(self) -> list[float]:
        """The levels :func:`ddim_invert` walks: the clean latent's, then every step's."""
        return list(reversed(self.sampling_sigmas))


def ddim_step(x: torch.Tensor, eps: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """One DDIM (eta = 0) step in k-diffusion form: ``x + (sigma_to - sigma_from) * eps``.

    Sampling steps go to a smaller sigma, inversion steps to a larger one; written in the
    reference's VP form this is ``x0_hat = (x - sqrt(1-a) eps) / sqrt(a)`` followed by
    ``x' = sqrt(a') x0_hat + sqrt(1-a') eps``.
    """
    return x + (sigma_to - sigma_from) * eps


def to_vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """k-diffusion latent at ``sigma`` to its VP form ``x / sqrt(1 + sigma^2)``."""
    return x / math.sqrt(1.0 + sigma**2)


def from_vp(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
    """VP latent at ``sigma`` to k-diffusion form ``x_vp * sqrt(1 + sigma^2)``."""
    return x_vp * math.sqrt(1.0 + sigma**2)


def rescale(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The k-diffusion latent at ``sigma_to`` whose VP form is that of ``x`` at ``sigma_from``:
    ``from_vp(to_vp(x, sigma_from), sigma_to)`` with one rounding instead of two."""
    return x * (math.sqrt(1.0 + sigma_to**2) / math.sqrt(1.0 + sigma_from**2))


# eps_fn(x, sigma) -> eps: the noise estimate for the k-diffusion latent ``x`` at level
# ``sigma`` (the network sees its VP form ``x / sqrt(1 + sigma^2)`` with sigma's timestep).
EpsFn = Callable[[torch.Tensor, float], torch.Tensor]
# callback(i, x, x0_hat): after step i, the new latent and the step's clean-latent estimate
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
# keep(i, x) -> x: stores step i's latent and returns it as stored
KeepFn = Callable[[int, torch.Tensor], torch.Tensor]


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The noise estimate from a k-diffusion denoiser's output, ``(x - D(x, sigma)) / sigma``.

    ComfyUI's model wrapper returns ``D`` whatever the network predicts (eps, v), so this one
    conversion serves every parameterisation it supports.
    """
    return (x - denoised) / sigma


def ddim_invert(
    x0: torch.Tensor, eps_fn: EpsFn, sigmas: Sequence[float], callback: StepCallback | None = None,
    keep: KeepFn | None = None,
) -> torch.Tensor:
    """DDIM inversion (REFERENCE §3) of the clean VP latent ``x0`` (VAE mean * 0.18215).

    ``sigmas`` rise: ``[sigma(abar[0]), sigma(t_1), ..., sigma(t_S)]``
    (:attr:`DDIMSchedule.inversion_sigmas`). Step i feeds the model the latent at level
    ``sigmas[i]`` together with the target level ``sigmas[i+1]`` (the reference's timestep t):
    in k-diffusion form that is ``x_in`` at ``sigmas[i+1]`` whose VP form is the current VP
    latent. No guidance: ``eps_fn`` is the conditional branch. Returns the k-diffusion latent
    at ``sigmas[-1]``; ``callback`` sees every step's latent (the trajectory).
    """
    x = from_vp(x0, sigmas[0])  # the clean latent counts as level abar[0]
    for i in range(len(sigmas) - 1):
        sigma_prev, sigma = float(sigmas[i]), float(sigmas[i + 1])
        x_in = rescale(x, sigma_prev, sigma)  # the latent at sigma_prev, seen at timestep t
        eps = eps_fn(x_in, sigma)
        x = ddim_step(x, eps, sigma_prev, sigma)
        if keep is not None:
            x = keep(i, x)
        if callback is not None:
            callback(i, x, x_in - sigma * eps)
    return x


def ddim_sample(
    x: torch.Tensor, eps_fn: EpsFn, sigmas: Sequence[float], callback: StepCallback | None = None,
    keep: KeepFn | None = None,
) -> torch.Tensor:
    """Plain DDIM (eta = 0) from the k-diffusion latent ``x`` at ``sigmas[0]`` down the falling
    ``sigmas``, whose last entry is the final level ``abar[0]``
    (:attr:`DDIMSchedule.sampling_sigmas`).

    Returns the VP latent at that final level, which is what the reference hands to the VAE
    (``x * sqrt(abar[0])``, REFERENCE §3). ``keep(i, x)`` returns the latent step i+1 starts from
    (FateZero's latent blend changes it).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        eps = eps_fn(x, sigma)
        x0_hat = x - sigma * eps
        x = ddim_step(x, eps, sigma, sigma_next)
        if keep is not None:
            x = keep(i, x)
        if callback is not None:
            callback(i, x, x0_hat)
    return to_vp(x, float(sigmas[-1]))
