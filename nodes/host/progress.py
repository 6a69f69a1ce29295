"""Progress for loops of UNet passes: a bar with its total known up front, latent previews, and
a line of text on the running node (the step and the pass, the memory plan)."""
from __future__ import annotations

import sys

import torch


def show_text(text: str) -> None:
    """Show ``text`` on the running node: ComfyUI's progress text, which the frontend draws under
    the node and the command-line runner (``workflows/run.py``) prints. Does nothing where no
    server is up (a script or a test calling the node directly)."""
    module = sys.modules.get("server")  # ComfyUI's server.py, imported by main.py and by run.py
    server = getattr(getattr(module, "PromptServer", None), "instance", None)
    if server is None or not hasattr(server, "send_progress_text"):
        return
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    if context is None or context.node_id is None:
        return
    server.send_progress_text(text, context.node_id, getattr(server, "client_id", None))


class PassProgress:
    """A progress bar that moves once per UNet pass, its total known from the start.

    TokenFlow's step is several UNet passes (a keyframe pass and one per batch); the bar
    shows each pass, and the sampler's per-step callback adds the latent preview. It is
    shown at 0 before anything runs, so the model loading that precedes the first pass is
    not a silent wait. Each pass also shows "step s/S, pass p/P" on the node (``show_text``);
    ``passes_per_step`` is None where the count varies from step to step (FateZero).
    """

    def __init__(self, model, total_passes: int, steps: int, passes_per_step: int | None = None):
        import comfy.utils
        import latent_preview

        self.total = int(total_passes)
        self.steps = int(steps)
        self.passes_per_step = passes_per_step
        self.done = 0
        self.steps_done = 0
        self.passes_in_step = 0
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.bar.update_absolute(0, self.total)

    def pass_done(self) -> None:
        self.done += 1
        self.passes_in_step += 1
        of = f"/{self.passes_per_step}" if self.passes_per_step else ""
        show_text(f"step {min(self.steps_done + 1, self.steps)}/{self.steps}, pass {self.passes_in_step}{of}")
        self.bar.update_absolute(self.done, self.total)

    def step_callback(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        """The guider's per-step callback (as ``latent_preview.prepare_callback``'s): the
        step's preview on the bar, which the passes have already moved."""
        self.steps_done = step + 1
        self.passes_in_step = 0
        preview = None
        if self.previewer is not None:
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
        self.bar.update_absolute(self.done, self.total, preview)
