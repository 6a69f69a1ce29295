"""Reconstruction and temporal-consistency metrics for clips in ComfyUI's IMAGE layout.

Frames are float ``[F, H, W, 3]`` in [0, 1]. PSNR and SSIM compare a clip with the source frame
by frame; the warp error measures flicker: each frame of a clip is warped to the next one with
the optical flow of the SOURCE (OpenCV Farneback), and the mean absolute difference to the
clip's next frame is reported. A clip that moves exactly like the source scores 0.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004, for a data range of 1
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"clips must both be [F, H, W, 3] and equal in shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(clip: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB ``[F]`` for values in [0, 1]; identical frames give +inf."""
    _check(clip, source)
    mse = ((clip.double() - source.double()) ** 2).flatten(1).mean(1)
    return torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-300)), torch.full_like(mse, math.inf))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(clip: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM ``[F]`` (Gaussian window 11, sigma 1.5, mean over channels and the
    valid window positions); identical frames give 1."""
    _check(clip, source)
    x = clip.double().permute(0, 3, 1, 2)
    y = source.double().permute(0, 3, 1, 2)
    g = _gaussian_window()
    size = min(SSIM_WINDOW, x.shape[-1], x.shape[-2])
    if size < SSIM_WINDOW:  # tiny frames: a smaller window, renormalised
        g = _gaussian_window(size, SSIM_SIGMA * size / SSIM_WINDOW)
    c = x.shape[1]
    wx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wy = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wx, groups=c), wy, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx**2
    syy = blur(y * y) - my**2
    sxy = blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def _gray_u8(frame: torch.Tensor) -> np.ndarray:
    rgb = (frame.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def source_flows(source: torch.Tensor) -> list[np.ndarray]:
    """Backward optical flow of the source for each consecutive pair: flow ``[H, W, 2]`` such
    that frame t+1 at (x, y) comes from frame t at (x, y) + flow (Farneback)."""
    gray = [_gray_u8(f) for f in source]
    return [
        cv2.calcOpticalFlowFarneback(gray[t + 1], gray[t], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        for t in range(len(gray) - 1)
    ]


def warp_error(clip: torch.Tensor, source: torch.Tensor, flows: list[np.ndarray] | None = None,
               border: int = 2) -> torch.Tensor:
    """Per-pair warp error ``[F-1]``: mean |warp(clip[t]) - clip[t+1]| over pixels and channels,
    warping with the source's flow, ignoring ``border`` pixels at the edges (where the flow
    points outside the frame)."""
    _check(clip, source)
    flows = source_flows(source) if flows is None else flows
    H, W = clip.shape[1:3]
    gx, gy = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    out = []
    frames = clip.float().cpu().numpy()
    for t, flow in enumerate(flows):
        mx, my = gx + flow[..., 0], gy + flow[..., 1]
        warped = cv2.remap(frames[t], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        inside = (mx >= 0) & (mx <= W - 1) & (my >= 0) & (my <= H - 1)
        if border:
            inside[:border], inside[-border:], inside[:, :border], inside[:, -border:] = False, False, False, False
        diff = np.abs(warped - frames[t + 1]).mean(-1)
        out.append(float(diff[inside].mean()) if inside.any() else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]  # RGB, one per method


def _panel(h: int, w: int, title: str, series: dict[str, list[float]], colours) -> np.ndarray:
    """One line chart (one curve per method) on white, drawn with OpenCV."""
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 48, 10, 24, 22
    cv2.putText(img, title, (left, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    vals = [v for s in series.values() for v in s if np.isfinite(v)]
    if not vals:
        return img
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    for frac, val in ((0.0, lo), (1.0, hi)):
        y = int(h - bottom - frac * (h - top - bottom))
        cv2.putText(img, f"{val:.3g}", (2, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    for (label, s), colour in zip(series.items(), colours):
        n = len(s)
        pts = []
        for i, v in enumerate(s):
            if not np.isfinite(v):
                continue
            x = left + (i / max(n - 1, 1)) * (w - left - right)
            y = h - bottom - (v - lo) / (hi - lo) * (h - top - bottom)
            pts.append((int(round(x)), int(round(y))))
        for p, q in zip(pts, pts[1:]):
            cv2.line(img, p, q, colour, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, p, 2, colour, -1, cv2.LINE_AA)
    return img


def _bars(h: int, w: int, title: str, means: dict[str, float], colours) -> np.ndarray:
    img = np.full((h, w, 3), 255, np.uint8)
    cv2.putText(img, title, (48, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    finite = [v for v in means.values() if np.isfinite(v)]
    top_v = max(finite) if finite else 1.0
    n = max(len(means), 1)
    slot = (w - 60) // n
    for i, ((label, v), colour) in enumerate(zip(means.items(), colours)):
        x0 = 48 + i * slot + slot // 6
        x1 = 48 + (i + 1) * slot - slot // 6
        frac = 1.0 if not np.isfinite(v) else (v / top_v if top_v > 0 else 0.0)
        y = int(h - 40 - frac * (h - 80))
        cv2.rectangle(img, (x0, y), (x1, h - 40), colour, -1)
        cv2.putText(img, f"{v:.2f}", (x0, y - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, label[:14], (x0, h - 24), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def plot_metrics(results: dict[str, dict[str, list[float]]], width: int = 768, height: int = 512) -> np.ndarray:
    """A 2x2 figure, uint8 RGB ``[height, width, 3]``: PSNR, SSIM and warp error per frame, one
    curve per method, and a bar chart of the mean PSNR (infinite values drawn at 100 dB)."""
    colours = PALETTE * (1 + len(results) // len(PALETTE))
    h, w = height // 2, width // 2

    def metric(name: str, cap: float | None = None) -> dict[str, list[float]]:
        return {k: [min(v, cap) if cap else v for v in r[name]] for k, r in results.items()}

    psnr_s = metric("psnr", 100.0)
    top = np.concatenate([_panel(h, w, "PSNR per frame (dB)", psnr_s, colours),
                          _panel(h, width - w, "SSIM per frame", metric("ssim"), colours)], axis=1)
    means = {k: float(np.mean(v)) for k, v in psnr_s.items()}
    bottom = np.concatenate([_panel(height - h, w, "warp error per frame pair", metric("warp_error"), colours),
                             _bars(height - h, width - w, "mean PSNR (dB)", means, colours)], axis=1)
    return np.concatenate([top, bottom], axis=0)


def compare(source: torch.Tensor, clips: dict[str, torch.Tensor]) -> dict[str, dict[str, list[float]]]:
    """PSNR, SSIM and warp error of each clip against the source (flow computed once)."""
    flows = source_flows(source)
    return {
        label: {"psnr": psnr(c, source).tolist(), "ssim": ssim(c, source).tolist(),
                "warp_error": warp_error(c, source, flows).tolist()}
        for label, c in clips.items()
    }


def metrics_table(results: dict, costs: dict) -> tuple[str, list[dict]]:
    """A plain-text table of the means (and each inversion's cost), and the same as rows."""
    rows = []
    for label, r in results.items():
        p = [v for v in r["psnr"] if np.isfinite(v)]
        row = {"method": label, "psnr_db": float(np.mean(p)) if p else float("inf"), "ssim": float(np.mean(r["ssim"])),
               "warp_error": float(np.mean(r["warp_error"])) if r["warp_error"] else float("nan")}
        row.update(costs.get(label, {}))
        rows.append(row)
    lines = ["| method | PSNR (dB) | SSIM | warp error | inversion s | peak MiB |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['warp_error']:.4f} | "
                     f"{r.get('seconds', float('nan')):.1f} | {r.get('peak_mib', float('nan')):.0f} |")
    return "\n".join(lines), rows
