"""One ComfyUI server for the session (``main.py --cpu`` from $COMFYUI_PATH with this interpreter,
bound to 127.0.0.1 on a free port), for the tests that queue prompts over HTTP: the bundled
workflows (test_workflows_server.py) and the command line's --server (test_cli.py).

``--base-directory`` is a temporary folder holding custom_nodes/ComfyUI-STEM (a symlink to this
repo; the user's ComfyUI checkout is not touched and none of its other custom nodes load),
models/checkpoints (the random SD1.5 checkpoint), input/ (a generated 2-frame 64x64 clip) and
output/. conftest.py makes ``server`` a session fixture from :func:`running_server`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest

import comfy_harness as H

REPO = Path(__file__).resolve().parents[2]
CLIP = "stem_workflow_clip.mp4"
FRAMES, SIZE = 2, 64
START_TIMEOUT = 240
TIMES: dict[str, float] = {}  # seconds: the server's start and each workflow's run


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: dict | None = None, timeout: float = 30):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode() or "null")


def log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def running_server(base: Path, comfyui_path: str):
    """Starts the server, yields what tests need of it (url, base, output, ckpt, log, proc), and
    stops it (SIGTERM to its process group, then SIGKILL)."""
    dirs = {k: base / k for k in ("input", "output", "custom_nodes", "user", "temp")}
    for d in dirs.values():
        d.mkdir()
    (dirs["custom_nodes"] / "ComfyUI-STEM").symlink_to(REPO, target_is_directory=True)
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    ckpt, _ = H.provide_sd15_checkpoint(ckpt_dir)
    H.write_video_clip(dirs["input"] / CLIP, FRAMES, SIZE, SIZE, 8.0)
    port = free_port()
    log = base / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--input-directory", str(dirs["input"]),
           "--output-directory", str(dirs["output"]), "--temp-directory", str(dirs["temp"]),
           "--user-directory", str(dirs["user"]), "--disable-auto-launch", "--disable-api-nodes",
           # the default database is ComfyUI/user/comfyui.db inside the checkout: keep it in base
           "--database-url", f"sqlite:///{dirs['user'] / 'comfyui.db'}"]
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=comfyui_path, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} while starting:\n{log_tail(log)}")
            with contextlib.suppress(OSError, ValueError):
                http(url + "/system_stats", timeout=5)
                break
            if time.perf_counter() - t0 > START_TIMEOUT:
                pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT}s:\n{log_tail(log)}")
            time.sleep(0.5)
        TIMES["server start"] = time.perf_counter() - t0
        yield types.SimpleNamespace(url=url, base=base, output=dirs["output"], ckpt=ckpt, log=log, proc=proc)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        link = ckpt_dir / ckpt
        if link.exists() and not link.is_symlink():  # built without a cache: do not leave 2 GB behind
            link.unlink()
