"""The ComfyUI adapter: the node modules, one or two thin node classes each, that delegate to
``host/`` (the ComfyUI glue they share, one idea a module) and to ``stem/`` (the maths). No node
module imports another.

ComfyUI is imported inside functions, so the classes (and their INPUT_TYPES) import without
the host.
"""
from ..stem.inversion import InversionError
from ..stem.video import VideoError
from . import attention_patch, fatezero_edit, inversion_io, inversion_nodes, metrics_node, tokenflow_edit, video_nodes
from .host.pack import StemError, present_errors

present_errors(StemError, InversionError, VideoError)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in (attention_patch, inversion_nodes, tokenflow_edit, fatezero_edit, inversion_io, video_nodes, metrics_node):
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)
