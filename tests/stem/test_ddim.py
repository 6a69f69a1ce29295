"""The reference DDIM schedule and steps (REFERENCE §2-3) against diffusers and the VP formulas."""
import pytest
import torch
from diffusers import DDIMScheduler

from stem.ddim import (
    DDIMSchedule,
    abar_from_sigma,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    eps_from_denoised,
    from_vp,
    scaled_linear_alphas_cumprod,
    sigma_from_abar,
    to_vp,
)


def sd15_scheduler():
    """DDIMScheduler as SD 1.5's scheduler_config.json sets it up (not the class defaults)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )


@pytest.mark.parametrize("steps", [1, 10, 25, 50, 100, 500])
def test_timesteps_match_diffusers_ddim_with_sd_config(steps):
    sched = sd15_scheduler()
    sched.set_timesteps(steps)
    assert ddim_timesteps(steps) == sched.timesteps.tolist()


def test_fifty_step_schedule_is_981_to_1():
    ts = ddim_timesteps(50)
    assert ts[0] == 981 and ts[-1] == 1 and ts[1] == 961 and len(ts) == 50


def test_alphas_cumprod_match_diffusers():
    torch.testing.assert_close(scaled_linear_alphas_cumprod().float(), sd15_scheduler().alphas_cumprod)


def test_sigma_abar_round_trip_and_final_level():
    abar = scaled_linear_alphas_cumprod()
    torch.testing.assert_close(abar_from_sigma(sigma_from_abar(abar)), abar)
    sched = DDIMSchedule.create(50)
    assert sched.final_sigma == pytest.approx(0.0292, abs=1e-4)  # abar[0], not 1
    torch.testing.assert_close(sched.sigmas, sigma_from_abar(abar[ddim_timesteps(50)]))


@pytest.mark.parametrize("steps", [10, 50])
def test_sampling_step_equals_diffusers_step_in_vp_form(steps):
    sched = sd15_scheduler()
    sched.set_timesteps(steps)
    ours = DDIMSchedule.create(steps)
    g = torch.Generator().manual_seed(0)
    levels = list(zip(ours.timesteps, ours.sampling_sigmas, ours.sampling_sigmas[1:]))
    for t, sigma, sigma_next in levels[:: max(1, steps // 5)] + levels[-1:]:
        x_vp = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
        expected = sched.step(eps, t, x_vp, eta=0.0).prev_sample
        got = to_vp(ddim_step(from_vp(x_vp, sigma), eps, sigma, sigma_next), sigma_next)
        # diffusers keeps its alphas in fp32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def reference_invert(x0, eps_fn, steps):
    """REFERENCE §3 written in VP form, as the reference code does it."""
    abar = scaled_linear_alphas_cumprod()
    ts = list(reversed(ddim_timesteps(steps)))
    x, out = x0, []
    for i, t in enumerate(ts):
        a_prev = abar[ts[i - 1]] if i > 0 else abar[0]
        eps = eps_fn(x, t, i)
        x0_hat = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        x = abar[t].sqrt() * x0_hat + (1 - abar[t]).sqrt() * eps
        out.append(x)
    return out


def nonlinear_eps(x_vp, t, i):
    """Any smooth function of the latent and timestep will do for checking the algebra."""
    return torch.tanh(x_vp * (1 + t / 1000)) + 0.1 * t / 1000


def in_sigma_form(vp_fn, sched):
    """An eps function of (k-diffusion latent, sigma), as the loops take it, from one of
    (VP latent, timestep, call index), as the reference calls its UNet."""
    by_sigma = dict(zip(sched.sigmas.tolist(), sched.timesteps))
    calls = []

    def eps_fn(x, sigma):
        calls.append(sigma)
        return vp_fn(to_vp(x, sigma), by_sigma[sigma], len(calls) - 1)

    return eps_fn


def invert(x0, vp_fn, sched):
    """ddim_invert, and every step's latent (cleanest first) through its callback."""
    traj = []
    last = ddim_invert(x0, in_sigma_form(vp_fn, sched), sched.inversion_sigmas, lambda i, x, x0_hat: traj.append(x))
    assert traj[-1] is last
    return traj


def sample(x, vp_fn, sched):
    return ddim_sample(x, in_sigma_form(vp_fn, sched), sched.sampling_sigmas)


def test_inversion_matches_reference_vp_formulas_at_every_step():
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sched = DDIMSchedule.create(20)
    ours = invert(x0, nonlinear_eps, sched)
    ref = reference_invert(x0, nonlinear_eps, 20)
    levels = list(reversed(sched.sigmas.tolist()))
    assert len(ours) == len(ref) == 20
    for x, x_ref, sigma in zip(ours, ref, levels):
        torch.testing.assert_close(to_vp(x, sigma), x_ref, rtol=1e-10, atol=1e-10)


