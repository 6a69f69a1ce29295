"""Progress for loops of UNet passes: a bar with its total known up front, and latent previews."""
from __future__ import annotations

import torch


class PassProgress:
    """A progress bar that moves once per UNet pass, its total known from the start.

    TokenFlow's step is several UNet passes (a keyframe pass and one per batch); the bar
    shows each pass, and the sampler's per-step callback adds the latent preview. It is
    shown at 0 before anything runs, so the model loading that precedes the first pass is
    not a silent wait.
    """

    def __init__(self, model, total_passes: int):
        import comfy.utils
        import latent_preview

        self.total = int(total_passes)
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.bar.update_absolute(0, self.total)

    def pass_done(self) -> None:
        self.done += 1
        self.bar.update_absolute(self.done, self.total)

    def step_callback(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        """The guider's per-step callback (as ``latent_preview.prepare_callback``'s): the
        step's preview on the bar, which the passes have already moved."""
        preview = None
        if self.previewer is not None:
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
        self.bar.update_absolute(self.done, self.total, preview)
