"""PSNR, SSIM and the warp error against independent formulas and known cases."""
import math

import numpy as np
import pytest
import torch

from stem.metrics import psnr, source_flows, ssim, warp_error


def textured_clip(frames=5, h=48, w=64, shift=2, seed=0):
    """A smooth random texture translated `shift` px to the right each frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // 4, (w + shift * frames) // 4 + 2, generator=g)
    big = torch.nn.functional.interpolate(base, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    out = [big[0, :, :h, (frames - t) * shift : (frames - t) * shift + w] for t in range(frames)]
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()


def test_identical_clips_give_infinite_psnr_and_ssim_one():
    clip = textured_clip()
    assert torch.isinf(psnr(clip, clip)).all()
    torch.testing.assert_close(ssim(clip, clip), torch.ones(len(clip), dtype=torch.float64))


def test_psnr_matches_its_formula():
    a = torch.rand(3, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    b = (a + 0.1).clamp(0, 1)
    mse = ((a.double() - b.double()) ** 2).view(3, -1).mean(1)
    torch.testing.assert_close(psnr(b, a), 10 * torch.log10(1 / mse))
    c = torch.full((1, 4, 4, 3), 0.5)
    assert psnr(c + 0.1, c).item() == pytest.approx(20.0, abs=1e-4)  # mse 0.01 -> 20 dB


def test_ssim_matches_a_direct_per_window_computation():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 16, 16, 3, generator=g, dtype=torch.float64)
    b = (a * 0.8 + 0.1 * torch.rand(1, 16, 16, 3, generator=g, dtype=torch.float64)).clamp(0, 1)
    x = np.arange(11) - 5
    w1 = np.exp(-(x**2) / (2 * 1.5**2))
    w1 /= w1.sum()
    win = np.outer(w1, w1)
    vals = []
    for ch in range(3):
        A, B = a[0, :, :, ch].numpy(), b[0, :, :, ch].numpy()
        for i in range(16 - 10):
            for j in range(16 - 10):
                pa, pb = A[i : i + 11, j : j + 11], B[i : i + 11, j : j + 11]
                ma, mb = (win * pa).sum(), (win * pb).sum()
                va = (win * pa * pa).sum() - ma**2
                vb = (win * pb * pb).sum() - mb**2
                cov = (win * pa * pb).sum() - ma * mb
                c1, c2 = 0.01**2, 0.03**2
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    assert ssim(b, a).item() == pytest.approx(float(np.mean(vals)), abs=1e-9)
    assert ssim(b, a).item() < 0.99


def test_flow_of_a_known_shift_is_recovered():
    clip = textured_clip(shift=2)
    flow = source_flows(clip)[0]
    inner = flow[8:-8, 8:-8]
    assert np.median(inner[..., 0]) == pytest.approx(-2.0, abs=0.3)  # frame t+1 at x came from x-2
    assert abs(np.median(inner[..., 1])) < 0.3


def test_a_clip_that_moves_like_the_source_has_near_zero_warp_error_and_flicker_is_measured():
    src = textured_clip(shift=2)
    same = warp_error(src, src)
    assert same.shape == (len(src) - 1,) and same.max() < 0.02
    flicker = src.clone()
    flicker[1::2] = (flicker[1::2] + 0.1).clamp(0, 1)  # odd frames brighter by 0.1
    err = warp_error(flicker, src)
    assert torch.all((err - 0.1).abs() < 0.03)  # every pair differs by the flicker
    still = src[:1].expand(len(src), -1, -1, -1).contiguous()  # a clip that does not move
    assert warp_error(still, src).mean() > same.mean() + 0.02


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="equal in shape"):
        psnr(torch.zeros(2, 8, 8, 3), torch.zeros(3, 8, 8, 3))
    assert math.isinf(psnr(torch.zeros(1, 8, 8, 3), torch.zeros(1, 8, 8, 3)).item())


def test_compare_and_plot_draw_one_curve_per_method():
    from stem.metrics import PALETTE, compare, plot_metrics

    src = textured_clip()
    res = compare(src, {"same": src, "noisy": (src + 0.05 * torch.randn_like(src)).clamp(0, 1)})
    assert set(res["same"]) == {"psnr", "ssim", "warp_error"} and len(res["same"]["warp_error"]) == len(src) - 1
    assert math.isinf(res["same"]["psnr"][0]) and res["noisy"]["psnr"][0] < 40
    img = plot_metrics(res, 640, 480)
    assert img.shape == (480, 640, 3) and img.dtype == np.uint8
    for colour in PALETTE[:2]:  # both methods' colours are on the figure
        assert (np.abs(img.astype(int) - np.array(colour)).sum(-1) < 30).sum() > 50
    assert (img < 250).mean() > 0.02  # not blank


def test_the_table_gives_the_means_and_each_inversions_cost():
    from stem.metrics import metrics_table

    results = {"STEM": {"psnr": [30.0, float("inf"), 20.0], "ssim": [0.9, 1.0, 0.8], "warp_error": [0.1, 0.3]},
               "per-frame": {"psnr": [float("inf")], "ssim": [1.0], "warp_error": []}}
    text, rows = metrics_table(results, {"STEM": {"seconds": 12.5, "peak_mib": 300.0}})
    stem, plain = rows
    assert stem == {"method": "STEM", "psnr_db": 25.0, "ssim": pytest.approx(0.9), "warp_error": pytest.approx(0.2),
                    "seconds": 12.5, "peak_mib": 300.0}
    assert plain["psnr_db"] == float("inf") and math.isnan(plain["warp_error"]) and "seconds" not in plain
    lines = text.splitlines()
    assert lines[0].startswith("| method | PSNR (dB)") and lines[2] == "| STEM | 25.00 | 0.9000 | 0.2000 | 12.5 | 300 |"
    assert lines[3].startswith("| per-frame | inf | 1.0000 | nan |")
