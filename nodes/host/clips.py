"""The clips Load Video Frames offers and accepts: the input folder's videos and image folders,
the size rule, and the memory check before decoding."""
from __future__ import annotations

import logging
import os

from ...stem.video import IMAGE_EXTENSIONS, frames_bytes
from .memory import free_memory, human_bytes
from .pack import StemError

log = logging.getLogger("ComfyUI-STEM")

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")
# ComfyUI's mask editor keeps its scratch images in input/clipspace; it is not a clip.
_NOT_CLIPS = {"clipspace"}
# Decoding must leave room for everything after it (VAE Encode, the model): the frames may
# take at most this share of the memory that is free when the node runs.
MEMORY_SHARE = 0.5
# SD1.x/2.x downsample the 1/8 latent three more times: below 64 px a frame has no token left
# at the UNet's lowest level.
MIN_SIZE = 64
MAX_SIZE = 8192
FRAME_ORDER = "skip_first_frames, then select_every_nth, then frame_load_cap"


def _has_image(folder: str) -> bool:
    # Stops at the first image: an input folder may hold folders of thousands of frames, and
    # the list is rebuilt every time the browser asks for the node definitions.
    try:
        with os.scandir(folder) as entries:
            return any(
                not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()
                for e in entries
            )
    except OSError:
        return False


def list_clips(input_dir: str) -> list[str]:
    """Videos directly in ``input_dir`` and its sub-folders that hold images, sorted."""
    names = []
    try:
        entries = list(os.scandir(input_dir))
    except OSError:
        return []
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_file() and e.name.lower().endswith(VIDEO_EXTENSIONS):
            names.append(e.name)
        elif e.is_dir() and e.name not in _NOT_CLIPS and _has_image(e.path):
            names.append(e.name)
    return sorted(names, key=str.lower)


def size_problem(size) -> str | None:
    """Why ``size`` cannot be used for SD, or None. (VALIDATE_INPUTS takes ``size``, so
    ComfyUI leaves its range check to this.)"""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_SIZE:
        return f"size: must be 0 (the source size) or a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}, got {size!r}"
    if 0 < size < MIN_SIZE:
        return (f"size: {size} px is below {MIN_SIZE} px, the smallest short side SD1.x/SD2.x can work on "
                f"(8 latent pixels); use 0 for the source size, or {MIN_SIZE} or more")
    return None


def check_memory(frame_count: int, width: int, height: int) -> None:
    """Refuse frames whose decoding would not fit in `MEMORY_SHARE` of the free RAM."""
    free = free_memory("cpu")
    if free is None:
        log.warning("STEM Load Video Frames: cannot read the free memory; loading without a check")
        return
    # stem.video holds the uint8 frames next to the float32 output while stacking: 1.25x.
    need = frames_bytes(frame_count, width, height) * 5 // 4
    limit = int(free * MEMORY_SHARE)
    if need > limit:
        raise StemError(
            f"video: {frame_count} frames at {width}x{height} need about {human_bytes(need)} of RAM while loading, "
            f"but {human_bytes(free)} is free and this node uses at most {int(MEMORY_SHARE * 100)}% of it "
            f"({human_bytes(limit)}). Lower size, set frame_load_cap, or raise select_every_nth "
            f"(they apply in the order {FRAME_ORDER})."
        )
