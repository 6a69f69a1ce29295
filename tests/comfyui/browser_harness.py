"""A real ComfyUI server and its frontend in Debian's chromium, for the browser tier (test_browser.py).

* ``skip_reason()``: why the tier cannot run here (no /usr/bin/chromium, or no ``playwright``
  package), else None. The browser is always the system's chromium: never a downloaded one.
* ``ComfyServer``: ``main.py`` of the checkout at $COMFYUI_PATH, started with this interpreter on
  127.0.0.1 and a free port, with ``--base-directory`` a temporary folder (models, custom_nodes
  with this repo linked in, input, output, user, and the sqlite database), so the user's checkout
  is read and never written. Its process group is killed on ``stop()``, and by the kernel if the
  test process dies first.
* ``ComfyPage``: the frontend driven the way a user drives it: a workflow file dropped onto the
  canvas, widget values set through the widgets, the Run button pressed. Every toast and dialog
  the page shows is recorded from the start (a MutationObserver), so short-lived ones are seen too.

Only the standard library is imported at module level; playwright is imported by the caller.
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
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# what works headless here (see the host notes); the resolver rule keeps the page offline on any
# machine: the frontend would otherwise fetch templates and release notes from the internet
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
VIEWPORT = {"width": 1280, "height": 800}


def skip_reason() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return (f"the python package playwright is not importable by {sys.executable} ({e}); "
                "tests/run.sh installs it into .test-deps")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def prepare_base(base: Path, repo_root: Path, folder_name: str = "ComfyUI-STEM") -> dict[str, Path]:
    """The --base-directory layout: custom_nodes/<folder_name> -> repo, models/checkpoints, input,
    output, temp, user. Returns the folders by name."""
    dirs = {k: base / p for k, p in (("custom_nodes", "custom_nodes"), ("checkpoints", "models/checkpoints"),
                                     ("input", "input"), ("output", "output"), ("temp", "temp"),
                                     ("user", "user"))}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    link = dirs["custom_nodes"] / folder_name
    if not link.exists():
        link.symlink_to(repo_root, target_is_directory=True)
    return dirs


class ComfyServer:
    """``python main.py --cpu`` from ``comfy_path`` with everything it writes under ``base``."""

    def __init__(self, comfy_path: str | os.PathLike, base: Path, python: str = sys.executable,
                 port: int | None = None, extra_args: list[str] | None = None,
                 drop_from_pythonpath: tuple[str | os.PathLike, ...] = ()):
        self.comfy_path = str(comfy_path)
        self.base = Path(base)
        self.python = python
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.extra_args = list(extra_args or [])
        self.drop = {os.path.realpath(p) for p in drop_from_pythonpath}
        self.proc: subprocess.Popen | None = None

    @property
    def args(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--disable-auto-launch",
                # the default database is <checkout>/user/comfyui.db, whatever --base-directory says
                "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}", *self.extra_args]

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        env = dict(os.environ)
        # the server runs in ComfyUI's environment as a user has it, not with the test tier's
        # additions (.test-deps would come before its site-packages)
        keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.realpath(p) not in self.drop]
        if keep:
            env["PYTHONPATH"] = os.pathsep.join(keep)
        else:
            env.pop("PYTHONPATH", None)
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=self.comfy_path, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} while starting; "
                                   f"its log ends:\n{self.log_tail()}")
            try:
                if self.get("/system_stats", timeout=2):
                    self.start_seconds = time.monotonic() - t0
                    return self
            except (OSError, ValueError):
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"ComfyUI did not answer on {self.url} within {timeout:.0f}s; "
                                   f"its log ends:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self):
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(15)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def post(self, path: str, data: dict, timeout: float = 10) -> int:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status

    def free(self):
        """What the frontend's "Unload models" + "Free model and node cache" do: the next prompt
        runs every node, the checkpoint loaded again."""
        self.post("/free", {"unload_models": True, "free_memory": True})

    def get(self, path: str, timeout: float = 10):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def wait_history(self, prompt_id: str, timeout: float) -> dict:
        """The /history entry of prompt_id once ComfyUI is done with it (success or error)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited (code {self.proc.returncode}) while running the prompt; "
                                   f"its log ends:\n{self.log_tail()}")
            h = self.get(f"/history/{prompt_id}").get(prompt_id)
            if h and h.get("status", {}).get("completed") is not None and (
                    h["status"].get("completed") or h["status"].get("status_str") == "error"):
                return h
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout:.0f}s; queue: {self.get('/queue')}; "
                           f"the server's log ends:\n{self.log_tail(30)}")


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

