"""ComfyUI-STEM: STEM inversion and TokenFlow editing as ComfyUI nodes.

ComfyUI imports this package from custom_nodes/ and reads the two mappings below.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
