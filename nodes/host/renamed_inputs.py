"""Inputs that a workflow saved under an earlier name.

A UI workflow keeps widget values by position, so a renamed widget keeps its value there. An
API-format prompt names its inputs: ComfyUI drops a value under a name the node no longer has
(and hands a linked one to the node as an extra keyword). A node that renamed an input reads
both back here, and says so.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ComfyUI-STEM")


def renamed_inputs(node: str, renamed: dict[str, str], prompt: dict | None, unique_id,
                   extra: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Values given under an old name (``renamed``: old -> current), by current name, and the notes
    that tell the user. ``prompt`` and ``unique_id`` are the node's hidden PROMPT and UNIQUE_ID
    inputs (literal values), ``extra`` the keywords ComfyUI passed beyond the node's inputs
    (linked values). An input the prompt also gives under its current name keeps that value."""
    given = ((prompt or {}).get(str(unique_id)) or {}).get("inputs", {}) if unique_id is not None else {}
    unknown = sorted(set(extra) - set(renamed))
    if unknown:
        raise TypeError(f"{node} has no input {unknown[0]!r}")
    values, notes = {}, []
    for old, new in renamed.items():
        if new in given or (old not in given and old not in extra):
            continue
        values[new] = extra[old] if old in extra else given[old]
        notes.append(f"{node}: this workflow gives {new} under its old name {old} ({values[new]!r}); it was used as "
                     f"{new}. Save the workflow again to store the new name.")
        log.warning(notes[-1])
    return values, notes
