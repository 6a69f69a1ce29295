"""The bundled workflows (workflows/api/*.json) queued on a real ComfyUI server over HTTP.

The session's server (comfy_server.py, the ``server`` fixture of conftest.py). Each workflow is
sent as it is committed, with only the file names and a few sizes made small (by node class and
input name), and must run to completion and write its videos.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

import comfy_harness as H
from comfy_server import CLIP, FRAMES, SIZE, TIMES, http as _http, log_tail as _log_tail

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO / "workflows"
RUN_TIMEOUT = 600

# What the tests change: (class_type, input) -> value; "<ckpt>" / "<clip>" are filled in.
SMALL = {
    ("CheckpointLoaderSimple", "ckpt_name"): "<ckpt>",
    ("STEMLoadVideoFrames", "video"): "<clip>",
    ("STEMLoadVideoFrames", "size"): SIZE,
    ("STEMLoadVideoFrames", "frame_load_cap"): FRAMES,
    ("STEMAttentionPatch", "num_bases"): 32,
    ("STEMInvert", "steps"): 2,
    ("STEMTokenFlowEdit", "batch_size"): 2,
    ("KSampler", "steps"): 2,
}


def _generator():
    spec = importlib.util.spec_from_file_location("stem_make_workflows", WORKFLOW_DIR / "make_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


GEN = _generator()
NAMES = sorted(GEN.WORKFLOWS)


def small_prompt(api: dict, ckpt: str) -> dict:
    fill = {"<ckpt>": ckpt, "<clip>": CLIP}
    prompt = json.loads(json.dumps(api))
    seen = set()
    for node in prompt.values():
        for (cls, name), value in SMALL.items():
            if node["class_type"] == cls and name in node["inputs"]:
                node["inputs"][name] = fill.get(value, value) if isinstance(value, str) else value
                seen.add((cls, name))
    classes = {n["class_type"] for n in prompt.values()}
    missed = [key for key in SMALL if key[0] in classes and key not in seen]
    assert not missed, f"inputs to make small are missing from the workflow: {missed}"
    return prompt


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on port (Linux /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, _, state = line.split()[1:4]
                addr, p = local.rsplit(":", 1)
                if state == "0A" and int(p, 16) == port:
                    found.add(addr)
    return found


def test_server_binds_localhost_only(server):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    port = int(server.url.rsplit(":", 1)[1])
    assert _listening_addresses(port) == {"0100007F"}, "the server should listen on 127.0.0.1 only"


def test_node_definitions_match_the_generator(server):
    """Every node type the workflows use exists on the server with the widgets (in order),
    sockets and outputs that make_workflows.py writes."""
    info = _http(server.url + "/object_info")
    for type_, t in GEN.NODE_TYPES.items():
        if t.virtual:
            continue
        assert type_ in info, f"{type_} is not a node type of this server"
        d = info[type_]
        order = d.get("input_order", {})
        specs = {**d["input"].get("required", {}), **d["input"].get("optional", {})}
        optional = set(d["input"].get("optional", {}))
        widgets, sockets = [], []
        for name in order.get("required", []) + order.get("optional", []):
            spec = specs[name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            is_widget = (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) \
                and not opts.get("forceInput")
            if is_widget:
                widgets.append(name)
            else:
                sockets.append((name, kind, name in optional))
        assert tuple(widgets) == t.widgets, f"{type_}: widgets {widgets}"
        assert tuple(sockets) == t.sockets, f"{type_}: sockets {sockets}"
        names = d.get("output_name") or d["output"]
        assert tuple(zip(names, d["output"])) == t.outputs, f"{type_}: outputs {list(zip(names, d['output']))}"
        for w in t.control_after:
            assert specs[w][0] == "INT" and (w in ("seed", "noise_seed") or specs[w][1].get("control_after_generate"))
        uploads = [n for n, s in specs.items() if isinstance(s[1] if len(s) > 1 else None, dict)
                   and (s[1].get("video_upload") or s[1].get("image_upload"))]
        assert bool(uploads) == t.upload, f"{type_}: upload inputs {uploads}"


def test_template_browser_lists_the_workflows(server):
    """ComfyUI's template browser lists the UI workflows (not the api/ twins) and serves them."""
    templates = _http(server.url + "/workflow_templates")
    assert sorted(templates.get("ComfyUI-STEM", [])) == NAMES
    for name in NAMES:
        served = _http(f"{server.url}/api/workflow_templates/ComfyUI-STEM/{name}.json")
        assert served == json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs(server, name):
    api = json.loads((WORKFLOW_DIR / "api" / f"{name}.json").read_text())
    prompt = small_prompt(api, server.ckpt)
    t0 = time.perf_counter()
    try:
        queued = _http(server.url + "/prompt", {"prompt": prompt, "client_id": "stem-tests-" + uuid.uuid4().hex})
    except urllib.error.HTTPError as e:
        pytest.fail(f"{name}: POST /prompt refused ({e.code}): {e.read().decode(errors='replace')}")
    pid = queued["prompt_id"]
    assert not queued.get("node_errors"), queued["node_errors"]
    while True:
        hist = _http(f"{server.url}/history/{pid}").get(pid)
        if hist and hist.get("status", {}).get("completed") is not None and \
                (hist["status"]["completed"] or hist["status"].get("status_str") == "error"):
            break
        if server.proc.poll() is not None:
            pytest.fail(f"the server died running {name}:\n{_log_tail(server.log)}")
        if time.perf_counter() - t0 > RUN_TIMEOUT:
            pytest.fail(f"{name} did not finish within {RUN_TIMEOUT}s:\n{_log_tail(server.log)}")
        time.sleep(0.5)
    seconds = time.perf_counter() - t0
    TIMES[name] = seconds
    status = hist["status"]
    errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status.get("status_str") == "success" and status["completed"], \
        f"{name} failed: {json.dumps(errors, indent=1)[:4000]}\n{_log_tail(server.log)}"

    savers = [nid for nid, n in prompt.items() if n["class_type"] == "SaveVideo"]
    assert savers
    import cv2
    for nid in savers:
        items = hist["outputs"].get(nid, {}).get("images", [])
        assert len(items) == 1, f"{name}: SaveVideo {nid} reported {items}"
        item = items[0]
        path = server.output / item.get("subfolder", "") / item["filename"]
        prefix = prompt[nid]["inputs"]["filename_prefix"]
        assert path.is_file() and path.stat().st_size > 0, f"{name}: {path} was not written"
        assert str(path.relative_to(server.output)).startswith(prefix)
        cap = cv2.VideoCapture(str(path))
        try:
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            h = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        finally:
            cap.release()
        assert n == FRAMES and h == SIZE, f"{name}: {path.name} has {n} frames of height {h}"
    for nid in (nid for nid, n in prompt.items() if n["class_type"] == "STEMVideoMetrics"):
        # the three-way comparison's plot is previewed, and its CSV written
        previews = [i for pid_, n in prompt.items() if n["class_type"] == "PreviewImage"
                    and n["inputs"]["images"][0] == nid for i in hist["outputs"].get(pid_, {}).get("images", [])]
        assert len(previews) == 1, f"{name}: metrics plot preview {previews}"
        item = previews[0]
        found = list(server.base.rglob(item["filename"]))  # ComfyUI puts its temp folder inside --temp-directory
        assert len(found) == 1, f"{name}: plot {item} found at {found}"
        plot = cv2.imread(str(found[0]))
        assert plot is not None and plot.shape == (512, 768, 3) and (plot < 245).mean() > 0.02
        prefix = Path(prompt[nid]["inputs"]["filename_prefix"])
        csvs = sorted((server.output / prefix.parent).glob(f"{prefix.name}_*.csv"))
        methods = sum(1 for k in prompt[nid]["inputs"] if k.startswith("video_"))
        assert csvs and csvs[-1].read_text().count("\n") == 1 + methods  # a header and a row per method
    executed = [line.strip() for line in server.log.read_text(errors="replace").splitlines()
                if "Prompt executed in" in line]
    print(f"\n{name}: {seconds:.1f}s on CPU from POST to history; server: {executed[-1] if executed else '?'}")


