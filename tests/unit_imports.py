"""Imports for the unit tier: single files by path, and the pack the way ComfyUI imports a
custom node folder (as a package from the repo root's ``__init__.py``), under one name that
every unit test shares."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = "comfyui_stem_unit"


def load_module(name: str, path: Path, **kw):
    """Import ``path`` as module ``name`` once; a failed import leaves nothing behind."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path, **kw)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_pack():
    return load_module(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])


def stand_in_folder_paths(base: Path):
    """A stand-in for ComfyUI's ``folder_paths`` over empty ``input``/``output``/``temp``
    folders made under ``base`` (the only host module the pack's INPUT_TYPES read).
    Returns ``(module, dirs)``; names may carry ComfyUI's `` [output]`` style annotation."""
    import types

    dirs = {kind: base / kind for kind in ("input", "output", "temp")}
    for d in dirs.values():
        d.mkdir()
    fp = types.ModuleType("folder_paths")
    fp.get_input_directory = lambda: str(dirs["input"])
    fp.get_output_directory = lambda: str(dirs["output"])
    fp.get_directory_by_type = lambda kind: str(dirs[kind]) if kind in dirs else None

    def get_annotated_filepath(name, default_dir=None):
        for kind in dirs:
            if name.endswith(f" [{kind}]"):
                return str(dirs[kind] / name[: -len(kind) - 3])
        return str(Path(default_dir or dirs["input"]) / name)

    fp.get_annotated_filepath = get_annotated_filepath
    return fp, dirs
