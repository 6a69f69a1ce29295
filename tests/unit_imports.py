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
