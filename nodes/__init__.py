"""The ComfyUI adapter: node classes that delegate to stem/.

Each module holds a few thin node classes and its own mappings; ComfyUI is imported inside
functions, so the classes (and their INPUT_TYPES) import without the host.
"""
from . import attention_patch, inversion_io, inversion_nodes, metrics_node, tokenflow_edit, video_nodes

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in (attention_patch, inversion_nodes, tokenflow_edit, inversion_io, video_nodes, metrics_node):
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)
