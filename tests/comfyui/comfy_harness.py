"""In-process ComfyUI for the ComfyUI test tier.

Everything here runs ComfyUI's own code (found at $COMFYUI_PATH) in this interpreter: no server,
no sockets, nothing downloaded, nothing of ComfyUI copied into this repository.

* ``locate_and_bootstrap()`` puts the checkout first on ``sys.path``, switches ComfyUI to CPU mode
  and imports it, so that ``import nodes`` is ComfyUI's ``nodes.py`` (never this pack's ``nodes/``).
* ``write_sd15_checkpoint()`` / ``provide_sd15_checkpoint()`` build a random-weight checkpoint with
  SD1.5's exact layout (UNet, VAE, CLIP-L text encoder), built from ComfyUI's own classes.
* ``PromptRunner`` runs API-format prompts through ``execution.PromptExecutor`` after
  ``execution.validate_prompt``, the way the server's prompt worker does.
* ``ProgressRecorder`` is the ProgressBar hook (what ``main.hijack_progress`` installs in a server).
* ``write_video_clip()`` writes small synthetic mp4 clips.

Only the standard library is imported at module level: conftest imports this module before it
knows whether ComfyUI (and torch) can be imported at all.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import logging
import math
import os
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

CHECKPOINT_SEED = 20240617
CLIENT_ID = "stem-tests"

# ----------------------------------------------------------------------------------------------
# Finding and importing ComfyUI
# ----------------------------------------------------------------------------------------------


def comfyui_path() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("COMFYUI_PATH") or "~/ComfyUI"))


def _purge_modules_under(root: str) -> None:
    root = os.path.realpath(root) + os.sep
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and os.path.realpath(f).startswith(root):
            del sys.modules[name]


def locate_and_bootstrap() -> tuple[str, str | None]:
    """Import ComfyUI from $COMFYUI_PATH in CPU mode. Returns (path, None) when it works and
    (path, one-line reason) when the tier has to be skipped: no checkout there, or this
    interpreter lacks one of ComfyUI's dependencies. Other errors propagate."""
    path = comfyui_path()
    if not (os.path.isfile(os.path.join(path, "comfy", "model_patcher.py"))
            and os.path.isfile(os.path.join(path, "nodes.py"))):
        return path, f"no ComfyUI checkout at {path} (set COMFYUI_PATH)"

    stray = sys.modules.get("nodes")
    if stray is not None and not os.path.realpath(getattr(stray, "__file__", "") or "").startswith(
            os.path.realpath(path) + os.sep):
        raise RuntimeError(f"a module named 'nodes' was imported before ComfyUI's: {stray!r}; "
                           "this pack's nodes/ must only be imported as part of the pack")

    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    try:
        import comfy.cli_args  # noqa: F401  (parses no command line: args are the defaults)
        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
        import comfy.model_management  # noqa: F401
        import utils.extra_config  # noqa: F401  main.py imports it first; see README of this tier
        import folder_paths  # noqa: F401
        import nodes
        import execution  # noqa: F401
        import comfy.utils  # noqa: F401
        import latent_preview  # noqa: F401
    except ImportError as e:
        sys.path.remove(path)
        _purge_modules_under(path)
        return path, (f"ComfyUI at {path} cannot be imported by {sys.executable} "
                      f"({type(e).__name__}: {e}); run this tier with ComfyUI's own python")

    real = os.path.realpath(nodes.__file__)
    if real != os.path.realpath(os.path.join(path, "nodes.py")):
        raise RuntimeError(f"'import nodes' resolved to {real}, not ComfyUI's nodes.py in {path}")
    if not comfy.cli_args.args.cpu or comfy.model_management.get_torch_device().type != "cpu":
        raise RuntimeError("ComfyUI is not in CPU mode: comfy.model_management was imported "
                           "before comfy.cli_args.args.cpu was set")
    return path, None


