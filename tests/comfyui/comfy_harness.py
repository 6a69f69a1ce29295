"""In-process ComfyUI for the ComfyUI test tier: the pytest side of the repository's test bed.

Everything here runs ComfyUI's own code (found at $COMFYUI_PATH) in this interpreter: no server,
no sockets, nothing downloaded, nothing of ComfyUI copied into this repository.

* From ``testbed`` (shared with benchmarks/, re-exported here): ``locate_and_bootstrap()``,
  ``load_pack()``, ``pack_submodule()`` (``testbed.comfyui``); the random-weight SD1.5 checkpoint
  and SDXL UNets (``testbed.models``); synthetic clips (``testbed.clips``).
* ``PromptRunner`` runs API-format prompts through ``execution.PromptExecutor`` after
  ``execution.validate_prompt``, the way the server's prompt worker does.
* ``ProgressRecorder`` is the ProgressBar hook (what ``main.hijack_progress`` installs in a server).

Only the standard library is imported at module level: conftest imports this module before it
knows whether ComfyUI (and torch) can be imported at all.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from pathlib import Path
from typing import Any

# the test bed's machinery, as the tests use it (harness.NAME)
from testbed.clips import synth_frames, write_video_clip  # noqa: F401
from testbed.comfyui import (  # noqa: F401
    comfyui_path,
    configure_folders,
    init_comfy_nodes,
    load_pack,
    locate_and_bootstrap,
    pack_submodule,
)
from testbed.models import provide_sd15_checkpoint, random_sdxl, sdxl_conditioning  # noqa: F401

CLIENT_ID = "stem-tests"

# ----------------------------------------------------------------------------------------------
# The server stand-in, progress, and running prompts
# ----------------------------------------------------------------------------------------------


class StubServer:
    """What PromptExecutor, execution.execute, WebUIProgressHandler and main.hijack_progress use
    of server.PromptServer: client_id, last_node_id, last_prompt_id, sockets_metadata,
    send_sync(event, data, sid). Every message is recorded in .messages as (event, data)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[Any, Any]] = []
        try:  # for packs that register routes on PromptServer.instance at import
            from aiohttp import web
            self.routes = web.RouteTableDef()
        except ImportError:
            self.routes = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"text": text, "node": node_id}))

    def queue_updated(self):
        pass


@dataclasses.dataclass
class ProgressEvent:
    value: float
    total: float
    preview: Any  # None, or ("JPEG", PIL.Image, max_size) from latent_preview
    node_id: str | None
    prompt_id: str | None


class ProgressRecorder:
    """The global ProgressBar hook. Mirrors main.hijack_progress (checks for Cancel, updates
    ComfyUI's progress registry, sends "progress" to the server) and records every update.
    cancel_after(n): press Cancel (interrupt_current_processing) at the n-th update from now."""

    def __init__(self, server: StubServer):
        self.server = server
        self.events: list[ProgressEvent] = []
        self._cancel_at: int | None = None

    def __call__(self, value, total, preview_image, prompt_id=None, node_id=None):
        import comfy.model_management
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context
        ctx = get_executing_context()
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        if prompt_id is None:
            prompt_id = self.server.last_prompt_id
        if node_id is None:
            node_id = self.server.last_node_id
        self.events.append(ProgressEvent(value, total, preview_image, node_id, prompt_id))
        if self._cancel_at is not None and len(self.events) >= self._cancel_at:
            self._cancel_at = None
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()
        get_progress_state().update_progress(node_id, value, total, preview_image)
        self.server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id,
                                           "node": node_id}, self.server.client_id)

    def clear(self):
        self.events.clear()
        self._cancel_at = None

    def cancel_after(self, n_updates: int):
        self._cancel_at = len(self.events) + n_updates

    def for_node(self, node_id) -> list[ProgressEvent]:
        return [e for e in self.events if str(e.node_id) == str(node_id)]

    @property
    def previews(self) -> list[ProgressEvent]:
        return [e for e in self.events if e.preview is not None]