def reference_sample(x_vp, eps_fn, steps):
    """diffusers' DDIM step (eta 0, SD 1.5's config) written out in VP form."""
    abar = scaled_linear_alphas_cumprod()
    ts = ddim_timesteps(steps)
    for i, t in enumerate(ts):
        a_next = abar[ts[i + 1]] if i + 1 < len(ts) else abar[0]
        eps = eps_fn(x_vp, t, i)
        x0_hat = (x_vp - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        x_vp = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
    return x_vp


def test_sampling_matches_reference_vp_formulas():
    sched = DDIMSchedule.create(20)
    x_vp = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ours = sample(from_vp(x_vp, sched.sampling_sigmas[0]), nonlinear_eps, sched)
    torch.testing.assert_close(ours, reference_sample(x_vp, nonlinear_eps, 20), rtol=1e-10, atol=1e-10)


def test_loop_callbacks_report_the_clean_latent_estimate():
    sched = DDIMSchedule.create(5)
    x0 = torch.randn(1, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    seen = []
    ddim_invert(x0, lambda x, s: torch.full_like(x, 0.5), sched.inversion_sigmas,
                lambda i, x, x0_hat: seen.append((i, x0_hat)))
    ddim_sample(x0, lambda x, s: torch.full_like(x, 0.5), sched.sampling_sigmas,
                lambda i, x, x0_hat: seen.append((i, x0_hat - (x0 - 0.5 * sched.sampling_sigmas[i]))))
    assert [i for i, _ in seen] == list(range(5)) * 2
    first = from_vp(x0, sched.final_sigma)  # inversion step 0 sees the clean latent at sigma(t_1)
    s1 = sched.inversion_sigmas[1]
    torch.testing.assert_close(seen[0][1], from_vp(to_vp(first, sched.final_sigma), s1) - 0.5 * s1)
    assert seen[5][1].abs().max() < 1e-12  # sampling step 0: x0_hat = x - sigma * eps
    torch.testing.assert_close(eps_from_denoised(torch.ones(2), torch.zeros(2), 4.0), torch.full((2,), 0.25))


def test_inversion_feeds_the_model_the_previous_level_with_the_target_timestep():
    seen = []

    def spy(x_vp, t, i):
        seen.append((t, x_vp.clone()))
        return torch.zeros_like(x_vp)

    x0 = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    invert(x0, spy, DDIMSchedule.create(50))
    assert [t for t, _ in seen] == list(range(1, 1000, 20))
    # with eps = 0 the k-diffusion latent never moves, so every VP input is x0 / sqrt(abar0) * sqrt(abar_prev)
    abar = scaled_linear_alphas_cumprod()
    torch.testing.assert_close(seen[0][1], x0, rtol=1e-12, atol=1e-12)  # the clean latent enters unchanged at level abar[0]
    expected_second = x0 / abar[0].sqrt() * abar[1].sqrt()
    torch.testing.assert_close(seen[1][1], expected_second)


@pytest.mark.parametrize("steps", [10, 50])
def test_invert_then_sample_returns_the_input(steps):
    """An analytic eps model whose prediction depends only on the timestep makes DDIM
    exactly invertible, so the round trip must return x0 up to rounding."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)

    def eps_fn(x_vp, t, i):
        return noise * (1.0 + t / 1000.0)

    sched = DDIMSchedule.create(steps)
    traj = invert(x0, eps_fn, sched)
    back = sample(traj[-1], eps_fn, sched)
    assert (back - x0).abs().max() < 1e-4
    assert (traj[-1] - from_vp(x0, sched.final_sigma)).abs().max() > 1.0  # it did move


def test_invert_then_sample_with_a_data_dependent_model_is_close():
    """For a single-point data distribution the exact eps is (x_vp - sqrt(a) x*) / sqrt(1-a).
    DDIM inversion's one-step lag makes the round trip inexact, but with 50 steps it is small."""
    g = torch.Generator().manual_seed(3)
    target = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    abar = scaled_linear_alphas_cumprod()

    def eps_fn(x_vp, t, i):
        return (x_vp - abar[t].sqrt() * target) / (1 - abar[t]).sqrt()

    sched = DDIMSchedule.create(50)
    x0 = target * abar[0].sqrt() + 0.01 * torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    back = sample(invert(x0, eps_fn, sched)[-1], eps_fn, sched)
    err = (back - x0).abs().max().item()
    assert err < 0.05


def test_a_one_percent_eps_error_moves_the_inversion_far_beyond_rounding():
    """The size of the signal the ComfyUI tier's engine check must resolve."""
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    sched = DDIMSchedule.create(4)
    good = invert(x0, nonlinear_eps, sched)[-1]
    bad = invert(x0, lambda x, t, i: 1.01 * nonlinear_eps(x, t, i), sched)[-1]
    assert (good - bad).abs().max() > 1e-3 * good.abs().max()


def test_level_tables_are_consistent():
    sched = DDIMSchedule.create(5)
    samp, inv = sched.sampling_sigmas, sched.inversion_sigmas
    assert sched.timesteps == [801, 601, 401, 201, 1]
    assert samp[-1] == sched.final_sigma and inv[0] == sched.final_sigma and inv == samp[::-1]
    assert all(s > s2 for s, s2 in zip(samp, samp[1:]))


def test_bad_step_counts_are_refused():
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1001)


def test_inversion_continues_from_each_latent_as_kept():
    """``keep`` stores every step's latent and the next step starts from what it returns, so a
    stored trajectory (here rounded to half precision) is exactly the one the inversion used."""
    from stem.ddim import DDIMSchedule, ddim_invert, ddim_step, rescale

    sigmas = DDIMSchedule.create(4).inversion_sigmas
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))

    def eps_fn(x, sigma):
        return torch.sin(x) * 0.3 + sigma * 0.01

    stored = []

    def keep(i, x):
        stored.append(x.half())
        return stored[-1].float()

    out = ddim_invert(x0, eps_fn, sigmas, keep=keep)
    x = x0 * (1 + sigmas[0] ** 2) ** 0.5
    for i in range(4):
        x = ddim_step(x, eps_fn(rescale(x, sigmas[i], sigmas[i + 1]), sigmas[i + 1]), sigmas[i], sigmas[i + 1])
        assert torch.equal(stored[i], x.half())
        x = x.half().float()
    assert len(stored) == 4 and torch.equal(out, x)
