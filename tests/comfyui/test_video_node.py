"""Load Video Frames in ComfyUI: outputs, cache key, the input-folder fence, memory refusal.

Most tests call the node class directly, with ComfyUI's folder_paths pointed at a fresh
temporary input folder for each test (fast); the last ones run it through ComfyUI's executor
(the conftest's run_prompt) on the session's input folder.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import comfy_harness as harness
import pytest

W, H, FPS = 64, 48, 10.0


@pytest.fixture(scope="module")
def pack(stem_pack):
    return stem_pack


@pytest.fixture
def mod(pack):
    return harness.pack_submodule(pack, "nodes.video_nodes")


@pytest.fixture
def clips(pack):
    return harness.pack_submodule(pack, "nodes.host.clips")


@pytest.fixture
def node(pack):
    return pack.NODE_CLASS_MAPPINGS["STEMLoadVideoFrames"]


@pytest.fixture
def dirs(tmp_path, monkeypatch, pack):
    """Fresh input/output folders for one test; ``outside`` is a folder next to them."""
    import folder_paths

    d = {k: tmp_path / k for k in ("input", "output", "outside")}
    for p in d.values():
        p.mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(d["input"]))
    monkeypatch.setattr(folder_paths, "output_directory", str(d["output"]))
    return d


def _level(i: int) -> int:
    return 20 + 10 * i


def _levels(frames) -> list[int]:
    return [int(round((m.item() * 255 - 20) / 10)) for m in frames.mean(dim=(1, 2, 3))]


def _write_clip(path: Path, n: int = 10, offset: int = 0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (W, H))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((H, W, 3), _level(i + offset), np.uint8))
    writer.release()
    return path


def _write_folder(folder: Path, n: int = 5) -> Path:
    folder.mkdir()
    for i in range(n):
        assert cv2.imwrite(str(folder / f"frame{i + 1}.png"), np.full((H, W, 3), _level(i), np.uint8))
    return folder


def _run(node, video, frame_load_cap=0, skip_first_frames=0, select_every_nth=1, size=0, crop=False):
    return node().load(video, frame_load_cap, skip_first_frames, select_every_nth, size, crop)


OPTS = dict(frame_load_cap=0, skip_first_frames=0, select_every_nth=1, size=0, crop=False)


# --------------------------------------------------------------------------- outputs


def test_outputs_frames_count_fps_and_size_of_a_clip(node, dirs):
    _write_clip(dirs["input"] / "clip.mp4", n=10)

    frames, count, fps, width, height = _run(node, "clip.mp4", frame_load_cap=3, skip_first_frames=1, select_every_nth=2)

    assert tuple(frames.shape) == (3, H, W, 3) and str(frames.dtype) == "torch.float32"
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert _levels(frames) == [1, 3, 5]  # skip 1, then every 2nd, then cap 3
    assert (count, width, height) == (3, W, H)
    assert isinstance(fps, float) and fps == pytest.approx(FPS / 2)


def test_size_sets_the_short_side_and_crop_makes_a_square(node, dirs):
    _write_clip(dirs["input"] / "clip.mp4", n=4)
    frames, count, _, width, height = _run(node, "clip.mp4", size=72)
    assert (width, height) == (96, 72) and tuple(frames.shape) == (4, 72, 96, 3)  # 64*72/48 = 96
    frames, _, _, width, height = _run(node, "clip.mp4", size=72, crop=True)
    assert (width, height) == (72, 72) and tuple(frames.shape) == (4, 72, 72, 3)


@pytest.mark.parametrize("size", [4, 8, 32, 63])
def test_a_size_too_small_for_sd_is_refused_at_validation_and_by_the_node(node, dirs, size):
    """Once, 4 became 8 px without a word; SD needs a short side of 64 px (8 latent pixels)."""
    _write_clip(dirs["input"] / "clip.mp4", n=4)
    message = node.VALIDATE_INPUTS(video="clip.mp4", size=size)
    assert isinstance(message, str) and message.startswith(f"size: {size} px is below 64 px") and "use 0" in message
    with pytest.raises(ValueError, match=f"size: {size} px is below 64 px"):
        _run(node, "clip.mp4", size=size)
    assert node.VALIDATE_INPUTS(video="clip.mp4", size=64) is True
    assert node.VALIDATE_INPUTS(video="clip.mp4", size=0) is True
    assert "must be 0" in node.VALIDATE_INPUTS(video="clip.mp4", size=-8)
    # a linked size is checked when the node runs
    assert node.VALIDATE_INPUTS(video="clip.mp4", size=None, input_types={"size": "INT"}) is True


def test_a_folder_of_images_loads_in_natural_order_at_the_default_fps(node, mod, dirs):
    _write_folder(dirs["input"] / "frames", n=12)  # frame10 after frame9, not after frame1
    frames, count, fps, _, _ = _run(node, "frames", skip_first_frames=8)
    assert _levels(frames) == [8, 9, 10, 11] and count == 4
    assert fps == pytest.approx(8.0)
    assert "frames" in node.INPUT_TYPES()["required"]["video"][0]


def test_a_clip_uploaded_into_a_sub_folder_validates_and_loads(node, dirs):
    (dirs["input"] / "uploads").mkdir()
    _write_clip(dirs["input"] / "uploads" / "clip.mp4", n=3)
    assert node.VALIDATE_INPUTS(video="uploads/clip.mp4") is True
    assert _run(node, "uploads/clip.mp4")[1] == 3


# --------------------------------------------------------------------------- IS_CHANGED


def test_is_changed_follows_size_time_and_options_without_reading_the_file(node, dirs):
    """As core LoadVideo: the file's size and modification time, never its contents (a clip can be
    hundreds of MB and IS_CHANGED runs on every queue)."""
    path = _write_clip(dirs["input"] / "clip.mp4", n=6)
    with harness.forbid_reading(path):
        first = node.IS_CHANGED(video="clip.mp4", **OPTS)
        assert node.IS_CHANGED(video="clip.mp4", **OPTS) == first
        assert node.IS_CHANGED(video="clip.mp4", **{**OPTS, "select_every_nth": 2}) != first
        os.utime(path, (1_000_000, 1_000_000))  # a new time stamp: run again
        touched = node.IS_CHANGED(video="clip.mp4", **OPTS)
    assert touched != first
    _write_clip(path, n=7)  # new content, new size
    os.utime(path, (1_000_000, 1_000_000))
    assert node.IS_CHANGED(video="clip.mp4", **OPTS) != touched


def test_is_changed_of_a_folder_follows_its_frames(node, dirs):
    folder = _write_folder(dirs["input"] / "frames", n=3)
    first = node.IS_CHANGED(video="frames", **OPTS)
    assert node.IS_CHANGED(video="frames", **OPTS) == first
    cv2.imwrite(str(folder / "frame2.png"), np.zeros((H, W, 3), np.uint8))
    second = node.IS_CHANGED(video="frames", **OPTS)
    assert second != first
    cv2.imwrite(str(folder / "frame4.png"), np.zeros((H, W, 3), np.uint8))
    assert node.IS_CHANGED(video="frames", **OPTS) != second


# --------------------------------------------------------------------------- the input-folder fence


def _outside_names(dirs) -> dict[str, str]:
    secret = _write_clip(dirs["outside"] / "secret.mp4", n=3)  # a valid clip: only the location is wrong
    os.symlink(secret, dirs["input"] / "link.mp4")
    os.symlink(dirs["outside"], dirs["input"] / "linked_folder")
    _write_clip(dirs["output"] / "rendered.mp4", n=3)
    return {
        "parent": "../outside/secret.mp4",
        "deep parent": "sub/../../outside/secret.mp4",
        "absolute": str(secret),
        "etc": "../../../../../../../../etc/passwd",
        "symlink to a file": "link.mp4",
        "symlink to a folder": "linked_folder/secret.mp4",
        "output annotation": "rendered.mp4 [output]",
    }


def test_paths_outside_the_input_folder_are_refused_before_and_while_running(node, mod, dirs):
    for case, name in _outside_names(dirs).items():
        message = node.VALIDATE_INPUTS(video=name)
        assert isinstance(message, str), f"{case}: {name!r} passed validation"
        assert "video:" in message and "outside ComfyUI's input folder" in message, case
        with pytest.raises(ValueError, match="outside ComfyUI's input folder") as err:
            _run(node, name)
        assert name in str(err.value), case
        assert math.isnan(node.IS_CHANGED(video=name, **OPTS)), f"{case}: IS_CHANGED read a file outside"


def test_the_input_folder_itself_and_an_empty_name_are_refused(node, dirs):
    for name in (".", "", "sub/.."):
        assert isinstance(node.VALIDATE_INPUTS(video=name), str), repr(name)
        with pytest.raises(ValueError, match="video:"):
            _run(node, name)


def test_a_symlink_that_stays_inside_the_input_folder_is_allowed(node, dirs):
    _write_clip(dirs["input"] / "clip.mp4", n=2)
    os.symlink(dirs["input"] / "clip.mp4", dirs["input"] / "alias.mp4")
    assert node.VALIDATE_INPUTS(video="alias.mp4") is True
    assert _run(node, "alias.mp4")[1] == 2


# --------------------------------------------------------------------------- bad files


def test_a_missing_file_is_reported_by_validation_and_by_the_node(node, dirs):
    message = node.VALIDATE_INPUTS(video="gone.mp4")
    assert isinstance(message, str) and "video:" in message and "not found" in message
    with pytest.raises(ValueError, match="'gone.mp4' was not found"):
        _run(node, "gone.mp4")
    assert math.isnan(node.IS_CHANGED(video="gone.mp4", **OPTS))


def test_a_corrupt_file_gives_a_clear_error_naming_the_input(node, mod, dirs):
    (dirs["input"] / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    assert node.VALIDATE_INPUTS(video="noise.mp4") is True  # it exists; decoding is the node's job
    with pytest.raises(mod.VideoError) as err:
        _run(node, "noise.mp4")
    text = str(err.value)
    assert text.startswith("video: Cannot load video") and "noise.mp4" in text
    assert "corrupt" in text and "ffmpeg" in text


def test_an_empty_file_gives_a_clear_error(node, mod, dirs):
    (dirs["input"] / "empty.mp4").write_bytes(b"")
    with pytest.raises(mod.VideoError, match=r"^video: .*empty\.mp4.*empty \(0 bytes\)"):
        _run(node, "empty.mp4")


def test_options_that_leave_no_frame_are_reported(node, mod, dirs):
    _write_clip(dirs["input"] / "clip.mp4", n=4)
    with pytest.raises(mod.VideoError, match="leave none of them"):
        _run(node, "clip.mp4", skip_first_frames=10)


# --------------------------------------------------------------------------- memory


def test_a_clip_that_would_not_fit_in_memory_is_refused_before_decoding(node, mod, clips, dirs, monkeypatch):
    _write_clip(dirs["input"] / "clip.mp4", n=10)

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded although the memory check should have refused")

    monkeypatch.setattr(clips, "free_memory", lambda device=None: 200_000)
    monkeypatch.setattr(mod, "load_video", must_not_decode)
    with pytest.raises(ValueError) as err:
        _run(node, "clip.mp4", size=64)
    text = str(err.value)
    # 10 frames at 88x64 float32 = 675,840 bytes, 1.25x while decoding = 844,800
    assert text.startswith("video: 10 frames at 88x64 need about 0.8 MB")
    assert "0.2 MB is free" in text and "at most 50% of it (0.1 MB)" in text
    for fix in ("size", "frame_load_cap", "select_every_nth"):
        assert fix in text


def test_the_memory_check_lets_a_clip_through_that_fits(node, clips, dirs, monkeypatch):
    _write_clip(dirs["input"] / "clip.mp4", n=10)
    # 10 x 48 x 64 x 3 x 4 = 368,640 bytes; x1.25 = 460,800; half of 1 MB is 500,000
    monkeypatch.setattr(clips, "free_memory", lambda device=None: 1_000_000)
    assert _run(node, "clip.mp4")[1] == 10
    monkeypatch.setattr(clips, "free_memory", lambda device=None: 900_000)
    with pytest.raises(ValueError, match="need about"):
        _run(node, "clip.mp4")


def test_free_memory_is_the_hosts_figure(pack):
    import comfy.model_management as mm
    import torch

    memory = harness.pack_submodule(pack, "nodes.host.memory")
    free = memory.free_memory("cpu")
    assert free is not None and 10**7 < free < 10**14
    assert abs(free - mm.get_free_memory(torch.device("cpu"))) < 2**28  # the same count, a moment apart


# --------------------------------------------------------------------------- through the executor


def _prompt(video, **options):
    return {"1": {"class_type": "STEMLoadVideoFrames", "inputs": {"video": video, **{**OPTS, **options}}}}


def test_the_executor_runs_the_node_on_a_generated_clip(run_prompt, get_node_output, clip_8x64):
    result = run_prompt(_prompt(clip_8x64, skip_first_frames=2, select_every_nth=2), fresh=True)
    frames, count, fps, width, height = get_node_output(result, "1")
    assert tuple(frames.shape) == (3, 64, 64, 3) and (count, width, height) == (3, 64, 64)
    assert fps == pytest.approx(8.0 / 2)
    assert frames.std() > 0.05  # the moving disc and square, not a blank frame


def test_the_executor_reruns_the_node_only_when_the_file_changes(run_prompt, make_clip):
    name = make_clip(f"stem_rerun_{os.getpid()}.mp4", frames=4)
    first = run_prompt(_prompt(name, size=64))
    assert "1" in first.executed_nodes
    again = run_prompt(_prompt(name, size=64))
    assert "1" not in again.executed_nodes and "1" in again.cached_nodes
    make_clip(name, frames=5)  # new content under the same name
    changed = run_prompt(_prompt(name, size=64))
    assert "1" in changed.executed_nodes and changed.get_node_output("1")[1] == 5


@pytest.mark.parametrize("video", ["../../../../etc/passwd", "/etc/passwd", "../outside.mp4"])
def test_the_executor_refuses_a_path_outside_the_input_folder_at_validation(run_prompt, video):
    error = run_prompt(_prompt(video), expect_error=True)
    assert error.kind == "validation"
    assert "outside ComfyUI's input folder" in str(error) and video in str(error)


def test_the_executor_reports_a_missing_file_at_validation(run_prompt):
    error = run_prompt(_prompt("no_such_clip.mp4"), expect_error=True)
    assert error.kind == "validation" and "'no_such_clip.mp4' was not found" in str(error)