@contextlib.contextmanager
def preview_method(method: str = "latent2rgb"):
    """Run with ComfyUI's --preview-method set (the default is 'none': no previews at all)."""
    from comfy.cli_args import args, LatentPreviewMethod
    old = args.preview_method
    args.preview_method = LatentPreviewMethod(method)
    try:
        yield
    finally:
        args.preview_method = old


class PromptError(Exception):
    """A prompt failed. kind: 'validation', 'execution' or 'interrupted'. For execution errors:
    node_id, node_type, exception_type, exception_message, traceback (list of str), as ComfyUI
    reports them. str() gives all of it."""

    def __init__(self, kind: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.kind = kind
        self.details = details or {}
        self.node_id = self.details.get("node_id")
        self.node_type = self.details.get("node_type")
        self.exception_type = self.details.get("exception_type")
        self.exception_message = self.details.get("exception_message")
        self.traceback = self.details.get("traceback") or []


@dataclasses.dataclass
class PromptResult:
    prompt_id: str
    history: dict  # executor.history_result: {"outputs": {node: ui}, "meta": {...}}
    node_outputs: dict  # node id -> ComfyUI's cached output data: one list per output slot
    messages: list  # (event, data) sent to the client during this run
    status_messages: list  # executor.status_messages
    progress: list  # ProgressEvent list for this run
    cached_nodes: list  # nodes whose outputs came from the cache (not executed this run)
    executed_nodes: set  # nodes that executed this run
    seconds: float
    output_dir: str

    @property
    def outputs(self) -> dict:
        """UI outputs per node, as the history API shows them (e.g. {"images": [...]})."""
        return self.history.get("outputs", {})

    def get_node_output(self, node_id, raw: bool = False):
        """What the node's FUNCTION returned, as a tuple (one item per output slot). raw=True:
        ComfyUI's stored form, a list per slot holding one value per list-mapped call."""
        data = self.node_outputs.get(str(node_id))
        if data is None:
            raise KeyError(f"node {node_id} has no outputs (not in the prompt, or it did not run)")
        if raw:
            return data
        if any(len(slot) != 1 for slot in data):
            raise ValueError(f"node {node_id} produced list outputs {[len(s) for s in data]}; use raw=True")
        return tuple(slot[0] for slot in data)

    def output_files(self, node_id, key: str = "images") -> list[Path]:
        """Files an output node reported in its UI output (SaveImage, SaveAnimatedWEBP, ...)."""
        import folder_paths
        files = []
        for item in self.outputs.get(str(node_id), {}).get(key, []):
            base = {"output": folder_paths.get_output_directory(),
                    "temp": folder_paths.get_temp_directory(),
                    "input": folder_paths.get_input_directory()}[item.get("type", "output")]
            files.append(Path(base) / item.get("subfolder", "") / item["filename"])
        return files


def _format_validation(error: dict, node_errors: dict) -> str:
    lines = [f"prompt failed validation: {error.get('message')}: {error.get('details')}".rstrip(": ")]
    for nid, ne in node_errors.items():
        for r in ne.get("errors", []):
            extra = r.get("extra_info") or {}
            lines.append(f"  node {nid} ({ne.get('class_type')}): {r.get('message')}: {r.get('details')}")
            if extra.get("traceback"):
                lines.append("    " + "".join(extra["traceback"]).replace("\n", "\n    "))
    return "\n".join(lines)


def _format_execution(event: str, d: dict) -> str:
    if event == "execution_interrupted":
        return f"prompt interrupted at node {d.get('node_id')} ({d.get('node_type')})"
    tb = "".join(d.get("traceback") or [])
    return (f"node {d.get('node_id')} ({d.get('node_type')}) raised {d.get('exception_type')}: "
            f"{(d.get('exception_message') or '').strip()}\nTraceback (from ComfyUI):\n{tb}")


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)


def loader_nodes(prompt: dict) -> dict:
    """The nodes of a prompt that load models: no linked input, and a MODEL, CLIP or VAE output."""
    import nodes
    out = {}
    for nid, n in prompt.items():
        cls = nodes.NODE_CLASS_MAPPINGS.get(n.get("class_type"))
        types_ = set(getattr(cls, "RETURN_TYPES", ()) or ())
        if cls is not None and types_ & {"MODEL", "CLIP", "VAE"} and \
                not any(_is_link(v) for v in n.get("inputs", {}).values()):
            out[nid] = n
    return out


