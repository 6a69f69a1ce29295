"""The browser tier: the bundled UI workflows (workflows/*.json) run the way a user runs them.

A real ComfyUI server (main.py of $COMFYUI_PATH, this interpreter, 127.0.0.1, a free port,
--base-directory a temporary folder with this repo linked into its custom_nodes) and its frontend
in Debian's chromium through Playwright. For each workflow: drop the file onto the canvas, pick
the random checkpoint and a generated clip and make everything small through the widgets. The
main job's workflows (RUN_IN_BROWSER) then press Run and wait for the server's /history; the
others (which the server tier queues from their API twins) are converted by the frontend itself
(``graphToPrompt``), and the result must be their API twin with the values set in the UI. Checked:
no missing-node or other dialog, no error or warning toast, the prompt succeeded with the values
set in the UI, and its files are in the output folder.
A screenshot per workflow goes to the test's tmp dir; the edit workflow's also to
docs/stem_tokenflow_edit.png when that file is missing or STEM_DOCS_SCREENSHOT=1, and each becomes
the workflow's template thumbnail, workflows/<name>.jpg (what ComfyUI's template browser shows),
when that file is missing or STEM_TEMPLATE_THUMBNAILS=1 (so that a test run does not rewrite
committed files).

Needs /usr/bin/chromium and the python package playwright (tests/run.sh puts it into .test-deps
when chromium is there); without them this module is one skipped test with the reason. Never a
downloaded browser.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import browser_harness as B  # noqa: E402
import comfy_harness as H  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted(p for p in (REPO_ROOT / "workflows").glob("*.json"))  # UI format; workflows/api/ is not
# run from the browser; the other workflows are loaded, edited and converted there, and queued by the server tier
RUN_IN_BROWSER = {"stem_tokenflow_edit.json", "stem_fatezero_edit.json"}
DOCS_SCREENSHOT = {"stem_tokenflow_edit.json": REPO_ROOT / "docs" / "stem_tokenflow_edit.png"}
PROMPT_TIMEOUT = float(os.environ.get("STEM_BROWSER_PROMPT_TIMEOUT", "900"))
CLIP = "stem_browser_clip.mp4"
CLIP_FRAMES = 12  # more than frame_load_cap below, so that the cap set in the UI shows in the result

# frontend-only node types: no server-side class
VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

SKIP = B.skip_reason()
if SKIP:
    PARAMS = [pytest.param(None, id="browser", marks=pytest.mark.skip(reason=f"browser tier skipped: {SKIP}"))]
else:
    PARAMS = [pytest.param(p, id=p.stem) for p in WORKFLOWS] or [pytest.param(None, id="no-workflows")]


def small_settings(ckpt: str, clip: str) -> list[tuple[str, str, object, bool]]:
    """(node type, widget, value, required): what a user on a slow CPU would change. required:
    every node of that type must have the widget (the workflow cannot run without it). One step:
    the server tier runs the same workflows with 2 (PnP and fusion windows open), this tier checks
    what the page does."""
    return [
        ("CheckpointLoaderSimple", "ckpt_name", ckpt, True),
        ("STEMLoadVideoFrames", "video", clip, True),
        ("STEMLoadVideoFrames", "frame_load_cap", 2, True),
        ("STEMLoadVideoFrames", "size", 64, True),
        ("STEMInvert", "steps", 1, True),
        ("STEMTokenFlowEdit", "batch_size", 2, True),
        ("KSampler", "steps", 1, True),
        ("EmptyLatentImage", "width", 64, True),
        ("EmptyLatentImage", "height", 64, True),
        ("EmptyLatentImage", "batch_size", 8, True),
    ]


# ----------------------------------------------------------------------------------------------

_TIMES: dict[str, str] = {}


class _Summary:
    """Adds one line to pytest's summary: how long each workflow's prompt ran."""

    def pytest_terminal_summary(self, terminalreporter):
        if _TIMES:
            terminalreporter.write_line("browser tier, prompt run times: " +
                                        ", ".join(f"{k} {v}" for k, v in _TIMES.items()))


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    pm = request.config.pluginmanager
    if not pm.has_plugin("stem-browser-summary"):
        pm.register(_Summary(), "stem-browser-summary")


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser_comfy")
    dirs = B.prepare_base(base, REPO_ROOT)
    ckpt, _ = H.provide_sd15_checkpoint(dirs["checkpoints"])
    H.write_video_clip(dirs["input"] / CLIP, CLIP_FRAMES, 64, 64, 8.0)
    server = B.ComfyServer(H.comfyui_path(), base, drop_from_pythonpath=(REPO_ROOT / ".test-deps",))
    server.ckpt, server.clip, server.dirs = ckpt, CLIP, dirs
    try:
        server.start()
        server.object_info = server.get("/object_info", timeout=60)
        yield server
    finally:
        server.stop()
        p = dirs["checkpoints"] / ckpt
        if p.exists() and not p.is_symlink():  # built without a cache: not 2 GB left in basetemp
            p.unlink()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=B.CHROMIUM, args=B.CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


def save_docs_png(src: Path, dest: Path):
    """The screenshot with a 256-colour palette (a UI picture loses nothing visible; the file
    shrinks several times), or as it is without PIL."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image
    except ImportError:
        shutil.copyfile(src, dest)
        return
    with Image.open(src) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            dest, optimize=True)