# records every toast and dialog that appears, with its severity class and text
_OBSERVER = r"""
(() => {
  window.__stemSeen = [];
  const seen = new WeakSet();
  const record = (el, kind) => {
    if (seen.has(el)) return; seen.add(el);
    const cls = Array.from(el.classList).find(c => /^p-toast-message-(error|warn|info|success|secondary|contrast)$/.test(c)) || '';
    const text = () => (el.innerText || '').trim().replace(/\s+/g, ' ').slice(0, 600);
    const entry = {kind, severity: cls.replace('p-toast-message-', ''), text: text(), t: Date.now()};
    window.__stemSeen.push(entry);
    setTimeout(() => { const t = text(); if (t) entry.text = t; }, 300);  // text renders after insertion
  };
  const scan = (root) => {
    if (!(root instanceof Element)) return;
    const all = [root, ...root.querySelectorAll('.p-toast-message, .p-dialog')];
    for (const el of all) {
      if (el.classList.contains('p-toast-message')) record(el, 'toast');
      else if (el.classList.contains('p-dialog')) record(el, 'dialog');
    }
  };
  new MutationObserver(ms => { for (const m of ms) for (const n of m.addedNodes) scan(n); })
    .observe(document, {childList: true, subtree: true});
})();
"""

_DROP = r"""
([text, name]) => {
  const canvas = document.querySelector('#graph-canvas');
  if (!canvas) throw new Error('no #graph-canvas');
  const r = canvas.getBoundingClientRect();
  const dt = new DataTransfer();
  dt.items.add(new File([text], name, {type: 'application/json'}));
  const at = {clientX: r.x + r.width / 2, clientY: r.y + r.height / 2, bubbles: true, cancelable: true, dataTransfer: dt};
  canvas.dispatchEvent(new DragEvent('dragenter', at));
  canvas.dispatchEvent(new DragEvent('dragover', at));
  canvas.dispatchEvent(new DragEvent('drop', at));
}
"""

_NODES = r"""
() => (window.app.graph.nodes || window.app.graph._nodes).map(n => ({
  id: n.id, type: n.type, title: n.title, mode: n.mode,
  widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
     options: Array.isArray(w.options?.values) ? w.options.values : null})),
}))
"""

# a user's edit of a widget: the widget's value and its callback (what LiteGraph does on a click,
# a drag or a typed value: BaseWidget.setValue), then the canvas redraws
_SET_WIDGET = r"""
([type, name, value]) => {
  const app = window.app, changed = [];
  for (const node of (app.graph.nodes || app.graph._nodes)) {
    if (node.type !== type) continue;
    const w = (node.widgets || []).find(w => w.name === name);
    if (!w) continue;
    if (Array.isArray(w.options?.values) && !w.options.values.includes(value))
      throw new Error(`${type} #${node.id} ${name}: ${JSON.stringify(value)} is not among the choices ${JSON.stringify(w.options.values)}`);
    const old = w.value;
    if (typeof w.setValue === 'function') w.setValue(value, {e: undefined, node, canvas: app.canvas});
    else { w.value = value; w.callback?.(value, app.canvas, node); node.onWidgetChanged?.(name, value, old, w); }
    changed.push({id: node.id, old, now: w.value});
  }
  app.graph.setDirtyCanvas(true, true);
  return changed;
}
"""