def add_sinks(prompt: dict, force: bool = False) -> dict:
    """If no node of the prompt is an output node (or force), attach a PreviewAny to output 0 of
    each node whose outputs nothing consumes. Unknown class types are left for validation."""
    import nodes
    classes = {nid: nodes.NODE_CLASS_MAPPINGS.get(n.get("class_type")) for nid, n in prompt.items()}
    if not force and any(c is None or getattr(c, "OUTPUT_NODE", False) is True for c in classes.values()):
        return prompt
    consumed = {str(v[0]) for n in prompt.values() for v in n.get("inputs", {}).values() if _is_link(v)}
    out = dict(prompt)
    for nid, cls in classes.items():
        if nid not in consumed and len(getattr(cls, "RETURN_TYPES", ()) or ()) > 0:
            out[f"sink_{nid}"] = {"class_type": "PreviewAny", "inputs": {"source": [nid, 0]}}
    return out


class PromptRunner:
    """Runs API-format prompts in-process like server.PromptServer + main.prompt_worker:
    validate_prompt, then PromptExecutor.execute on the outputs that validated. One executor is
    kept (CLASSIC cache, like the server), so nodes whose inputs did not change since the
    previous prompt are not run again; fresh=True runs on a new executor with empty caches."""

    def __init__(self, server: StubServer, recorder: ProgressRecorder):
        import execution
        self.server = server
        self.recorder = recorder
        self.executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)

    def run(self, prompt: dict, *, expect_error: bool = False, rerun: bool = False, fresh: bool = False,
            previews: bool | None = None, extra_data: dict | None = None, auto_sink: bool = True):
        """Returns a PromptResult; raises PromptError if the prompt is invalid or fails.
        expect_error=True: returns the PromptError instead (and fails if the prompt succeeds).
        rerun=True: every node runs again except the model loaders (nodes with no linked input
        that output MODEL/CLIP/VAE), whose cached outputs are reused: first a prompt of just
        those loaders runs, and the classic cache keeps only the previous prompt's nodes.
        fresh=True: a new executor with empty caches; it loads the checkpoint again, a second
        copy in memory (4.3 GB fp32) while anything else holds the first: prefer rerun.
        previews: True/False forces latent2rgb/no previews for this run; None leaves the
        current --preview-method (the progress_events fixture turns previews on).
        auto_sink: ComfyUI refuses a prompt without an output node ("Prompt has no outputs");
        for such a prompt the harness adds a core PreviewAny node on output 0 of every node
        that nothing consumes, ids "sink_<id>" (auto_sink=False: send it as it is)."""
        import execution
        prompt = {str(k): v for k, v in prompt.items()}
        if auto_sink:
            prompt = add_sinks(prompt)
        prompt_id = str(uuid.uuid4())
        extra = {"client_id": CLIENT_ID, **(extra_data or {})}

        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid or node_errors:
            err = PromptError("validation", _format_validation(error or {}, node_errors),
                              {"error": error, "node_errors": node_errors})
            if expect_error:
                return err
            raise err

        executor = self.executor
        if rerun and not fresh:
            loaders = loader_nodes(prompt)
            if loaders:
                flush = add_sinks(loaders, force=True)
                asyncio.run(execution.validate_prompt(prompt_id + "-flush", flush, None))
                executor.execute(flush, prompt_id + "-flush", {}, [k for k in flush if k.startswith("sink_")])
            else:
                fresh = True
        if fresh:
            executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)
        self.server.messages.clear()  # only this run's messages are kept (PromptResult.messages)
        n_msgs, n_prog = 0, len(self.recorder.events)
        self.server.last_prompt_id = prompt_id
        ctx = contextlib.nullcontext()
        if previews is not None:
            ctx = preview_method("latent2rgb" if previews else "none")
        t0 = time.perf_counter()
        with ctx:
            executor.execute(prompt, prompt_id, extra, outputs)
        seconds = time.perf_counter() - t0
        if self.server.client_id is not None:  # as the prompt worker does
            self.server.send_sync("executing", {"node": None, "prompt_id": prompt_id}, self.server.client_id)

        failure = next(((ev, d) for ev, d in executor.status_messages
                        if ev in ("execution_error", "execution_interrupted")), None)
        if failure is not None or not executor.success:
            ev, d = failure or ("execution_error", {"exception_message": "executor.success is False"})
            err = PromptError("interrupted" if ev == "execution_interrupted" else "execution",
                              _format_execution(ev, d), d)
            if expect_error:
                return err
            raise err
        if expect_error:
            raise AssertionError("the prompt was expected to fail, but it ran successfully")

        msgs = self.server.messages[n_msgs:]
        cached = next((d["nodes"] for ev, d in executor.status_messages if ev == "execution_cached"), [])
        executed = {d["node"] for ev, d in msgs if ev == "executing" and d.get("node") is not None}
        node_outputs = {}
        for nid in prompt:
            data = executor.caches.outputs.get(nid)
            if data is not None:
                node_outputs[nid] = data
        import folder_paths
        return PromptResult(prompt_id=prompt_id, history=executor.history_result, node_outputs=node_outputs,
                            messages=msgs, status_messages=list(executor.status_messages),
                            progress=self.recorder.events[n_prog:], cached_nodes=list(cached),
                            executed_nodes=executed, seconds=seconds,
                            output_dir=folder_paths.get_output_directory())