def init_comfy_nodes() -> list[str]:
    """Register the core extra nodes (comfy_extras: FreeU, SaveAnimatedWEBP, ...) the way
    main.start_comfyui does, without the API nodes and without scanning custom_nodes folders.
    Returns the names of comfy_extras files that failed to import (e.g. torchaudio missing)."""
    import nodes
    import utils  # noqa: F401
    if "SaveAnimatedWEBP" in nodes.NODE_CLASS_MAPPINGS:  # already done in this process
        return []
    failed: list[str] = []

    async def go():
        await nodes.init_public_apis()
        failed.extend(await nodes.init_builtin_extra_nodes())

    asyncio.run(go())
    # comfy_extras must not have replaced ComfyUI's utils package (see the notes in the README)
    um = sys.modules.get("utils")
    if um is None or not hasattr(um, "__path__"):
        raise RuntimeError(f"sys.modules['utils'] is {um!r}, not ComfyUI's utils package")
    return failed


def load_pack(custom_nodes_dir: Path, repo_root: Path, folder_name: str = "ComfyUI-STEM"):
    """Load the repository as a custom node pack exactly like ComfyUI does: a folder
    custom_nodes/<folder_name> (here a symlink to the repo) passed to nodes.load_custom_node.
    Returns the package module. ComfyUI registers it in sys.modules under the folder's full
    path with '.' replaced by '_x_' (nodes.load_custom_node), e.g.
    '/tmp/pytest-of-root/pytest-3/comfy0/custom_nodes/ComfyUI-STEM'."""
    import nodes
    custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    link = custom_nodes_dir / folder_name
    if not link.exists():
        link.symlink_to(repo_root, target_is_directory=True)
    module_path = str(link)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        ok = asyncio.run(nodes.load_custom_node(module_path, ignore=set(), module_parent="custom_nodes"))
    finally:
        logging.getLogger().removeHandler(handler)
    module_name = module_path.replace(".", "_x_")
    module = sys.modules.get(module_name)
    if not ok or module is None:
        raise RuntimeError(f"ComfyUI could not load {repo_root} as a custom node pack; it logged:\n"
                           + "\n".join(records))
    return module


def pack_submodule(pack, dotted: str):
    """The pack's own copy of one of its submodules, e.g. pack_submodule(stem_pack, "stem.ddim").
    The pack is imported as a package named by its path, so `import stem` in a test gives a
    *different* module object (the repo root is on sys.path): patch or isinstance-check the
    pack's copy, which is this one."""
    import importlib
    return importlib.import_module("." + dotted, pack.__name__)


def configure_folders(base: Path) -> dict[str, Path]:
    """Point ComfyUI's output, input, temp and user folders at fresh folders under base and add a
    checkpoints folder (as the default one). Returns the paths."""
    import folder_paths
    dirs = {k: base / k for k in ("output", "input", "temp", "user", "checkpoints", "custom_nodes")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.set_user_directory(str(dirs["user"]))
    folder_paths.add_model_folder_path("checkpoints", str(dirs["checkpoints"]), is_default=True)
    return dirs


# ----------------------------------------------------------------------------------------------
# A random-weight SD1.5 checkpoint
# ----------------------------------------------------------------------------------------------

# comfy/model_detection.py (unet_config_from_diffusers_unet, "SD15") for comfy/supported_models.SD15
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# comfy/sd.py, VAE.__init__: "default SD1.x/SD2.x VAE parameters"
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                   "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                   "attn_resolutions": [], "dropout": 0.0}
LOGIT_SCALE = 4.6052  # ln(100), CLIP's value; the only 0-dim parameter (not saved: not transformer.*)


def sd15_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a full SD1.5 checkpoint, read off ComfyUI's own modules built on the meta
    device (no memory, no init)."""
    import torch
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL

    layout: dict[str, tuple[int, ...]] = {}
    unet = UNetModel(**SD15_UNET_CONFIG, dtype=torch.float16, device="meta",
                     operations=comfy.ops.disable_weight_init)
    layout.update({"model.diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()})
    del unet
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    layout.update({"first_stage_model." + k: tuple(v.shape) for k, v in vae.state_dict().items()})
    del vae
    te = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    # an SD1.5 file holds cond_stage_model.transformer.text_model.* only (no text_projection,
    # no logit_scale: SD15.process_clip_state_dict_for_saving drops them too)
    layout.update({"cond_stage_model." + k: tuple(v.shape) for k, v in te.state_dict().items()
                   if k.startswith("transformer.text_model.")})
    del te
    return layout


def init_parameter(name: str, shape: tuple[int, ...], seed: int = CHECKPOINT_SEED):
    """One parameter, seeded by (seed, name) so the result does not depend on the order:
    biases 0; 1-d weights (GroupNorm/LayerNorm) 1; 0-dim scalars LOGIT_SCALE; every matrix or
    conv kernel (and the embeddings) normal with std 1/sqrt(fan_in), fan_in = prod(shape[1:]).
    No extra scaling: measured on this layout (see test_harness), the UNet's activations stay
    below ~20 and its output (eps) has std ~0.5, the VAE decodes to std ~0.6 before the clamp,
    CLIP's last hidden state is layer-normed. Drawn straight in fp16 (normal_ on a half tensor)."""
    import torch
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 0:
        return torch.tensor(LOGIT_SCALE, dtype=torch.float16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    fan_in = math.prod(shape[1:])
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.float16).normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)


