"""The ComfyUI adapter: node classes that delegate to stem/."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