class ComfyPage:
    """One browser page on the server's frontend."""

    def __init__(self, page, server: ComfyServer):
        self.page = page
        self.server = server
        self.page_errors: list[str] = []
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.add_init_script(_OBSERVER)

    def open(self, timeout_ms: int = 90_000):
        """Load the app, wait for the graph, and close the template browser a first visit opens
        (Escape, as a user would)."""
        # the frontend opens the template browser when the user's settings on the server do not
        # have Comfy.TutorialCompleted yet, and sets it then: only the server's first visit
        first_visit = not (self.server.get("/settings") or {}).get("Comfy.TutorialCompleted")
        self.page.goto(self.server.url + "/", wait_until="domcontentloaded", timeout=timeout_ms)
        self.page.wait_for_function("() => window.app && window.app.graph && document.querySelector('#graph-canvas')",
                                    timeout=timeout_ms)
        self.page.wait_for_selector("button:has-text('Run')", timeout=timeout_ms)
        # the template dialog comes a moment after the graph; give it the chance to appear (a
        # dialog on a later visit is not waited for: the tests' visible_dialogs() checks find it)
        if first_visit:
            with contextlib.suppress(Exception):
                self.page.wait_for_selector(".p-dialog:has-text('Template')", timeout=5_000)
        for _ in range(3):
            if not self.visible_dialogs():
                break
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(500)

    def seen(self) -> list[dict]:
        """Every toast and dialog since the page loaded: {kind, severity, text}."""
        return self.page.evaluate("() => window.__stemSeen || []")

    def visible_dialogs(self) -> list[str]:
        return self.page.evaluate(
            "() => Array.from(document.querySelectorAll('.p-dialog')).filter(d => d.offsetParent !== null)"
            ".map(d => (d.innerText || '').trim().replace(/\\s+/g, ' ').slice(0, 300))")

    def drop_workflow(self, path: Path):
        """Drop the file onto the canvas, like dragging it from a file manager."""
        n_before = len(self.nodes())
        self.page.evaluate(_DROP, [path.read_text(), path.name])
        self.page.wait_for_function(
            "([n, name]) => (window.app.graph.nodes || window.app.graph._nodes).length > 0 && "
            "((window.app.graph.nodes || window.app.graph._nodes).length !== n || document.title.includes(name))",
            arg=[n_before, path.stem], timeout=30_000)
        self.page.wait_for_timeout(1500)  # widgets' callbacks, previews, any dialog

    def nodes(self) -> list[dict]:
        return self.page.evaluate(_NODES)

    def set_widget(self, node_type: str, name: str, value) -> list[dict]:
        """Set widget `name` on every node of type node_type; returns [{id, old, now}]."""
        return self.page.evaluate(_SET_WIDGET, [node_type, name, value])

    def tidy_for_screenshot(self):
        """Settings a user would change for a picture of the whole graph (the user folder is the
        server's temporary one): node text drawn at any zoom, no minimap, no canvas statistics."""
        self.page.evaluate("""async () => {
          const s = window.app.extensionManager.setting;
          await s.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);
          await s.set('Comfy.Minimap.Visible', false);
          await s.set('Comfy.Graph.CanvasInfo', false);
        }""")

    def frame_graph(self, margin: int = 16):
        """Zoom and pan so that every node fills the canvas (the frontend's own fit view leaves a
        wide border), as a user would with the wheel and a drag."""
        self.page.evaluate("""(margin) => {
          const app = window.app, ds = app.canvas.ds, el = app.canvas.canvas;
          const nodes = app.graph.nodes || app.graph._nodes;
          let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
          for (const n of nodes) {
            const b = n.boundingRect || [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30];
            x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
            x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
          }
          const r = el.getBoundingClientRect(), top = 44;  // below the workflow tabs, which overlay the canvas
          const w = r.width - 2 * margin, h = r.height - top - 2 * margin;
          const scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1.0);
          ds.scale = scale;
          ds.offset[0] = (margin + (w - scale * (x1 - x0)) / 2) / scale - x0;
          ds.offset[1] = (top + margin + (h - scale * (y1 - y0)) / 2) / scale - y0;
          app.canvas.setDirty(true, true);
        }""", margin)
        self.page.wait_for_timeout(800)

    def prompt(self) -> dict:
        """The API-format prompt the frontend would queue for the graph on the canvas (its own
        ``graphToPrompt``), without queueing it."""
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def run(self, timeout_ms: int = 30_000) -> str:
        """Press Run; returns the prompt id the server gave (raises with the server's answer if it
        refused the prompt)."""
        with self.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                       timeout=timeout_ms) as info:
            self.page.locator("button:has-text('Run')").first.click()
        resp = info.value
        try:
            body = resp.json()
        except Exception:
            body = {"text": resp.text()[:2000]}
        if resp.status != 200 or "prompt_id" not in body:
            raise AssertionError(f"ComfyUI refused the prompt (HTTP {resp.status}): {json.dumps(body)[:3000]}")
        return body["prompt_id"]