def clip_and_prompts(ckpt: str, clip: str, *texts: str) -> dict:
    """An API prompt: the checkpoint (node 1), the clip at 64 px (2), its latent (3) and one
    CLIPTextEncode per text (4, 5, ...). Run it and read the nodes' outputs."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "STEMLoadVideoFrames", "inputs": {"video": clip, "frame_load_cap": 0, "skip_first_frames": 0,
                                                              "select_every_nth": 1, "size": 64, "crop": False}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
    }
    for i, text in enumerate(texts, start=4):
        prompt[str(i)] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
    return prompt


@contextlib.contextmanager
def forbid_reading(path):
    """Fail the test if anything opens ``path`` inside the block (an IS_CHANGED that should
    look at the file's size and time only, say)."""
    import builtins

    real_open, target = builtins.open, os.path.realpath(str(path))

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(str(file)) == target:
            raise AssertionError(f"{path} was read")
        return real_open(file, *args, **kwargs)

    builtins.open = guarded
    try:
        yield
    finally:
        builtins.open = real_open


FP32_EPS = 2.0**-23


def fp32_tolerance(reference, depth: int, gain: float = 1.0) -> float:
    """An absolute tolerance for two fp32 computations of the same thing that differ only in
    summation order (a batch split another way, a kernel picked by another CPU or thread count).

    Each rounding is at most FP32_EPS relative to the values it touches; along ``depth``
    sequential operations (layers x steps) such errors add up, ``gain`` (classifier-free
    guidance's scale, say) multiplies them, and the values they touch are bounded by the
    output's own scale. A margin of 8 covers the constants that analysis leaves out. Like
    ``torch.testing``'s rtol, it scales with the signal, so values around 6 or around 80 get
    the same relative allowance, while a real error (a 1% wrong eps, a branch reading another
    pass's features) is orders of magnitude larger.
    """
    return 8.0 * depth * gain * FP32_EPS * float(reference.abs().max())


def assert_fp32_close(actual, expected, depth: int, gain: float = 1.0) -> None:
    import torch

    tol = fp32_tolerance(expected, depth, gain)
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tol)


def one_guided_call(model, positive, negative, x, cfg: float):
    """One guided model call through ComfyUI's CFGGuider on latent x (LATENT scale): the
    denoised output of the model at sigma 2."""
    import comfy.samplers
    import torch

    got = {}

    def fn(m, noise, sigmas, extra_args=None, callback=None, disable=None):
        got["denoised"] = m(noise, sigmas[0] * noise.new_ones(noise.shape[0]), **extra_args)
        return noise

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(positive, negative)
    g.set_cfg(cfg)
    with torch.no_grad():
        g.sample(torch.zeros_like(x), x, comfy.samplers.KSAMPLER(fn), torch.tensor([2.0, 1.0]), seed=0)
    return got["denoised"]


