"""Tests for stem.video: decoding, frame selection, resizing and the user-facing errors.

Every clip is drawn here with OpenCV into tmp_path, so frame identity is known: either a
white square that moves 4 px a frame (checked through its centroid) or a solid grey level
that encodes the frame index (checked through the mean, which survives lossy codecs).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stem.video import _plan  # the sizing rules, tested apart from decoding
from stem.video import (
    DEFAULT_FPS,
    FrameSelection,
    VideoError,
    VideoInfo,
    frames_bytes,
    list_image_files,
    load_video,
    probe_video,
    select_frame_indices,
)

W, H = 64, 48
FPS = 10.0  # GIF stores delays in 1/100 s, so 10 fps is exact there too
SQUARE = 8
STEP = 4


def _square_frame(i: int) -> np.ndarray:
    frame = np.zeros((H, W, 3), np.uint8)
    x = 4 + STEP * i
    frame[16 : 16 + SQUARE, x : x + SQUARE] = 255
    return frame


def _square_centre_x(i: int) -> float:
    return 4 + STEP * i + (SQUARE - 1) / 2


def _level(i: int) -> int:
    """Grey level that identifies frame i, 10 apart so lossy codecs cannot blur two together."""
    return 20 + 10 * i


def _level_frame(i: int) -> np.ndarray:
    return np.full((H, W, 3), _level(i), np.uint8)


def _write_video(path: Path, fourcc: str, frames: list[np.ndarray], fps: float = FPS) -> Path:
    if path.suffix == ".gif":
        animation = cv2.Animation()
        animation.frames = frames
        animation.durations = [int(round(1000 / fps))] * len(frames)
        assert cv2.imwriteanimation(str(path), animation)
        return path
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))
    assert writer.isOpened(), f"this OpenCV cannot write {fourcc} to {path.suffix}"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def _write_folder(folder: Path, frames: list[np.ndarray], pattern: str = "frame_{}.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        assert cv2.imwrite(str(folder / pattern.format(i)), frame)
    return folder


def _centroid_x(frame: torch.Tensor) -> float:
    mask = frame.mean(dim=-1) > 0.5
    xs = torch.nonzero(mask)[:, 1].float()
    assert xs.numel() > 0, "the square vanished"
    return xs.mean().item()


def _frame_levels(frames: torch.Tensor) -> list[int]:
    """Index of the _level each frame is closest to."""
    means = frames.mean(dim=(1, 2, 3)) * 255
    return [int(round((m.item() - 20) / 10)) for m in means]


# (fourcc, suffix): containers OpenCV writes and reads here. VP80 in webm also covers the
# case where FFmpeg warns about the tag but still writes a valid file.
CODECS = [("mp4v", ".mp4"), ("MJPG", ".avi"), ("VP80", ".webm"), ("FFV1", ".mkv"), ("gif", ".gif")]


@pytest.mark.parametrize("fourcc,suffix", CODECS, ids=[s for _, s in CODECS])
def test_each_container_decodes_every_frame_with_the_square_in_place(tmp_path, fourcc, suffix):
    n = 12
    path = _write_video(tmp_path / f"clip{suffix}", fourcc, [_square_frame(i) for i in range(n)])

    frames, info = load_video(path)

    assert frames.shape == (n, H, W, 3)
    assert frames.dtype == torch.float32
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    assert frames.max() > 0.9  # [0, 1], not [0, 1/255] or [0, 255]
    for i in range(n):
        assert abs(_centroid_x(frames[i]) - _square_centre_x(i)) < 1.5, f"frame {i}"
    assert info == VideoInfo(
        fps=FPS, loaded_fps=FPS, source_width=W, source_height=H, source_frame_count=n,
        width=W, height=H, frame_count=n,
    )


@pytest.mark.parametrize("kind", ["mp4", "png folder"])
def test_channels_come_out_in_rgb_order(tmp_path, kind):
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:, : W // 2] = (0, 0, 255)  # red in BGR
    frame[:, W // 2 :] = (255, 0, 0)  # blue in BGR
    if kind == "mp4":
        path = _write_video(tmp_path / "c.mp4", "mp4v", [frame] * 2)
    else:
        path = _write_folder(tmp_path / "f", [frame] * 2)

    frames, _ = load_video(path)

    left = frames[:, :, 4 : W // 2 - 4].mean(dim=(0, 1, 2))
    right = frames[:, :, W // 2 + 4 : -4].mean(dim=(0, 1, 2))
    assert left[0] > 0.8 and left[2] < 0.2
    assert right[2] > 0.8 and right[0] < 0.2


def test_png_folder_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    bgr = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(4)]
    folder = _write_folder(tmp_path / "f", bgr)

    frames, info = load_video(folder)

    expected = torch.from_numpy(np.stack([f[..., ::-1] for f in bgr]).copy()).float() / 255
    assert torch.equal(frames, expected)
    assert info.fps == DEFAULT_FPS and info.frame_count == 4


def test_folder_is_read_in_natural_order_and_ignores_non_images(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for i, number in enumerate([1, 2, 10, 11]):
        cv2.imwrite(str(folder / f"frame{number}.png"), _level_frame(i))
    (folder / "notes.txt").write_text("not a frame")
    (folder / "._frame3.png").write_bytes(b"macOS metadata, not a png")
    (folder / "sub.png").mkdir()

    frames, info = load_video(folder)

    assert _frame_levels(frames) == [0, 1, 2, 3]
    assert [os.path.basename(p) for p in list_image_files(folder)] == [
        "frame1.png", "frame2.png", "frame10.png", "frame11.png",
    ]
    assert info.source_frame_count == 4


def test_grayscale_and_alpha_images_become_rgb(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    gray = np.tile(np.arange(W, dtype=np.uint8) * 4, (H, 1))
    cv2.imwrite(str(folder / "0.png"), gray)
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 2] = 200  # red in BGRA
    rgba[..., 3] = 10  # nearly transparent: alpha must be dropped, not multiplied in
    cv2.imwrite(str(folder / "1.png"), rgba)

    frames, _ = load_video(folder)

    assert frames.shape == (2, H, W, 3)
    expected_gray = torch.from_numpy(gray).float() / 255
    for c in range(3):
        assert torch.equal(frames[0, ..., c], expected_gray)
    assert torch.allclose(frames[1, ..., 0], torch.tensor(200 / 255))
    assert frames[1, ..., 1:].abs().max() == 0


def test_16_bit_png_keeps_its_precision(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), np.full((H, W, 3), 40000, np.uint16))

    frames, _ = load_video(folder)

    # 8-bit decoding would give 156/255 = 0.6118; 40000/65535 = 0.61036.
    assert torch.allclose(frames, torch.tensor(40000 / 65535), atol=1e-6)


def test_single_image_file_loads_as_one_frame(tmp_path):
    path = tmp_path / "still.jpg"
    cv2.imwrite(str(path), _level_frame(5))

    frames, info = load_video(path)

    assert frames.shape == (1, H, W, 3)
    assert _frame_levels(frames) == [5]
    assert info.source_frame_count == 1


@pytest.mark.parametrize(
    "total,skip,nth,cap,expected",
    [
        (20, 3, 2, 4, [3, 5, 7, 9]),
        (10, 0, 1, 0, list(range(10))),
        (10, 0, 3, 0, [0, 3, 6, 9]),
        (10, 8, 1, 0, [8, 9]),
        (10, 0, 1, 3, [0, 1, 2]),
        (10, 10, 1, 0, []),
        (5, 0, 1, 99, [0, 1, 2, 3, 4]),
        (0, 0, 1, 0, []),
    ],
)
def test_select_frame_indices_skips_then_takes_every_nth_then_caps(total, skip, nth, cap, expected):
    assert select_frame_indices(total, FrameSelection(cap, skip, nth)) == expected


@pytest.mark.parametrize("kind", ["mp4", "png folder"])
def test_load_applies_skip_then_every_nth_then_cap(tmp_path, kind):
    levels = [_level_frame(i) for i in range(20)]
    if kind == "mp4":
        path = _write_video(tmp_path / "c.mp4", "mp4v", levels)
    else:
        path = _write_folder(tmp_path / "f", levels)

    frames, info = load_video(path, FrameSelection(frame_load_cap=4, skip_first_frames=3, select_every_nth=2))

    assert _frame_levels(frames) == [3, 5, 7, 9]
    fps = FPS if kind == "mp4" else DEFAULT_FPS
    assert info.frame_count == 4 and info.source_frame_count == 20
    assert info.fps == fps and info.loaded_fps == fps / 2


_RealCapture = cv2.VideoCapture


class _CountingCapture:
    """VideoCapture wrapper that counts decoded frames (read() does not go through grab()).

    A wrapper, not a subclass: instantiating a Python subclass of cv2.VideoCapture makes
    the interpreter segfault at exit with OpenCV 5.0.0.
    """

    decoded = 0

    def __init__(self, *args):
        self._capture = _RealCapture(*args)

    def __getattr__(self, name):
        return getattr(self._capture, name)

    def grab(self):
        type(self).decoded += 1
        return self._capture.grab()

    def read(self, *args):
        type(self).decoded += 1
        return self._capture.read(*args)


@pytest.fixture
def counting_capture(monkeypatch):
    _CountingCapture.decoded = 0
    monkeypatch.setattr("stem.video.cv2.VideoCapture", _CountingCapture)
    return _CountingCapture


def test_cap_stops_decoding_early(tmp_path, counting_capture):
    path = _write_video(tmp_path / "c.avi", "MJPG", [_level_frame(i) for i in range(20)])

    frames, info = load_video(path, FrameSelection(frame_load_cap=3, skip_first_frames=2))

    assert _frame_levels(frames) == [2, 3, 4]
    assert counting_capture.decoded == 5
    assert info.source_frame_count == 20  # from the container, since decoding stopped early


def test_probe_decodes_one_frame_and_predicts_what_load_returns(tmp_path, counting_capture):
    path = _write_video(tmp_path / "c.mp4", "mp4v", [_level_frame(i) for i in range(20)], fps=24.0)
    options = dict(frame_load_cap=4, skip_first_frames=3, select_every_nth=2, size=32, crop=False)

    info = probe_video(path, FrameSelection(**options))

    assert counting_capture.decoded == 1
    source = (info.fps, info.source_width, info.source_height, info.source_frame_count)
    assert source == (24.0, W, H, 20)
    assert info == load_video(path, FrameSelection(**options))[1]
    assert probe_video(path).frame_count == 20


def test_probe_of_folder_matches_load(tmp_path):
    folder = _write_folder(tmp_path / "f", [_level_frame(i) for i in range(7)])

    options = dict(skip_first_frames=1, select_every_nth=3, size=24, crop=True)

    info = probe_video(folder, FrameSelection(**options))

    assert info == load_video(folder, FrameSelection(**options))[1]
    assert (info.frame_count, info.width, info.height) == (2, 24, 24)


@pytest.mark.parametrize(
    "w,h,size,crop,expected",
    [
        (1920, 1080, 512, False, (912, 512)),  # 910.2 rounds to the nearest multiple, 912
        (1080, 1920, 512, False, (512, 912)),
        (1920, 1080, 512, True, (512, 512)),
        (854, 480, 0, False, (848, 480)),  # the reference's 854x480 clips
        (854, 480, 0, True, (848, 480)),
        (W, H, 0, False, (W, H)),
        (100, 60, 20, False, (24, 16)),  # size rounds down to 16; 26.7 rounds to 24
        (100, 60, 8, True, (8, 8)),
        (W, H, 96, False, (128, 96)),  # enlarging
    ],
)
def test_output_size_follows_the_short_side_rules(w, h, size, crop, expected):
    out = _plan(w, h, size, crop)[1]
    assert out == expected
    assert out[0] % 8 == 0 and out[1] % 8 == 0


def test_output_size_rejects_frames_smaller_than_8_px_and_sizes_it_would_enlarge():
    with pytest.raises(VideoError, match="at least 8"):
        _plan(7, 100, 0, False)
    with pytest.raises(VideoError, match="size 4 is below 8 px"):  # once silently made 8
        _plan(100, 60, 4, True)


@pytest.mark.parametrize(
    "size,crop,shape",
    [(32, False, (32, 40)), (32, True, (32, 32)), (96, False, (96, 128)), (0, True, (H, W))],
)
def test_load_resizes_video_to_the_requested_size(tmp_path, size, crop, shape):
    path = _write_video(tmp_path / "c.avi", "MJPG", [_square_frame(i) for i in range(6)])

    frames, info = load_video(path, FrameSelection(size=size, crop=crop))

    assert frames.shape == (6, *shape, 3)
    assert (info.height, info.width) == shape
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    if not crop:  # the whole frame is scaled, so the square's centroid scales with it
        scale = shape[1] / W
        for i in range(6):
            # Pixel centres sit at index + 0.5 in both images.
            expected = (_square_centre_x(i) + 0.5) * scale - 0.5
            assert abs(_centroid_x(frames[i]) - expected) < 1.5 * scale


def test_crop_without_size_centre_crops_without_scaling(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    folder = _write_folder(tmp_path / "f", [image])

    frames, info = load_video(folder, FrameSelection(crop=True))

    expected = torch.from_numpy(image[1:49, 3:67, ::-1].copy()).float() / 255
    assert torch.equal(frames[0], expected)
    assert (info.source_width, info.source_height, info.width, info.height) == (70, 50, 64, 48)


def test_crop_with_size_cuts_the_sides_of_a_wide_frame(tmp_path):
    image = np.full((48, 96, 3), 128, np.uint8)
    image[:, :20] = (0, 0, 255)  # red outside the centred 48x48 square
    image[:, -20:] = (0, 0, 255)
    folder = _write_folder(tmp_path / "f", [image])

    cropped, _ = load_video(folder, FrameSelection(size=24, crop=True))
    squeezed, _ = load_video(folder, FrameSelection(size=24, crop=False))

    assert cropped.shape == (1, 24, 24, 3)
    assert torch.allclose(cropped, torch.tensor(128 / 255), atol=1e-6)
    assert squeezed.shape == (1, 24, 48, 3)
    assert squeezed[0, :, :4, 0].min() > 0.9  # the red edge survives without crop


def test_frames_bytes_match_the_loaded_tensor(tmp_path):
    path = _write_video(tmp_path / "c.mp4", "mp4v", [_level_frame(i) for i in range(5)])

    frames, info = load_video(path, FrameSelection(size=32))

    assert frames_bytes(10, 64, 48) == 10 * 48 * 64 * 3 * 4
    loaded_bytes = frames.numel() * frames.element_size()
    assert frames_bytes(info.frame_count, info.width, info.height) == loaded_bytes


def test_quoted_path_is_accepted(tmp_path):
    path = _write_video(tmp_path / "c.mp4", "mp4v", [_level_frame(i) for i in range(3)])

    frames, _ = load_video(f' "{path}" ')

    assert frames.shape[0] == 3


# --- errors -----------------------------------------------------------------------------


def _assert_error(call, path, *fragments):
    with pytest.raises(VideoError) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_video_error_is_a_value_error():
    assert issubclass(VideoError, ValueError)


@pytest.mark.parametrize("load", [load_video, probe_video])
def test_missing_path_says_not_found(tmp_path, load):
    path = tmp_path / "nope.mp4"
    _assert_error(lambda: load(path), path, "not found")


@pytest.mark.parametrize("load", [load_video, probe_video])
def test_text_file_named_mp4_is_refused(tmp_path, load):
    path = tmp_path / "fake.mp4"
    path.write_text("this is not a video\n" * 20)
    _assert_error(lambda: load(path), path, "cannot open it as a video")


@pytest.mark.parametrize("load", [load_video, probe_video])
def test_empty_file_is_refused(tmp_path, load):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    _assert_error(lambda: load(path), path, "empty (0 bytes)")


@pytest.mark.parametrize("load", [load_video, probe_video])
def test_folder_without_images_is_refused(tmp_path, load):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "readme.txt").write_text("no frames here")
    _assert_error(lambda: load(folder), folder, "no images")


@pytest.mark.parametrize("kind", ["mp4", "png folder", "probe mp4"])
def test_selection_leaving_no_frames_reports_the_source_length(tmp_path, kind):
    levels = [_level_frame(i) for i in range(6)]
    if kind == "png folder":
        path = _write_folder(tmp_path / "f", levels)
    else:
        path = _write_video(tmp_path / "c.mp4", "mp4v", levels)
    load = probe_video if kind.startswith("probe") else load_video

    _assert_error(
        lambda: load(path, FrameSelection(skip_first_frames=6)), path, "has 6 frames", "skip_first_frames=6"
    )


@pytest.mark.parametrize(
    "option,value",
    [("skip_first_frames", -1), ("select_every_nth", 0), ("frame_load_cap", -1), ("size", -8)],
)
def test_invalid_options_are_refused_by_name(tmp_path, option, value):
    path = _write_video(tmp_path / "c.mp4", "mp4v", [_level_frame(0)] * 2)
    _assert_error(lambda: load_video(path, FrameSelection(**{option: value})), path, option)
    with pytest.raises(VideoError, match="select_every_nth"):
        select_frame_indices(10, FrameSelection(select_every_nth=0))


def test_undecodable_image_in_folder_is_named(tmp_path):
    folder = _write_folder(tmp_path / "f", [_level_frame(i) for i in range(3)])
    bad = folder / "frame_1.png"
    bad.write_bytes(b"\x89PNG but truncated")
    _assert_error(lambda: load_video(folder), bad, "could not be decoded")


def test_image_of_another_size_in_folder_is_named(tmp_path):
    folder = _write_folder(tmp_path / "f", [_level_frame(i) for i in range(3)])
    odd = folder / "frame_2.png"
    cv2.imwrite(str(odd), np.zeros((H, W + 8, 3), np.uint8))
    _assert_error(lambda: load_video(folder), odd, "72x48", "same size")


def test_frames_smaller_than_8_px_are_refused_with_the_path(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((4, 4, 3), np.uint8))
    _assert_error(lambda: load_video(folder), folder, "4x4")
