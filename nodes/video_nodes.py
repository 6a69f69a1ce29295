"""Load Video Frames: a clip from ComfyUI's input folder as IMAGE frames, decoded by stem.video.

Also holds the path checks the file-reading nodes share: a name chosen in a combo is resolved
like core LoadImage does (``folder_paths.get_annotated_filepath``) and then refused unless its
real path (``..`` and symbolic links resolved) lies inside an allowed ComfyUI folder, because an
API prompt can send any string, not only the listed names.
"""
from __future__ import annotations

import hashlib
import logging
import os

from ..stem.video import IMAGE_EXTENSIONS, VideoError, estimate_bytes, load_video, probe_video
from .common import CATEGORY, StemError

log = logging.getLogger("ComfyUI-STEM")

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")
# ComfyUI's mask editor keeps its scratch images in input/clipspace; it is not a clip.
_NOT_CLIPS = {"clipspace"}
# Decoding must leave room for everything after it (VAE Encode, the model): the frames may
# take at most this share of the memory that is free when the node runs.
MEMORY_SHARE = 0.5
_FRAME_ORDER = "skip_first_frames, then select_every_nth, then frame_load_cap"


# ---------------------------------------------------------------------------------------
# Paths (shared with inversion_io).
# ---------------------------------------------------------------------------------------


def within(path: str, root: str) -> bool:
    """Whether the real path ``path`` is ``root`` or lies below it."""
    path, root = os.path.normcase(path), os.path.normcase(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def folder_roots(kinds: tuple[str, ...]) -> dict[str, str]:
    """Real paths of ComfyUI's folders by type ("input", "output")."""
    import folder_paths

    return {kind: os.path.realpath(folder_paths.get_directory_by_type(kind)) for kind in kinds}


def resolve_in_folders(name, input_name: str, kinds: tuple[str, ...] = ("input",)) -> str:
    """The real path of a combo value such as ``clip.mp4`` or ``a/b.safetensors [output]``.

    Raises StemError naming ``input_name`` when the name is empty or resolves outside the
    folders of ``kinds``. Existence is not checked here.
    """
    import folder_paths

    folders = " or ".join(f"{k} folder" for k in kinds)
    if not isinstance(name, str) or not name.strip():
        raise StemError(f"{input_name}: no file chosen; pick one from the list (files in ComfyUI's {folders}).")
    real = os.path.realpath(folder_paths.get_annotated_filepath(name))
    roots = folder_roots(kinds)
    if not any(within(real, root) and os.path.normcase(real) != os.path.normcase(root) for root in roots.values()):
        where = ", ".join(f"{k}: {r}" for k, r in roots.items())
        upload = " (the upload button does that)" if kinds == ("input",) else ""
        raise StemError(
            f"{input_name}: '{name}' points outside ComfyUI's {folders} ({where}), following '..' and "
            f"symbolic links; for safety this node reads only files inside {'it' if len(kinds) == 1 else 'them'}. "
            f"Copy the file into the {kinds[0]} folder{upload} and pick it from the list."
        )
    return real


def existing_in_folders(name, input_name: str, kinds: tuple[str, ...] = ("input",)) -> str:
    """`resolve_in_folders`, and refuse a path that does not exist."""
    real = resolve_in_folders(name, input_name, kinds)
    if not os.path.exists(real):
        raise StemError(
            f"{input_name}: '{name}' was not found in ComfyUI's {' or '.join(k + ' folder' for k in kinds)}; "
            "it may have been moved or deleted. Refresh the node list (press R) and pick an existing file."
        )
    return real


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def available_memory() -> int | None:
    """Bytes of RAM free for new allocations, or None when it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_memory(frame_count: int, width: int, height: int) -> None:
    """Refuse frames whose decoding would not fit in `MEMORY_SHARE` of the free RAM."""
    free = available_memory()
    if free is None:
        log.warning("STEM Load Video Frames: cannot read the free memory; loading without a check")
        return
    # stem.video holds the uint8 frames next to the float32 output while stacking: 1.25x.
    need = estimate_bytes(frame_count, width, height) * 5 // 4
    limit = int(free * MEMORY_SHARE)
    if need > limit:
        raise StemError(
            f"video: {frame_count} frames at {width}x{height} need about {_gb(need)} of RAM while loading, "
            f"but {_gb(free)} is free and this node uses at most {int(MEMORY_SHARE * 100)}% of it "
            f"({_gb(limit)}). Lower size, set frame_load_cap, or raise select_every_nth "
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
                    "default": 512, "min": 0, "max": 8192, "step": 8,
                    "tooltip": "Target length of the SHORT side in pixels (rounded down to a multiple of 8); the "
                               "long side follows the aspect ratio. 0 keeps the source size (rounded down to "
                               "multiples of 8).",
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
    def VALIDATE_INPUTS(cls, video=None):
        # Taking `video` here makes ComfyUI skip its "value in list" check for it, so that
        # files uploaded into sub-folders load; the location check below replaces it.
        if video is None:  # linked from another node: checked when the node runs
            return True
        try:
            existing_in_folders(video, "video")
        except StemError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, video=None, **options):
        try:
            path = existing_in_folders(video, "video")
            h = hashlib.sha256()
            if os.path.isdir(path):
                # A folder of frames can be gigabytes; names, sizes and times catch any rewrite.
                for e in sorted(os.scandir(path), key=lambda e: e.name):
                    if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS):
                        st = e.stat()
                        h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            else:
                h.update(file_sha256(path).encode())
        except (StemError, OSError):
            return float("nan")  # never equal to itself: run again, and let `load` report it
        h.update(repr(sorted(options.items())).encode())
        return h.hexdigest()

    def load(self, video, frame_load_cap, skip_first_frames, select_every_nth, size, crop):
        path = existing_in_folders(video, "video")
        options = dict(frame_load_cap=frame_load_cap, skip_first_frames=skip_first_frames,
                       select_every_nth=select_every_nth, size=size, crop=crop)
        try:
            planned = probe_video(path, **options)
            check_memory(planned.frame_count, planned.width, planned.height)
            frames, info = load_video(path, **options)
        except VideoError as e:
            raise VideoError(f"video: {e}") from None
        return (frames, info.frame_count, float(info.loaded_fps), info.width, info.height)


NODE_CLASS_MAPPINGS = {"LoadVideoFrames": LoadVideoFrames}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadVideoFrames": "Load Video Frames"}
