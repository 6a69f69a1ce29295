"""The pack's category and its user-facing error type."""
from __future__ import annotations

CATEGORY = "STEM video editing"


class StemError(ValueError):
    """A problem with a node's inputs, worded for the user: it names the input and the fix."""


def present_errors(*types: type) -> None:
    """Give error types a module name without a file path.

    ComfyUI shows an exception's type as ``module.QualName``; a custom node's module name is
    its folder's full path (``/.../custom_nodes/ComfyUI-STEM.nodes.host.pack``), which would put a
    path where a name belongs. The pack's name reads better and still says where it came from.
    """
    for t in types:
        t.__module__ = "ComfyUI-STEM"
