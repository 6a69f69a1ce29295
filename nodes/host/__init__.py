"""The ComfyUI glue the node modules share, one idea a module; no node class lives here.

- ``pack``: the pack's category and its user-facing error.
- ``unet``: which model families are supported, and where their self-attentions are.
- ``layer``: what an attention hook knows of its layer (key, chunks, EM seed, precision).
- ``settings``: STEM Attention Patch's typed settings, as they ride on a MODEL.
- ``attention_hooks``: STEM and inflated attention on every self-attention.
- ``passes``: a UNet call over a long clip in passes that meet at every self-attention.
- ``plans``: how many frames a pass, and the memory estimate and refusal before a run.
- ``memory``: the host's free memory; memory handed back after a run.
- ``cancel``: ComfyUI's Cancel, noticed inside long loops.
- ``sampling``: the DDIM schedule and loops as ComfyUI samplers; ``progress``: bars and previews.
- ``inversion_run``: DDIM inversion and reconstruction.
- ``pnp``: where TokenFlow injects the source.
- ``tokenflow_run``, ``tokenflow_guider``, ``tokenflow_hooks``: a TokenFlow edit, its steps, its layers.
- ``control_hints``: ControlNet hints cut to a pass's frames.
- ``latents``: LATENT and CONDITIONING as the nodes take and store them.
- ``paths``, ``clips``, ``inversion_files``: files in ComfyUI's folders.
- ``renamed_inputs``: inputs an older workflow saved under an earlier name.
"""
