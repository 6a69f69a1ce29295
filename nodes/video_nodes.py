"""Load Video Frames: a clip from ComfyUI's input folder as IMAGE frames, decoded by stem.video."""
from __future__ import annotations

import logging
import os

from ..stem.video import IMAGE_EXTENSIONS, VideoError, estimate_bytes, load_video, probe_video
from .host_base import CATEGORY, StemError
from .host_memory import free_memory, human_bytes
from .host_paths import existing_in_folders, file_signature, linked

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
_FRAME_ORDER = "skip_first_frames, then select_every_nth, then frame_load_cap"


# ---------------------------------------------------------------------------------------
# Listing and memory.
# ---------------------------------------------------------------------------------------


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
    need = estimate_bytes(frame_count, width, height) * 5 // 4
    limit = int(free * MEMORY_SHARE)
    if need > limit:
        raise StemError(
            f"video: {frame_count} frames at {width}x{height} need about {human_bytes(need)} of RAM while loading, "
            f"but {human_bytes(free)} is free and this node uses at most {int(MEMORY_SHARE * 100)}% of it "
            f"({human_bytes(limit)}). Lower size, set frame_load_cap, or raise select_every_nth "
            f"(they apply in the order {_FRAME_ORDER})."
        )


# ---------------------------------------------------------------------------------------
# The node.
# ---------------------------------------------------------------------------------------


class LoadVideoFrames:
    DESCRIPTION = (
        "Loads a video (mp4, webm, mov, avi, mkv, gif) or a folder of images from ComfyUI's input folder "
        "as IMAGE frames, resized so that width and height are multiples of 8 (what the VAE needs). "
        f"Frames are chosen in this order: {_FRAME_ORDER}. Refuses, before decoding, a selection that "
        "would not fit in memory."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT", "FLOAT", "INT", "INT")
    RETURN_NAMES = ("frames", "frame_count", "fps", "width", "height")
    OUTPUT_TOOLTIPS = (
        "The selected frames, RGB in [0, 1], [frames, height, width, 3].",
        "How many frames were loaded.",
        "Frame rate of the loaded frames: the source's fps divided by select_every_nth (8 for a folder of "
        "images); use it to save the edited clip at the source's speed.",
        "Width of the frames in pixels (a multiple of 8).",
        "Height of the frames in pixels (a multiple of 8).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "video": (list_clips(folder_paths.get_input_directory()), {
                    "video_upload": True,
                    "tooltip": "A video in ComfyUI's input folder (upload one with the button), or a sub-folder of "
                               "it holding frames as images (natural order: frame2 before frame10). Files outside "
                               "the input folder are refused.",
                }),
                "frame_load_cap": ("INT", {
                    "default": 0, "min": 0, "max": 1_000_000, "step": 1,
                    "tooltip": "Stop after this many frames (0 = all). Applied last: skip_first_frames, then "
                               "select_every_nth, then frame_load_cap.",
                }),
                "skip_first_frames": ("INT", {
                    "default": 0, "min": 0, "max": 1_000_000, "step": 1,
                    "tooltip": "Drop this many frames from the start. Applied first: skip_first_frames, then "
                               "select_every_nth, then frame_load_cap.",
                }),
                "select_every_nth": ("INT", {
                    "default": 1, "min": 1, "max": 1000, "step": 1,
                    "tooltip": "Of the frames left after skipping, keep the first and then every nth (1 = all; 2 "
                               "halves the frame rate). Order: skip_first_frames, then select_every_nth, then "
                               "frame_load_cap.",
                }),
                "size": ("INT", {
                    "default": 512, "min": 0, "max": MAX_SIZE, "step": 8,
                    "tooltip": f"Target length of the SHORT side in pixels (rounded down to a multiple of 8; at "
                               f"least {MIN_SIZE}, which SD needs); the long side follows the aspect ratio. 0 keeps "
                               "the source size (rounded down to multiples of 8).",
                }),
                "crop": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: keep the whole frame, scaled (at most 4 px of squeeze on the long side from "
                               "rounding to 8). On: cut instead of squeezing: with size > 0 a square size x size "
                               "centre crop (the reference's 512x512); with size 0 a centre crop to multiples of 8, "
                               "no scaling.",
                }),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, video=None, size=None, input_types=None):
        # Taking `video` here makes ComfyUI skip its "value in list" check for it, so that
        # files uploaded into sub-folders load; the location check below replaces it.
        # `input_types` names the linked inputs: those are checked when the node runs.
        # (a widget's INT is never None here: ComfyUI converts it first and refuses a null)
        problem = None if size is None or linked("size", input_types) else size_problem(size)
        if problem:
            return problem
        if linked("video", input_types):
            return True
        try:
            existing_in_folders(video, "video")
        except StemError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, video=None, **options):
        try:
            signature = file_signature(existing_in_folders(video, "video"), IMAGE_EXTENSIONS)
        except (StemError, OSError):
            return float("nan")  # never equal to itself: run again, and let `load` report it
        return f"{signature}:{sorted(options.items())!r}"

    def load(self, video, frame_load_cap, skip_first_frames, select_every_nth, size, crop):
        path = existing_in_folders(video, "video")
        if size_problem(size):
            raise StemError(size_problem(size))
        options = dict(frame_load_cap=frame_load_cap, skip_first_frames=skip_first_frames,
                       select_every_nth=select_every_nth, size=size, crop=crop)
        try:
            planned = probe_video(path, **options)
            check_memory(planned.frame_count, planned.width, planned.height)
            frames, info = load_video(path, **options)
        except VideoError as e:
            raise VideoError(f"video: {e}") from None
        return (frames, info.frame_count, float(info.loaded_fps), info.width, info.height)


NODE_CLASS_MAPPINGS = {"STEMLoadVideoFrames": LoadVideoFrames}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMLoadVideoFrames": "Load Video Frames"}
