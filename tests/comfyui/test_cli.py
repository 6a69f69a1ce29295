"""The command-line runner (workflows/run.py) run as a user would: a subprocess in ComfyUI's
interpreter, on a generated clip and the random SD1.5 checkpoint, with ComfyUI's executor in its
own process (here) or queued on the test server (test_workflows_server.py's ``server``)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import comfy_harness as H

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "workflows" / "run.py"
FRAMES, SIZE, STEPS = 2, 64, 1  # a step of the edit: a keyframe pass and one of 2 frames
SMALL = ["--frames", str(FRAMES), "--size", str(SIZE), "--steps", str(STEPS),
         "--set", "STEMAttentionPatch.num_bases=32", "--set", "STEMTokenFlowEdit.batch_size=2"]
CANCEL_WITHIN = 10.0  # seconds from SIGINT to the process's exit (measured: see test)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, comfy_env, sd15_checkpoint):
    """A clip outside ComfyUI's folders, as a user's would be, and ComfyUI's own option that adds
    the test checkpoint's folder (extra_model_paths)."""
    base = tmp_path_factory.mktemp("cli")
    clip = base / "clips" / "court.mp4"
    clip.parent.mkdir()
    H.write_video_clip(clip, FRAMES, SIZE, SIZE, 8.0)
    paths = base / "extra_model_paths.yaml"
    paths.write_text(f"stem_tests:\n  base_path: {comfy_env.checkpoints_dir}\n  checkpoints: .\n")
    return {"base": base, "clip": clip, "ckpt": sd15_checkpoint,
            "local": ["--comfyui", str(comfy_env.comfyui_path), "--comfyui-args",
                      f"--extra-model-paths-config {paths}"]}


