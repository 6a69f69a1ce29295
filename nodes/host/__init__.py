"""Helpers the node modules share, one idea per module: what talks to ComfyUI beyond a node's
own INPUT_TYPES. No node class lives here, and no module here imports a node module.

ComfyUI is imported inside functions, so everything imports without the host.
"""
