"""Synthetic clips: deterministic frames with motion, and mp4 files of them."""
from __future__ import annotations

from pathlib import Path


def synth_frames(frames: int = 8, width: int = 64, height: int = 64):
    """uint8 RGB frames (F, H, W, 3): a smooth two-colour gradient background, a red disc moving
    left to right and a yellow square moving down-right. Deterministic."""
    import numpy as np
    import cv2
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.stack([40 + 60 * xx / max(width - 1, 1),
                   90 + 80 * yy / max(height - 1, 1),
                   200 - 100 * xx / max(width - 1, 1)], axis=-1)
    out = np.empty((frames, height, width, 3), np.uint8)
    r = max(2, min(width, height) // 8)
    s = max(2, min(width, height) // 6)
    for i in range(frames):
        t = i / max(frames - 1, 1)
        img = np.ascontiguousarray(bg.astype(np.uint8))
        cx = int(round(r + t * (width - 2 * r - 1)))
        cy = height // 2
        cv2.circle(img, (cx, cy), r, (220, 30, 30), -1, lineType=cv2.LINE_AA)
        x0 = int(round(2 + t * (width - s - 4)))
        y0 = int(round(2 + t * (height - s - 4) * 0.5))
        cv2.rectangle(img, (x0, y0), (x0 + s, y0 + s), (240, 220, 40), -1)
        out[i] = img
    return out


def write_video_clip(path, frames: int = 8, width: int = 64, height: int = 64, fps: float = 8.0):
    """Write synth_frames(...) as an mp4 ('mp4v') to path. Returns the RGB frames written (the
    decoded ones differ slightly: mp4v is lossy)."""
    import cv2
    rgb = synth_frames(frames, width, height)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not w.isOpened():
        raise RuntimeError(f"cv2.VideoWriter could not open {path} with mp4v")
    try:
        for f in rgb:
            w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        w.release()
    return rgb