def test_report_times(server):
    """Not a check: prints the server start and per-workflow times (run with -rP to see them)."""
    print("\n" + ", ".join(f"{k} {v:.1f}s" for k, v in TIMES.items()))


def _queue(server, prompt: dict) -> str:
    queued = _http(server.url + "/prompt", {"prompt": prompt, "client_id": "stem-tests-" + uuid.uuid4().hex})
    assert not queued.get("node_errors"), queued["node_errors"]
    return queued["prompt_id"]


def _finished(server, pid: str) -> dict | None:
    """The prompt's history status once it ran to its end, by success, error or Cancel."""
    hist = _http(f"{server.url}/history/{pid}").get(pid)
    status = (hist or {}).get("status") or {}
    if status.get("completed") or status.get("status_str") == "error":
        return status
    if server.proc.poll() is not None:
        pytest.fail(f"the server died:\n{_log_tail(server.log)}")
    return None


def _wait(server, pid: str, timeout: float = RUN_TIMEOUT) -> dict:
    t0 = time.perf_counter()
    while (status := _finished(server, pid)) is None:
        if time.perf_counter() - t0 > timeout:
            pytest.fail(f"prompt {pid} did not finish within {timeout}s:\n{_log_tail(server.log)}")
        time.sleep(0.2)
    return status


