"""Decode a video file or a folder of images into ComfyUI's IMAGE layout.

Output is a float32 tensor ``[F, H, W, 3]``, RGB, values in [0, 1], with H and W multiples
of 8 so that SD's VAE maps the frames to ``[F, 4, H/8, W/8]`` latents without padding.

Frame selection uses VideoHelperSuite's names, applied in this order (users of its Load
Video node know the names but often not the order):

1. ``skip_first_frames``: drop that many frames from the start;
2. ``select_every_nth``: of the rest, keep the first and then every nth one;
3. ``frame_load_cap``: stop after that many kept frames (0 = no cap).

Pure numpy/opencv/torch: no ComfyUI import (see ``stem/__init__.py``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Union

import cv2
import numpy as np
import torch

__all__ = [
    "DEFAULT_FPS",
    "IMAGE_EXTENSIONS",
    "FrameSelection",
    "VideoError",
    "VideoInfo",
    "frames_bytes",
    "list_image_files",
    "load_video",
    "probe_video",
    "select_frame_indices",
]

PathLike = Union[str, "os.PathLike[str]"]

# A folder of images carries no frame rate, and some containers report none (0 or NaN).
DEFAULT_FPS = 8.0

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

_MULTIPLE = 8


class VideoError(ValueError):
    """A problem with the file, the folder or the options, worded for the user.

    A subclass of ValueError so that callers which only know ValueError still catch it.
    """


@dataclass(frozen=True)
class VideoInfo:
    """What was (or, from `probe_video`, will be) loaded.

    fps: frame rate of the source (DEFAULT_FPS for a folder of images or when the container
        reports none).
    loaded_fps: frame rate of the returned frames, ``fps / select_every_nth``; use it to
        write the edited clip back at the right speed.
    source_width, source_height: size of the decoded source frames in pixels.
    source_frame_count: frames in the source. Exact for folders and for videos decoded to
        the end; when decoding stopped early at ``frame_load_cap``, the count the container
        reports (which some containers get slightly wrong), or if it reports none, the
        frames decoded so far.
    width, height: size of the returned frames (multiples of 8).
    frame_count: number of returned frames (from `probe_video`: the expected number).
    """

    fps: float
    loaded_fps: float
    source_width: int
    source_height: int
    source_frame_count: int
    width: int
    height: int
    frame_count: int


@dataclass(frozen=True)
class FrameSelection:
    """Which frames of a clip to load, and at what size (see the module docstring for the
    order: skip, then every nth, then cap; `_plan` for size and crop). Checked where it is used,
    so that the error names the clip."""

    frame_load_cap: int = 0
    skip_first_frames: int = 0
    select_every_nth: int = 1
    size: int = 0
    crop: bool = False


# ---------------------------------------------------------------------------------------
# Pure helpers: selection, sizes, memory.
# ---------------------------------------------------------------------------------------


def _option_problem(sel: FrameSelection) -> str | None:
    """Return a description of the first invalid option, or None when all are valid."""
    checks = (
        ("skip_first_frames", sel.skip_first_frames, 0),
        ("select_every_nth", sel.select_every_nth, 1),
        ("frame_load_cap", sel.frame_load_cap, 0),
        ("size", sel.size, 0),
    )
    for name, value, lowest in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            return f"{name} must be a whole number, got {value!r}"
        if value < lowest:
            return f"{name} must be at least {lowest}, got {value}"
    return None


def select_frame_indices(total: int, selection: FrameSelection = FrameSelection()) -> list[int]:
    """Source indices kept from a clip of ``total`` frames: skip, then every nth, then cap.

    Example: total 20, skip 3, every 2nd, cap 4 -> [3, 5, 7, 9].
    Raises VideoError for a negative skip or cap, or select_every_nth < 1.
    """
    problem = _option_problem(selection)
    if problem is not None:
        raise VideoError(problem + ".")
    kept = range(selection.skip_first_frames, max(int(total), 0), selection.select_every_nth)
    cap = selection.frame_load_cap
    return list(kept[:cap] if cap > 0 else kept)


def _round_multiple(value: float, *, nearest: bool = False) -> int:
    """Round down (or to the nearest) to a multiple of 8, never below 8."""
    steps = math.floor(value / _MULTIPLE + (0.5 if nearest else 0.0))
    return max(_MULTIPLE, steps * _MULTIPLE)


_Box = tuple[int, int, int, int]
_Size = tuple[int, int]


def _plan(width: int, height: int, size: int, crop: bool) -> tuple[_Box, _Size]:
    """Crop box ``(x, y, w, h)`` in source pixels and output ``(w, h)``, both multiples of 8.

    size: target SHORT side in pixels, rounded down to a multiple of 8 (0 < size < 8 is
        refused rather than silently enlarged). 0 keeps the source size, rounded down to
        multiples of 8.
    crop=False keeps the whole frame: the short side becomes ``size`` and the long side is
        scaled by the same factor, then rounded to the nearest multiple of 8, so the aspect
        ratio changes by at most 4 px on the long side. With size 0 the frame is squeezed
        by the < 8 px lost to rounding.
    crop=True cuts instead of squeezing: with size > 0 the result is a square
        ``size x size`` centre crop (the reference's 512x512 setting); with size 0 the
        frame is centre-cropped to multiples of 8 without any scaling.

    Examples: 1920x1080, size 512 -> 912x512; crop -> 512x512; size 0 -> 1920x1080;
    854x480, size 0 -> 848x480.

    Cropping in source pixels before one resize is cheaper than resizing then cropping,
    and differs from it only by sub-pixel rounding of the box.
    """
    if width < _MULTIPLE or height < _MULTIPLE:
        raise VideoError(
            f"frames are {width}x{height} px; both sides must be at least {_MULTIPLE} px"
        )
    if size < 0:
        raise VideoError(f"size must be at least 0, got {size}")
    if 0 < size < _MULTIPLE:
        raise VideoError(f"size {size} is below {_MULTIPLE} px, the smallest side a frame can have; use 0 for the "
                         f"source size or at least {_MULTIPLE}")
    if size == 0:
        out = (width // _MULTIPLE * _MULTIPLE, height // _MULTIPLE * _MULTIPLE)
        if crop:
            box = ((width - out[0]) // 2, (height - out[1]) // 2, out[0], out[1])
        else:
            box = (0, 0, width, height)
        return box, out
    side = _round_multiple(size)
    if crop:
        short = min(width, height)
        box = ((width - short) // 2, (height - short) // 2, short, short)
        return box, (side, side)
    scale = side / min(width, height)
    if width <= height:
        out = (side, _round_multiple(height * scale, nearest=True))
    else:
        out = (_round_multiple(width * scale, nearest=True), side)
    return (0, 0, width, height), out


def frames_bytes(frame_count: int, width: int, height: int) -> int:
    """Bytes of the float32 ``[frame_count, height, width, 3]`` tensor `load_video` returns.

    Decoding holds the frames as uint8 (a quarter of this) next to the output for a while,
    so the peak is about 1.25 times this number.
    """
    return int(frame_count) * int(height) * int(width) * 3 * 4


# ---------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------


def _natural_key(name: str) -> tuple:
    """Sort key that puts frame2.png before frame10.png."""
    # re.split with a capture group alternates text and digit runs, so the tuples compare
    # str with str and int with int at every position.
    parts = re.split(r"(\d+)", name.lower())
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name)


def list_image_files(folder: PathLike) -> list[str]:
    """Paths of the images directly inside ``folder``, in natural (numeric) order of name.

    Hidden files are left out: macOS leaves ``._frame001.png`` metadata files next to
    copied frames, and they are not images.
    """
    folder = os.fspath(folder)
    names = [
        n
        for n in os.listdir(folder)
        if not n.startswith(".")
        and n.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, n))
    ]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _clean_path(path: PathLike) -> str:
    text = os.fspath(path).strip()
    # Windows' "Copy as path" wraps the path in double quotes, which users paste as is.
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return os.path.expanduser(text)


def _error(path: str, problem: str, fix: str = "") -> VideoError:
    return VideoError(f"Cannot load video '{path}': {problem}." + (f" {fix}" if fix else ""))


def _check_path(path: str) -> list[str] | None:
    """Validate ``path``; return its image files for a folder or an image, None for a video."""
    if not os.path.exists(path):
        raise _error(
            path, "not found", "Check the path (it is read on the machine running ComfyUI)."
        )
    if os.path.isdir(path):
        files = list_image_files(path)
        if not files:
            raise _error(
                path,
                "the folder holds no images",
                f"Put frames ({', '.join(IMAGE_EXTENSIONS)}) directly in it.",
            )
        return files
    if os.path.getsize(path) == 0:
        raise _error(
            path, "the file is empty (0 bytes)", "It may not have finished copying or downloading."
        )
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return [path]
    return None


def _read_image(path: str) -> np.ndarray:
    """One image file as BGR ``[H, W, 3]`` in uint8, uint16 or float32."""
    # np.fromfile + imdecode rather than imread: imread cannot open non-ASCII paths on
    # Windows.
    try:
        data = np.fromfile(path, dtype=np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    except (OSError, cv2.error):
        image = None
    if image is None:
        raise _error(path, "the image could not be decoded (empty, corrupt or not an image)",
                     "Re-export it or remove it from the folder.")
    return image


def _open_capture(path: str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        raise _error(
            path,
            "OpenCV cannot open it as a video (corrupt, incomplete, or not a video)",
            "Re-encode it, e.g. `ffmpeg -i in -c:v libx264 -pix_fmt yuv420p out.mp4`, "
            "or give a folder of images.",
        )
    return capture


def _capture_fps(capture: cv2.VideoCapture) -> float:
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    return fps if math.isfinite(fps) and fps > 0 else DEFAULT_FPS


def _no_decoded_frames(path: str) -> VideoError:
    return _error(
        path,
        "OpenCV opened it but decoded no frames (corrupt, or a codec this OpenCV lacks)",
        "Re-encode it, e.g. `ffmpeg -i in -c:v libx264 -pix_fmt yuv420p out.mp4`.",
    )


def _empty_selection(path: str, total: int, sel: FrameSelection) -> VideoError:
    skip, nth, cap = sel.skip_first_frames, sel.select_every_nth, sel.frame_load_cap
    return _error(
        path,
        f"the source has {total} frames and skip_first_frames={skip}, select_every_nth={nth}, "
        f"frame_load_cap={cap} leave none of them",
        f"Set skip_first_frames below {total}.",
    )


def _validated(path: str, sel: FrameSelection) -> None:
    problem = _option_problem(sel)
    if problem is not None:
        raise _error(path, problem)


def _info(
    fps: float, nth: int, src_w: int, src_h: int, total: int, out: _Size, count: int
) -> VideoInfo:
    return VideoInfo(
        fps=fps,
        loaded_fps=fps / nth,
        source_width=src_w,
        source_height=src_h,
        source_frame_count=total,
        width=out[0],
        height=out[1],
        frame_count=count,
    )


def _output_size(path: str, width: int, height: int, sel: FrameSelection) -> tuple[_Box, _Size]:
    try:
        return _plan(width, height, sel.size, sel.crop)
    except VideoError as e:
        raise _error(path, str(e)) from None


def probe_video(path: PathLike, selection: FrameSelection = FrameSelection()) -> VideoInfo:
    """What `load_video` with the same arguments would return, decoding a single frame.

    Meant for checking memory (`frames_bytes(info.frame_count, info.width, info.height)`)
    before decoding. The frame count comes from the container and may be off by a few
    frames; only when the container reports none are the frames counted, which decodes
    them (without colour conversion).
    Raises VideoError for every problem `load_video` would report, except an image in a
    folder that fails to decode or differs in size (only the first selected one is read).
    """
    path, sel = _clean_path(path), selection
    _validated(path, sel)
    files = _check_path(path)
    if files is not None:
        total = len(files)
        chosen = select_frame_indices(total, sel)
        if not chosen:
            raise _empty_selection(path, total, sel)
        height, width = _read_image(files[chosen[0]]).shape[:2]
        _, out = _output_size(path, width, height, sel)
        return _info(DEFAULT_FPS, sel.select_every_nth, width, height, total, out, len(chosen))

    capture = _open_capture(path)
    try:
        fps = _capture_fps(capture)
        # Decode the first frame rather than trusting CAP_PROP_FRAME_WIDTH: it proves the
        # codec works and gives the size after rotation metadata is applied.
        ok, frame = capture.read()
        if not ok or frame is None:
            raise _no_decoded_frames(path)
        height, width = frame.shape[:2]
        total = int(round(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
        if total <= 0:
            total = 1
            while capture.grab():
                total += 1
    finally:
        capture.release()
    chosen = select_frame_indices(total, sel)
    if not chosen:
        raise _empty_selection(path, total, sel)
    _, out = _output_size(path, width, height, sel)
    return _info(fps, sel.select_every_nth, width, height, total, out, len(chosen))


def _fit(image: np.ndarray, box: _Box, out: _Size) -> np.ndarray:
    """Crop ``box`` from a BGR image, resize it to ``out`` and return it as RGB."""
    x, y, w, h = box
    image = image[y : y + h, x : x + w]
    if (w, h) != out:
        shrinking = out[0] * out[1] < w * h
        # INTER_AREA averages the source pixels under each output pixel, so shrinking does
        # not alias; it degenerates to nearest neighbour when enlarging, hence cubic there.
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
        image = cv2.resize(image, out, interpolation=interpolation)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """Stack RGB frames of any integer or float dtype into float32 ``[F, H, W, 3]`` in [0, 1].

    Fills a preallocated tensor frame by frame and drops each source frame once copied,
    so the peak is the output plus the (smaller) decoded frames, not twice the output.
    """
    height, width = frames[0].shape[:2]
    out = torch.empty((len(frames), height, width, 3), dtype=torch.float32)
    for i in range(len(frames)):
        frame = frames[i]
        frames[i] = None  # type: ignore[call-overload]
        target = out[i]
        target.copy_(torch.from_numpy(np.ascontiguousarray(frame)))
        if np.issubdtype(frame.dtype, np.integer):
            target.div_(float(np.iinfo(frame.dtype).max))
        else:
            # Float TIFFs may hold values outside [0, 1]; cubic enlarging overshoots too.
            target.clamp_(0.0, 1.0)
    return out


def _load_images(path: str, files: list[str], sel: FrameSelection) -> tuple[torch.Tensor, VideoInfo]:
    chosen = select_frame_indices(len(files), sel)
    if not chosen:
        raise _empty_selection(path, len(files), sel)
    frames: list[np.ndarray] = []
    first_file = files[chosen[0]]
    plan = None
    src = (0, 0)
    for index in chosen:
        image = _read_image(files[index])
        height, width = image.shape[:2]
        if plan is None:
            src = (width, height)
            plan = _output_size(path, width, height, sel)
        elif (width, height) != src:
            raise _error(
                files[index],
                f"the image is {width}x{height} px but {os.path.basename(first_file)} is "
                f"{src[0]}x{src[1]} px; all frames in a folder must have the same size",
                "Resize or remove the odd one out.",
            )
        frames.append(_fit(image, *plan))
    out_size = plan[1]
    info = _info(DEFAULT_FPS, sel.select_every_nth, src[0], src[1], len(files), out_size, len(frames))
    return _to_tensor(frames), info


def _load_capture(path: str, sel: FrameSelection) -> tuple[torch.Tensor, VideoInfo]:
    skip, nth, cap = sel.skip_first_frames, sel.select_every_nth, sel.frame_load_cap
    capture = _open_capture(path)
    frames: list[np.ndarray] = []
    try:
        fps = _capture_fps(capture)
        reported = int(round(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
        plan = None
        src = (0, 0)
        index = 0
        reached_end = False
        while not (cap and len(frames) >= cap):
            wanted = index >= skip and (index - skip) % nth == 0
            # grab() without retrieve() skips the colour conversion of unwanted frames.
            if not capture.grab():
                reached_end = True
                break
            if wanted:
                ok, frame = capture.retrieve()
                if not ok or frame is None:
                    reached_end = True
                    break
                height, width = frame.shape[:2]
                if plan is None:
                    src = (width, height)
                    plan = _output_size(path, width, height, sel)
                elif (width, height) != src:
                    raise _error(
                        path,
                        f"frame {index} is {width}x{height} px but the first loaded frame is "
                        f"{src[0]}x{src[1]} px (the resolution changes mid-stream)",
                        "Re-encode it at one resolution.",
                    )
                frames.append(_fit(frame, *plan))
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise _no_decoded_frames(path)
    total = index if reached_end or reported <= 0 else max(reported, index)
    if not frames:
        raise _empty_selection(path, total, sel)
    info = _info(fps, nth, src[0], src[1], total, plan[1], len(frames))
    return _to_tensor(frames), info


def load_video(path: PathLike, selection: FrameSelection = FrameSelection()) -> tuple[torch.Tensor, VideoInfo]:
    """Decode a video file, a folder of images or a single image to ``[F, H, W, 3]`` float32.

    path: a video OpenCV's VideoCapture reads (mp4, webm, mov, avi, gif, ...), a folder of
        images (png/jpg/jpeg/webp/bmp/tif, natural order of name: frame2 before frame10;
        grayscale becomes RGB, alpha is dropped, 16-bit keeps its precision), or one image.
        Surrounding double quotes and a leading ``~`` are accepted.
    selection: which frames (see the module docstring: skip, then every nth, then cap;
        decoding stops once the cap is reached) and the output size (see `_plan`).

    Returns the frames, RGB in [0, 1] with H and W multiples of 8, and a `VideoInfo`.
    Raises VideoError (naming the path) when the path is missing, empty, not decodable,
    a folder without images or with images of different sizes, when an option is invalid,
    or when the options leave no frame.
    """
    path = _clean_path(path)
    _validated(path, selection)
    files = _check_path(path)
    if files is not None:
        return _load_images(path, files, selection)
    return _load_capture(path, selection)
