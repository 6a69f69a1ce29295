"""Files chosen in a node's combo: resolved like core LoadImage, confined to ComfyUI's folders.

A name is resolved with ``folder_paths.get_annotated_filepath`` and then refused unless its real
path (``..`` and symbolic links resolved) lies inside an allowed ComfyUI folder, because an API
prompt can send any string, not only the listed names.
"""
from __future__ import annotations

import hashlib
import os

from .pack import StemError


def within(path: str, root: str) -> bool:
    """Whether the real path ``path`` is ``root`` or lies below it."""
    path, root = os.path.normcase(path), os.path.normcase(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def folder_roots(kinds: tuple[str, ...]) -> dict[str, str]:
    """Real paths of ComfyUI's folders by type ("input", "output")."""
    import folder_paths

    return {kind: os.path.realpath(folder_paths.get_directory_by_type(kind)) for kind in kinds}


def resolve_in_folders(name, input_name: str, kinds: tuple[str, ...] = ("input",)) -> str:
    """The real path of a combo value such as ``clip.mp4`` or ``a/b.safetensors [output]``.

    Raises StemError naming ``input_name`` when the name is empty or resolves outside the
    folders of ``kinds``. Existence is not checked here.
    """
    import folder_paths

    folders = " or ".join(f"{k} folder" for k in kinds)
    if not isinstance(name, str) or not name.strip():
        raise StemError(f"{input_name}: no file chosen; pick one from the list (files in ComfyUI's {folders}).")
    real = os.path.realpath(folder_paths.get_annotated_filepath(name))
    roots = folder_roots(kinds)
    if not any(within(real, root) and os.path.normcase(real) != os.path.normcase(root) for root in roots.values()):
        where = ", ".join(f"{k}: {r}" for k, r in roots.items())
        upload = " (the upload button does that)" if kinds == ("input",) else ""
        raise StemError(
            f"{input_name}: '{name}' points outside ComfyUI's {folders} ({where}), following '..' and "
            f"symbolic links; for safety this node reads only files inside {'it' if len(kinds) == 1 else 'them'}. "
            f"Copy the file into the {kinds[0]} folder{upload} and pick it from the list."
        )
    return real


def existing_in_folders(name, input_name: str, kinds: tuple[str, ...] = ("input",)) -> str:
    """`resolve_in_folders`, and refuse a path that does not exist."""
    real = resolve_in_folders(name, input_name, kinds)
    if not os.path.exists(real):
        raise StemError(
            f"{input_name}: '{name}' was not found in ComfyUI's {' or '.join(k + ' folder' for k in kinds)}; "
            "it may have been moved or deleted. Refresh the node list (press R) and pick an existing file."
        )
    return real


def file_signature(path: str, extensions: tuple[str, ...] = ()) -> str:
    """What IS_CHANGED compares: size and modification time, as core LoadVideo does, never the
    contents (a clip or an inversion can be hundreds of MB, and IS_CHANGED runs on every queue).
    For a folder, the name, size and time of each file ending in ``extensions``."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for e in sorted(os.scandir(path), key=lambda e: e.name):
            if e.is_file() and e.name.lower().endswith(extensions):
                st = e.stat()
                h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def linked(input_name: str, input_types) -> bool:
    """Whether ``input_name`` is fed by a link, from VALIDATE_INPUTS' ``input_types`` (ComfyUI
    hands it the types of the linked inputs only): a linked file name is checked when the node
    runs; a widget's value, even None from an empty list, is checked at validation."""
    return bool(input_types) and input_name in input_types