def write_sd15_checkpoint(path: Path, seed: int = CHECKPOINT_SEED, metadata: dict | None = None) -> int:
    """Write the random SD1.5 checkpoint (fp16 safetensors, ~2.1 GB) to path. Returns the number
    of parameters. Peak memory is about the file size (safetensors writes one dict)."""
    import safetensors.torch
    layout = sd15_layout()
    sd = {k: init_parameter(k, shape, seed) for k, shape in layout.items()}
    n = sum(t.numel() for t in sd.values())
    safetensors.torch.save_file(sd, str(path), metadata=metadata or {})
    return n


def checkpoint_cache_key(seed: int = CHECKPOINT_SEED) -> str:
    """Changes whenever the builder, ComfyUI's version or torch's version changes."""
    import torch
    try:
        import comfyui_version
        cv = comfyui_version.__version__
    except ImportError:
        cv = "?"
    h = hashlib.sha256()
    for obj in (sd15_layout, init_parameter, write_sd15_checkpoint):
        h.update(inspect.getsource(obj).encode())
    h.update(repr((SD15_UNET_CONFIG, SD_VAE_DDCONFIG, LOGIT_SCALE, seed, cv, torch.__version__)).encode())
    return h.hexdigest()[:16]


def checkpoint_cache_dir() -> Path | None:
    """$STEM_TEST_CACHE_DIR (set it to 'off' to build every session), else
    $XDG_CACHE_HOME/comfyui-stem-tests, else ~/.cache/comfyui-stem-tests. Never the repo."""
    v = os.environ.get("STEM_TEST_CACHE_DIR")
    if v is not None:
        return None if v.strip().lower() in ("", "0", "off", "no", "false") else Path(v).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-stem-tests"


def _valid_checkpoint(path: Path, key: str) -> bool:
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("stem_test_key") == key
    except Exception:
        return False


def provide_sd15_checkpoint(checkpoints_dir: Path, seed: int = CHECKPOINT_SEED) -> tuple[str, dict]:
    """Put the random SD1.5 checkpoint into checkpoints_dir and return (file name, info).
    With a cache folder the file is built once (written to a temporary name, then renamed) and
    symlinked here; cached files of other builder versions unused for an hour are deleted.
    info: built (bool), seconds, bytes, path."""
    key = checkpoint_cache_key(seed)
    name = f"stem-test-sd15-random-{key}.safetensors"
    dest = checkpoints_dir / name
    meta = {"stem_test_key": key, "seed": str(seed), "about": "random weights, SD1.5 layout, tests only"}
    t0 = time.perf_counter()
    cache = checkpoint_cache_dir()
    built = False
    if cache is None:
        write_sd15_checkpoint(dest, seed, meta)
        built = True
        target = dest
    else:
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / name
        if not _valid_checkpoint(target, key):
            tmp = cache / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                write_sd15_checkpoint(tmp, seed, meta)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
            built = True
        os.utime(target)  # marks it as in use
        for old in cache.glob("stem-test-sd15-random-*.safetensors"):
            # other versions of the builder: delete them unless a session used one within the hour
            if old.name != name:
                with contextlib.suppress(OSError):
                    if time.time() - old.stat().st_mtime > 3600:
                        old.unlink()
        for stale in cache.glob(".stem-test-sd15-random-*.tmp"):  # from a killed session
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 3600:
                    stale.unlink()
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.symlink_to(target)
    info = {"built": built, "seconds": time.perf_counter() - t0, "bytes": target.stat().st_size,
            "path": str(target)}
    return name, info


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


