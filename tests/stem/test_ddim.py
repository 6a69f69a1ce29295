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
    eps_from_model_output,
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
    for t, sigma, sigma_next in ours.sampling_levels[:: max(1, steps // 5)] + ours.sampling_levels[-1:]:
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


def test_inversion_matches_reference_vp_formulas_at_every_step():
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sched = DDIMSchedule.create(20)
    ours = ddim_invert(x0, nonlinear_eps, sched)
    ref = reference_invert(x0, nonlinear_eps, 20)
    levels = list(reversed(sched.sigmas.tolist()))
    assert len(ours) == len(ref) == 20
    for x, x_ref, sigma in zip(ours, ref, levels):
        torch.testing.assert_close(to_vp(x, sigma), x_ref, rtol=1e-10, atol=1e-10)


def test_inversion_feeds_the_model_the_previous_level_with_the_target_timestep():
    seen = []

    def spy(x_vp, t, i):
        seen.append((t, x_vp.clone()))
        return torch.zeros_like(x_vp)

    x0 = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    ddim_invert(x0, spy, DDIMSchedule.create(50))
    assert [t for t, _ in seen] == list(range(1, 1000, 20))
    # with eps = 0 the k-diffusion latent never moves, so every VP input is x0 / sqrt(abar0) * sqrt(abar_prev)
    abar = scaled_linear_alphas_cumprod()
    assert torch.allclose(seen[0][1], x0)  # the clean latent enters unchanged at level abar[0]
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
    traj = ddim_invert(x0, eps_fn, sched)
    back = ddim_sample(traj[-1], eps_fn, sched)
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
    back = ddim_sample(ddim_invert(x0, eps_fn, sched)[-1], eps_fn, sched)
    err = (back - x0).abs().max().item()
    assert err < 0.05


def test_eps_and_v_prediction_give_the_same_inversion():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    abar = scaled_linear_alphas_cumprod()
    sched = DDIMSchedule.create(10)

    def eps_model(x_vp, t, i):
        return torch.sin(x_vp) + t / 1000

    def v_model_as_eps(x_vp, t, i):
        # a v-prediction network trained on the same data: v = sqrt(a) eps - sqrt(1-a) x0_hat
        a = abar[t]
        eps = eps_model(x_vp, t, i)
        x0_hat = (x_vp - (1 - a).sqrt() * eps) / a.sqrt()
        v = a.sqrt() * eps - (1 - a).sqrt() * x0_hat
        return eps_from_model_output(v, x_vp, a, "v")

    a = ddim_invert(x0, eps_model, sched)
    b = ddim_invert(x0, v_model_as_eps, sched)
    torch.testing.assert_close(a[-1], b[-1], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        eps_from_model_output(x0, x0, 0.5, "x0")


def test_level_tables_are_consistent():
    sched = DDIMSchedule.create(5)
    samp = sched.sampling_levels
    inv = sched.inversion_levels
    assert [t for t, *_ in samp] == [801, 601, 401, 201, 1]
    assert samp[-1][2] == sched.final_sigma and inv[0][1] == sched.final_sigma
    assert all(s > s2 for _, s, s2 in samp)
    assert all(s_prev < s for _, s_prev, s in inv)


def test_bad_step_counts_are_refused():
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1001)
