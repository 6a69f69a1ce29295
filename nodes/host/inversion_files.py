"""Inversion files in ComfyUI's folders: the ones Load STEM Inversion lists and accepts, and where
Save STEM Inversion writes (the file format, tensors and JSON metadata, is stem.inversion's)."""
from __future__ import annotations

import os
import re

from ...stem.inversion import InversionError, read_metadata
from .pack import StemError
from .paths import existing_in_folders, folder_roots, resolve_in_folders, within

EXTENSION = ".safetensors"
_FOLDERS = ("input", "output")
# (path, size, mtime_ns) -> is a STEM inversion; the list is rebuilt whenever the browser
# asks for node definitions, and reading every header each time would be wasted work.
_format_cache: dict[tuple[str, int, int], bool] = {}


def _is_inversion(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _format_cache:
        try:
            read_metadata(path)
            _format_cache[key] = True
        except InversionError:
            _format_cache[key] = False
    return _format_cache[key]


def list_inversions() -> list[str]:
    """STEM inversion files in the input folder (plain names) and the output folder
    (``name [output]``), as core LoadImage annotates them, with '/' between folders."""
    names = []
    for kind, root in folder_roots(_FOLDERS).items():
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in files:
                if f.startswith(".") or not f.lower().endswith(EXTENSION):
                    continue
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                name = rel if kind == "input" else f"{rel} [{kind}]"
                try:
                    resolve_in_folders(name, "inversion_file", _FOLDERS)  # skips symlinks that leave
                except StemError:
                    continue
                if _is_inversion(path):
                    names.append(name)
    return sorted(names, key=str.lower)


def inversion_path(name, check_format: bool) -> str:
    path = existing_in_folders(name, "inversion_file", _FOLDERS)
    if not os.path.isfile(path) or not path.lower().endswith(EXTENSION):
        raise StemError(f"inversion_file: '{name}' is not a {EXTENSION} file; pick a file written by Save STEM Inversion.")
    if check_format:
        try:
            read_metadata(path)
        except InversionError as e:
            raise InversionError(f"inversion_file: {e}") from None
    return path


def save_target(prefix: str, output_dir: str) -> tuple[str, str]:
    """The folder (created) and the file name stem for ``prefix``; refuses one that leaves
    the output folder with a message naming the input, not ComfyUI's generic one."""
    import folder_paths

    outside = StemError(
        f"filename_prefix: '{prefix}' points outside ComfyUI's output folder ({output_dir}); use a relative "
        "path such as 'stem_inversion/clip', without '..' or a leading '/'."
    )
    if not prefix or os.path.basename(os.path.normpath(prefix)) in ("", ".", ".."):
        raise StemError(f"filename_prefix: '{prefix}' has no file name; use e.g. 'stem_inversion/clip'.")
    if os.path.isabs(prefix):
        raise outside
    real_out = os.path.realpath(output_dir)
    wanted = os.path.realpath(os.path.join(real_out, os.path.dirname(os.path.normpath(prefix))))
    if not within(wanted, real_out):
        raise outside
    try:
        folder, filename, _, _, _ = folder_paths.get_save_image_path(prefix, output_dir)
    except Exception:  # ComfyUI raises a bare Exception for a prefix outside the folder
        raise outside from None
    # get_save_image_path checks the folder before symbolic links are followed; check after.
    real_folder = os.path.realpath(folder)
    if not within(real_folder, real_out):
        raise outside
    return folder, filename


def next_free_path(folder: str, filename: str) -> str:
    """``folder/filename_NNNNN.safetensors`` with the next number that no file there has."""
    pattern = re.compile(re.escape(filename) + r"_(\d+)" + re.escape(EXTENSION) + "$", re.IGNORECASE)
    taken = [int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m]
    counter = max(taken, default=0) + 1
    while os.path.exists(os.path.join(folder, f"{filename}_{counter:05}{EXTENSION}")):
        counter += 1
    return os.path.join(folder, f"{filename}_{counter:05}{EXTENSION}")