# ----------------------------------------------------------------------------------------------
# Synthetic video clips
# ----------------------------------------------------------------------------------------------


def synth_frames(frames: int = 8, width: int = 64, height: int = 64):
    """uint8 RGB frames (F, H, W, 3): a smooth two-colour gradient background, a red disc moving
    left to right and a yellow square moving down-right. Deterministic."""
    import numpy as np
    import cv2
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.stack([40 + 60 * xx / max(width - 1, 1),
                   90 + 80 * yy / max(height - 1, 1),
                   200 - 100 * xx / max(width - 1, 1)], axis=-1)
    out = np.empty((frames, height, width, 3), np.uint8)
    r = max(2, min(width, height) // 8)
    s = max(2, min(width, height) // 6)
    for i in range(frames):
        t = i / max(frames - 1, 1)
        img = np.ascontiguousarray(bg.astype(np.uint8))
        cx = int(round(r + t * (width - 2 * r - 1)))
        cy = height // 2
        cv2.circle(img, (cx, cy), r, (220, 30, 30), -1, lineType=cv2.LINE_AA)
        x0 = int(round(2 + t * (width - s - 4)))
        y0 = int(round(2 + t * (height - s - 4) * 0.5))
        cv2.rectangle(img, (x0, y0), (x0 + s, y0 + s), (240, 220, 40), -1)
        out[i] = img
    return out


def write_video_clip(path, frames: int = 8, width: int = 64, height: int = 64, fps: float = 8.0):
    """Write synth_frames(...) as an mp4 ('mp4v') to path. Returns the RGB frames written (the
    decoded ones differ slightly: mp4v is lossy)."""
    import cv2
    rgb = synth_frames(frames, width, height)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not w.isOpened():
        raise RuntimeError(f"cv2.VideoWriter could not open {path} with mp4v")
    try:
        for f in rgb:
            w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        w.release()
    return rgb



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


def random_sdxl(model_channels: int = 320, num_head_channels: int = 64, seed: int = 0, prediction: str = "eps",
                std: float = 0.05):
    """A ModelPatcher around an SDXL UNet built from ComfyUI's own SDXL config and model classes
    (its block layout and depths: 70 self-attentions), with seeded random weights, fp32. The
    defaults are SDXL's full widths (2.6 B parameters, 10 GB); the tests use small ones."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    import torch

    config = sm.SDXL({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "dtype": torch.float32, "in_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": num_head_channels,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
        "use_temporal_resblock": False})
    config.unet_config["num_head_channels"] = num_head_channels  # the family's extra config sets 64
    base = config.get_model({"v_pred": torch.zeros(())} if prediction == "v" else {})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def sdxl_conditioning(seed: int, width: int = 64, height: int = 64):
    """CONDITIONING as CLIP Text Encode SDXL gives it (tokens 2048 wide, a 1280-wide pooled
    output, size and crop), random."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=g), {
        "pooled_output": torch.randn(1, 1280, generator=g), "width": width, "height": height, "crop_w": 0,
        "crop_h": 0, "target_width": width, "target_height": height}]]


def benchmark_session(repo_root: Path, prefix: str):
    """For the scripts in benchmarks/: ComfyUI in CPU mode, temp folders, the core extra nodes,
    this repo loaded as a custom node pack and the random SD1.5 checkpoint loaded.
    Returns (pack, model, clip, vae); exits with the reason when ComfyUI is not available."""
    import tempfile

    _, skip = locate_and_bootstrap()
    if skip:
        sys.exit(f"ComfyUI not available: {skip}")
    import nodes

    dirs = configure_folders(Path(tempfile.mkdtemp(prefix=prefix)))
    init_comfy_nodes()
    pack = load_pack(dirs["custom_nodes"], repo_root)
    name, _ = provide_sd15_checkpoint(dirs["checkpoints"])
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
    return pack, model, clip, vae
