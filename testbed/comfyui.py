"""ComfyUI in this process, on the CPU, with this repository loaded as a custom node pack.

``locate_and_bootstrap()`` puts the checkout ($COMFYUI_PATH, default ~/ComfyUI) first on
``sys.path``, switches ComfyUI to CPU mode and imports it, so that ``import nodes`` is ComfyUI's
``nodes.py`` (never this pack's ``nodes/``); ``load_pack()`` loads the repository exactly as
ComfyUI loads a custom node folder; ``session()`` does all of it and loads the random SD1.5
checkpoint, for a script. Nothing of ComfyUI is copied into this repository.

Only the standard library is imported at module level: a caller imports this module before it
knows whether ComfyUI (and torch) can be imported at all.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path


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


def session(repo_root: Path, prefix: str):
    """For a script: ComfyUI in CPU mode, temp folders, the core extra nodes, ``repo_root`` loaded
    as a custom node pack and the random SD1.5 checkpoint loaded. Returns (pack, model, clip,
    vae); exits with the reason when ComfyUI is not available."""
    import tempfile

    from .models import provide_sd15_checkpoint

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


def fresh_process(module: str, *args: str, repo_root: Path) -> tuple[dict | None, str]:
    """Run ``python -m module args`` from ``repo_root`` in a fresh process (a benchmark cell whose
    peak memory must be its own) and read the JSON line it prints last: ``(result, "")``, or
    ``(None, the last line of its error output)``."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=os.environ,
                         cwd=repo_root)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        return None, (out.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(lines[-1]), ""