class Run:
    """workflows/run.py in a subprocess; stderr is read line by line as it comes (with times)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(RUN), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env=os.environ)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.perf_counter(), line.rstrip("\n")))

    @property
    def err(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, after: str | None = None, timeout: float = 600) -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            text = self.err
            if after is not None:
                text = text[text.find(after):] if after in text else ""
            if re.search(pattern, text):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"no {pattern!r} in the output; it printed:\n{self.err[-4000:]}")

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        out = self.proc.stdout.read() if self.proc.stdout else ""
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc, out, self.err


def results(out: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        label, _, path = line.partition(": ")
        found.setdefault(label, []).append(path)
    return found


def frame_count(path: str) -> int:
    import cv2
    cap = cv2.VideoCapture(path)
    try:
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()


def test_batch_in_process_reuses_the_inversion_and_ctrl_c_cancels_without_output(cli_env):
    """One process, three edits of one clip (JSON lines): the checkpoint loads once, the clip is
    inverted once; Ctrl-C during a step of the third edit ends the run within seconds, with a
    clear message, exit 130, and nothing of the third edit written (no staging folder left)."""
    base = cli_env["base"]
    out = base / "batch-out"
    batch = base / "edits.jsonl"
    rows = [("a robot is playing tennis", "robot"), ("a knight is playing tennis", "knight"),
            ("a cat is playing tennis", "cat")]
    batch.write_text("".join(f'{{"clip": "clips/court.mp4", "source": "a man is playing tennis", '
                             f'"target": "{t}", "name": "court_{n}"}}\n' for t, n in rows))
    run = Run("batch", str(batch), "--checkpoint", cli_env["ckpt"], *SMALL, "--save-inversion", "--out", str(out),
              *cli_env["local"])
    run.wait_for(r"step 1/1, pass 1/2", after="[3/3]")  # the third edit is in its first step
    pressed = time.perf_counter()
    run.proc.send_signal(signal.SIGINT)
    rc, stdout, err = run.finish()
    ended = time.perf_counter() - pressed
    print(f"Ctrl-C to exit: {ended:.2f} s")
    assert rc == 130, err[-3000:]
    assert ended < CANCEL_WITHIN, f"the run ended {ended:.1f} s after Ctrl-C"
    assert "Ctrl-C: cancelling" in err and "cancelled (Ctrl-C); nothing was written" in err
    # the memory plan before the first step, the progress bar per pass with the step and the pass
    assert err.index("plan: 2 frames in 1 pass") < err.index("step 1/1")
    assert "step 1/1, pass 2/2" in err
    # the checkpoint loaded once; the second and third edits reused the first one's inversion
    assert err.count("> CheckpointLoaderSimple (node 2)") == 1 and err.count("> STEMInvert (node 10)") == 1, err
    assert err.count("inversion: computed") == 1 and err.count("inversion: reused") == 1, err
    assert "2 of 3 done; 1 inversion(s) run for 1 clip(s)" in err
    found = results(stdout)
    assert sorted(Path(p).name for p in found["edit"]) == ["court_knight_tokenflow_edit_00001_.mp4",
                                                           "court_robot_tokenflow_edit_00001_.mp4"]
    assert len(found["source | edit"]) == 2 and [Path(p).name for p in found["inversion"]] == [
        "court_inversion_00001.safetensors"]
    for path in found["edit"] + found["source | edit"]:
        assert Path(path).parent == out and frame_count(path) == FRAMES, path
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert written == sorted(Path(p).name for paths in found.values() for p in paths), written  # nothing else


def test_bad_clip_path_and_missing_checkpoint_exit_2_with_the_reason(cli_env):
    base = cli_env["base"]
    missing = base / "nowhere" / "clip.mp4"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(RUN), "edit", str(missing), "--source", "a", "--target", "b"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and f"error: clip not found: {missing}" in proc.stderr, proc.stderr
    assert time.perf_counter() - t0 < 30  # refused before ComfyUI starts
    out = base / "missing-ckpt-out"
    proc = subprocess.run([sys.executable, str(RUN), "edit", str(cli_env["clip"]), "--source", "a", "--target", "b",
                           "--checkpoint", "no_such_model.safetensors", *SMALL, "--out", str(out), *cli_env["local"]],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"ckpt_name.*no_such_model\.safetensors", proc.stderr), proc.stderr[-3000:]
    assert f"checkpoints ComfyUI can see: {cli_env['ckpt']}" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_edit_on_a_running_server_and_ctrl_c_there(server, cli_env):
    """--server: the clip is uploaded, the progress (bar, step and pass, the memory plan) comes over
    the websocket, the results are downloaded into --out; Ctrl-C interrupts the server's run
    within seconds and downloads nothing; a missing checkpoint is the server's clear refusal."""
    out = cli_env["base"] / "server-out"
    common = ["--source", "a man is playing tennis", "--checkpoint", server.ckpt, *SMALL, "--server", server.url,
              "--out", str(out)]
    run = Run("edit", str(cli_env["clip"]), "--target", "a robot is playing tennis", *common)
    rc, stdout, err = run.finish()
    assert rc == 0, err[-3000:]
    assert "plan: 2 frames in 1 pass" in err and "step 1/1, pass 2/2" in err, err
    found = results(stdout)
    assert [Path(p).name for p in found["edit"]] == ["court_tokenflow_edit_00001_.mp4"]
    assert frame_count(found["edit"][0]) == FRAMES and len(found["source | edit"]) == 1
    before = sorted(out.rglob("*"))
    run = Run("edit", str(cli_env["clip"]), "--target", "a knight is playing tennis", *common)
    run.wait_for(r"step 1/1, pass 1/2", after="STEMTokenFlowEdit")
    pressed = time.perf_counter()
    run.proc.send_signal(signal.SIGINT)
    rc, stdout, err = run.finish()
    ended = time.perf_counter() - pressed
    print(f"Ctrl-C to exit (server): {ended:.2f} s")
    assert rc == 130 and "nothing was downloaded" in err, err[-3000:]
    assert ended < CANCEL_WITHIN and sorted(out.rglob("*")) == before and stdout == ""
    proc = subprocess.run([sys.executable, str(RUN), "edit", str(cli_env["clip"]), "--source", "a", "--target", "b",
                           "--checkpoint", "no_such_model.safetensors", "--server", server.url],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and re.search(r"ckpt_name.*no_such_model", proc.stderr), proc.stderr[-3000:]