THUMBNAIL_WIDTH = 640


def save_thumbnail(src: Path, dest: Path):
    """The screenshot as a template thumbnail: a JPEG THUMBNAIL_WIDTH pixels wide."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        height = round(im.height * THUMBNAIL_WIDTH / im.width)
        im.resize((THUMBNAIL_WIDTH, height), Image.Resampling.LANCZOS).save(dest, "JPEG", quality=82, optimize=True)


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _bad_seen(entries: list[dict]) -> list[dict]:
    """Dialogs (but the template browser of a first visit) and toasts that are not info/success."""
    return [e for e in entries if (e["kind"] == "dialog" and not e["text"].startswith("Get Started with a Template"))
            or (e["kind"] == "toast" and e["severity"] not in ("info", "success", "secondary"))]


@pytest.mark.parametrize("workflow", PARAMS)
def test_workflow_runs_in_the_browser(workflow, comfy_server, browser, tmp_path):
    if workflow is None:
        pytest.fail("no UI workflows in workflows/*.json")
    server = comfy_server
    shot = tmp_path / f"{workflow.stem}.png"
    docs = DOCS_SCREENSHOT.get(workflow.name)
    # the docs picture at twice the pixels, so that the node text of the whole graph stays legible
    context = browser.new_context(viewport=B.VIEWPORT, device_scale_factor=2 if docs else 1)
    server.free()  # each workflow runs whole, not from the previous one's cached nodes
    ui = B.ComfyPage(context.new_page(), server)
    try:
        ui.open()
        n_seen = len(ui.seen())
        # frontend 1.27.10 itself throws one "Cannot read properties of undefined (reading 'id')"
        # while it loads its settings, before any workflow: only errors after this point count
        n_errors = len(ui.page_errors)
        ui.drop_workflow(workflow)

        # the graph loaded, every node type is known, and nothing complained
        nodes = ui.nodes()
        types = {n["type"] for n in nodes}
        disk = json.loads(workflow.read_text())
        assert len(nodes) == len(disk["nodes"]), (
            f"the canvas shows {len(nodes)} nodes, the file has {len(disk['nodes'])}")
        missing = sorted(t for t in types - VIRTUAL_TYPES if t not in server.object_info)
        assert not missing, f"node types the server does not know: {missing}"
        after_drop = ui.seen()[n_seen:]
        assert not _bad_seen(after_drop), f"loading the workflow showed: {after_drop}"
        assert not ui.visible_dialogs(), f"dialogs open after loading: {ui.visible_dialogs()}"

        # the user's edits, through the widgets
        wanted: dict[tuple[str, str], object] = {}
        for node_type, widget, value, required in small_settings(server.ckpt, server.clip):
            if node_type not in types:
                continue
            changed = ui.set_widget(node_type, widget, value)
            n_of_type = sum(n["type"] == node_type for n in nodes)
            if required:
                assert len(changed) == n_of_type, f"{node_type}: widget {widget!r} missing on some nodes: {changed}"
            assert all(c["now"] == value for c in changed), f"{node_type}.{widget}: {changed}"
            wanted[(node_type, widget)] = value

        if workflow.name not in RUN_IN_BROWSER:
            converted = ui.prompt()
            twin = json.loads((workflow.parent / "api" / workflow.name).read_text())
            assert {k: v["class_type"] for k, v in converted.items()} == {k: v["class_type"] for k, v in twin.items()}
            for key, node in twin.items():  # the same links and the same values but those set above
                for name, value in node["inputs"].items():
                    if (node["class_type"], name) in wanted:
                        value = wanted[(node["class_type"], name)]
                    assert converted[key]["inputs"].get(name) == value, (key, node["class_type"], name)
            assert not ui.page_errors[n_errors:], f"JavaScript errors in the page: {ui.page_errors[n_errors:]}"
            return

        before = _files(server.dirs["output"])
        t0 = time.monotonic()
        prompt_id = ui.run()
        hist = server.wait_history(prompt_id, PROMPT_TIMEOUT)
        seconds = time.monotonic() - t0
        _TIMES[workflow.stem] = f"{seconds:.0f}s"

        status = hist.get("status", {})
        errors = [m for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
        assert status.get("status_str") == "success" and status.get("completed"), (
            f"{workflow.name} failed after {seconds:.0f}s: {json.dumps(errors, indent=1)[:6000]}")

        # the server ran what the widgets said (the prompt is history's [number, id, prompt, ...])
        prompt = hist["prompt"][2]
        for (node_type, widget), value in wanted.items():
            got = [n["inputs"].get(widget) for n in prompt.values() if n["class_type"] == node_type]
            assert got and all(v == value for v in got), f"{node_type}.{widget}: the server got {got}, not {value!r}"

        # its files are in the output folder
        new = sorted(_files(server.dirs["output"]) - before)
        assert new, f"{workflow.name} wrote nothing to the output folder; outputs: {hist.get('outputs')}"
        listed = [server.base / it.get("type", "output") / it.get("subfolder", "") / it["filename"]
                  for out in hist.get("outputs", {}).values() for items in out.values() if isinstance(items, list)
                  for it in items if isinstance(it, dict) and "filename" in it]
        assert listed and all(p.is_file() and p.stat().st_size > 0 for p in listed), (
            f"files listed in /history: {[(str(p), p.exists()) for p in listed]}")

        ui.page.wait_for_timeout(1500)  # the output nodes show their result
        after_run = ui.seen()[n_seen:]
        assert not _bad_seen(after_run), f"the page showed: {_bad_seen(after_run)}"
        assert not ui.visible_dialogs(), f"dialogs open after the run: {ui.visible_dialogs()}"
        assert not ui.page_errors[n_errors:], f"JavaScript errors in the page: {ui.page_errors[n_errors:]}"
        ui.tidy_for_screenshot()
        ui.frame_graph()
        ui.page.screenshot(path=str(shot))
        if docs is not None and (not docs.exists() or os.environ.get("STEM_DOCS_SCREENSHOT", "") not in ("", "0")):
            save_docs_png(shot, docs)
        thumb = workflow.with_suffix(".jpg")
        if not thumb.exists() or os.environ.get("STEM_TEMPLATE_THUMBNAILS", "") not in ("", "0"):
            save_thumbnail(shot, thumb)
    except BaseException:
        if not shot.exists():
            try:
                ui.page.screenshot(path=str(shot))
            except Exception:
                pass
        print(f"\nscreenshot: {shot}\npage errors: {ui.page_errors[:5]}\nserver log:\n{server.log_tail(40)}")
        raise
    finally:
        context.close()


# without chromium or playwright the module is the one skipped test above
if not SKIP:
    def test_the_page_reports_problems(comfy_server, browser, tmp_path):
        """The checks above can fail: an unknown node type brings the missing-nodes dialog, and a
        workflow queued as shipped (no checkpoint or clip picked) the validation error dialog."""
        workflow = REPO_ROOT / "workflows" / "stem_tokenflow_edit.json"
        if not workflow.is_file():
            pytest.fail(f"{workflow} is missing")
        broken = json.loads(workflow.read_text())
        victim = next(n for n in broken["nodes"] if n["type"] not in VIRTUAL_TYPES)
        victim["type"] = "STEMNoSuchNodeType"
        broken_path = tmp_path / "broken.json"
        broken_path.write_text(json.dumps(broken))
        context = browser.new_context(viewport=B.VIEWPORT)
        ui = B.ComfyPage(context.new_page(), comfy_server)
        try:
            ui.open()
            n = len(ui.seen())
            ui.drop_workflow(broken_path)
            seen = _bad_seen(ui.seen()[n:])
            assert any("STEMNoSuchNodeType" in e["text"] for e in seen), f"no missing-node dialog: {ui.seen()[n:]}"
            assert ui.visible_dialogs()
            ui.page.keyboard.press("Escape")
            ui.page.wait_for_timeout(500)

            n = len(ui.seen())
            ui.drop_workflow(workflow)
            with pytest.raises(AssertionError, match="refused the prompt"):
                ui.run()
            ui.page.wait_for_timeout(1500)
            seen = _bad_seen(ui.seen()[n:])
            assert any("ckpt_name" in e["text"] for e in seen), f"no validation error shown: {ui.seen()[n:]}"
        finally:
            context.close()