def _resident(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


CANCEL_CLIP, CANCEL_FRAMES, CANCEL_SIZE = "stem_cancel_clip.mp4", 32, 128


def inversion_prompt(ckpt: str, steps: int, prefix: str) -> dict:
    """Load a clip, invert it with STEM in passes of 8 frames, save the inversion."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "STEMLoadVideoFrames", "inputs": {
            "video": CANCEL_CLIP, "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1,
            "size": CANCEL_SIZE, "crop": False}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red disc and a yellow square"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "5": {"class_type": "STEMAttentionPatch", "inputs": {
            "model": ["1", 0], "attention": "stem", "num_bases": 32, "em_iters": 5, "tau": 0.01, "seed": 1,
            "grouping": "whole clip", "frames_per_group": 8, "frames_per_pass": 8}},
        "6": {"class_type": "STEMInvert", "inputs": {"model": ["5", 0], "latent": ["4", 0], "conditioning": ["3", 0],
                                                    "steps": steps}},
        "7": {"class_type": "STEMSaveInversion", "inputs": {"inversion": ["6", 0], "filename_prefix": prefix}},
    }


def _cancelled_inversion(server, prefix: str) -> tuple[int, int, float]:
    """Queue a 40-step STEM inversion, press Cancel once the run holds memory, and wait until the
    prompt has ended: (resident memory at its peak, after it, seconds from Cancel to its end)."""
    pid = server.proc.pid
    before = _resident(pid)
    long_run = _queue(server, inversion_prompt(server.ckpt, 40, prefix))
    t0, peak = time.perf_counter(), before
    while peak < before + 96 * 2**20:  # the inversion is under way: its passes hold their frames
        assert _finished(server, long_run) is None, "the 40-step inversion ended before it was cancelled"
        assert time.perf_counter() - t0 < 120, f"the inversion never grew the server's memory: {_log_tail(server.log)}"
        peak = max(peak, _resident(pid))
        time.sleep(0.05)
    time.sleep(1.0)
    peak = max(peak, _resident(pid))
    pressed = time.perf_counter()
    _http(server.url + "/interrupt", {})
    status = _wait(server, long_run, timeout=60)
    stopped = time.perf_counter() - pressed
    events = [m[0] for m in status.get("messages", [])]
    assert status["status_str"] == "error" and "execution_interrupted" in events, status
    return peak, _resident(pid), stopped


def test_cancel_returns_the_servers_memory_and_the_next_prompt_runs(server):
    """Cancel during a STEM inversion in passes ends the prompt within seconds; the
    server's resident memory is then back at its level before the run (within a quarter of what
    the run held, and at least 32 MiB: Python's and ComfyUI's own bookkeeping; the pack hands the
    allocator's freed pages back when a run ends, however it ends), and the next prompt runs.
    A first cancelled run pays what the server keeps once (its first Cancel; seen: 43 MiB on a
    server that had run other prompts); the second must give back all it took."""
    pid = server.proc.pid
    if not Path(f"/proc/{pid}/status").exists():
        pytest.fail("this check reads the server's resident memory from /proc (Linux)")
    H.write_video_clip(server.base / "input" / CANCEL_CLIP, CANCEL_FRAMES, CANCEL_SIZE, CANCEL_SIZE, 8.0)
    # the same graph with one step first: the model, the clip and its latent are loaded and cached
    assert _wait(server, _queue(server, inversion_prompt(server.ckpt, 1, "stem/cancel_warm")))["status_str"] == "success"
    _cancelled_inversion(server, "stem/cancel_first")
    time.sleep(2.0)
    before = _resident(pid)
    peak, after, stopped = _cancelled_inversion(server, "stem/cancel_long")
    # ComfyUI's worker collects garbage up to 10 s after a prompt: give it that long
    allowed = max(32 * 2**20, 0.25 * (peak - before))
    settle = time.perf_counter()
    while (after := _resident(pid)) - before > allowed and time.perf_counter() - settle < 15:
        time.sleep(0.5)
    grown = after - before
    print(f"\ncancel: stopped in {stopped:.2f}s; resident memory before {before / 2**20:.0f} MiB, during "
          f"{peak / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB")
    assert grown <= allowed, \
        f"the server kept {grown / 2**20:.0f} MiB after Cancel (it held {(peak - before) / 2**20:.0f} MiB more during the run)"
    # a step of this run takes seconds on an idle 2-core CPU; it stops at the next self-attention
    # (test_passes.py), so this bound leaves room for a busy machine, not for a step
    assert stopped < 30, f"Cancel took {stopped:.1f}s to end the prompt"

    # the next prompt: the warm-up's graph again; its inversion runs anew (ComfyUI's cache holds the
    # nodes of the last prompt, whose inversion was the cancelled one), the clip's latent is cached
    # ("4": so the cached list below is read from where ComfyUI reports it)
    done = _wait(server, _queue(server, inversion_prompt(server.ckpt, 1, "stem/cancel_next")))
    assert done["status_str"] == "success", done
    cached = [n for m in done.get("messages", []) if m[0] == "execution_cached" for n in m[1].get("nodes", [])]
    assert "6" not in cached and "4" in cached, f"the inversion did not run again: cached {cached}"
    assert list((server.output / "stem").glob("cancel_next_*.safetensors"))
