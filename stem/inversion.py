"""The result of a DDIM inversion, and its safetensors file.

An inversion keeps the whole trajectory (REFERENCE §3: the editing branch reads the source
latent at every editing timestep), the schedule it was made with, the source prompt's
conditioning and the settings. Tensors only, in safetensors: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "comfyui-stem.inversion"
FORMAT_VERSION = 1


class InversionError(ValueError):
    """A file or an inversion that does not fit what it is used with; worded for the user."""


@dataclass
class Inversion:
    """One clip's DDIM inversion.

    latents: ``[S+1, F, C, h, w]`` fp32 in ComfyUI's LATENT scale (before the model's latent
        scaling). Entry 0 is the clean latent the inversion started from; entry ``i`` is the
        k-diffusion latent (``x0 + sigma * eps``) after inversion step ``i``, at ``sigmas[i]``.
    timesteps: the S inversion timesteps, increasing (1, 21, ..., 981 for 50 steps).
    sigmas: ``[S+1]`` the level of each entry: ``sigma(abar[0])``, then one per timestep.
    cond, pooled: the source prompt's conditioning tensor ``[1, T, D]`` and pooled output.
    settings: how it was made (attention mode and its parameters, steps, prediction type,
        model family, ...); JSON-serialisable.
    """

    latents: torch.Tensor
    timesteps: list[int]
    sigmas: torch.Tensor
    cond: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.latents.ndim != 5:
            raise InversionError(f"inversion latents must be [steps+1, frames, C, h, w], got {tuple(self.latents.shape)}")
        if len(self.timesteps) + 1 != self.latents.shape[0] or self.sigmas.numel() != self.latents.shape[0]:
            raise InversionError(
                f"inversion has {self.latents.shape[0]} latents for {len(self.timesteps)} timesteps and "
                f"{self.sigmas.numel()} sigmas; expected one more latent than timesteps"
            )

    def __repr__(self) -> str:  # short: ComfyUI puts input values into its error messages
        return (f"Inversion(frames={self.num_frames}, latent={self.latent_shape}, steps={self.steps}, "
                f"attention={self.settings.get('attention', '?')})")

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_frames(self) -> int:
        return self.latents.shape[1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(F, C, h, w)`` of the clip's latent."""
        return tuple(self.latents.shape[1:])

    @property
    def clean(self) -> torch.Tensor:
        return self.latents[0]

    @property
    def noisiest(self) -> torch.Tensor:
        return self.latents[-1]

    def latent_at(self, timestep: int) -> torch.Tensor:
        """The trajectory's latent at an inversion timestep ``[F, C, h, w]``."""
        try:
            return self.latents[1 + self.timesteps.index(int(timestep))]
        except ValueError:
            raise InversionError(
                f"timestep {timestep} is not in this inversion ({self.steps} steps: "
                f"{self.timesteps[0]}..{self.timesteps[-1]})"
            ) from None

    def check_matches(self, latent: torch.Tensor, atol: float = 1e-3) -> None:
        """Refuse a clip latent ``[F, C, h, w]`` that this inversion was not made from."""
        if tuple(latent.shape) != self.latent_shape:
            raise InversionError(
                f"the inversion was made from a latent of shape {self.latent_shape} (frames, channels, "
                f"height/8, width/8) but the latent given has {tuple(latent.shape)}: invert this clip "
                "at this size first, or pass the matching inversion"
            )
        diff = (latent.float().cpu() - self.clean.float().cpu()).abs().max().item()
        if diff > atol:
            raise InversionError(
                f"the inversion was made from another clip (its clean latent differs by up to {diff:.3g}): "
                "invert this clip first, or pass the matching inversion"
            )


def save_inversion(inv: Inversion, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
    """Write ``inv`` as safetensors; the settings and shape go into the metadata."""
    tensors = {
        "latents": inv.latents.to(dtype).contiguous().cpu(),
        "sigmas": inv.sigmas.double().contiguous().cpu(),
        "timesteps": torch.tensor(inv.timesteps, dtype=torch.int64),
    }
    if inv.cond is not None:
        tensors["cond"] = inv.cond.float().contiguous().cpu()
    if inv.pooled is not None:
        tensors["pooled"] = inv.pooled.float().contiguous().cpu()
    F, C, h, w = inv.latent_shape
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "frames": str(F),
        "latent_shape": json.dumps([F, C, h, w]),
        "steps": str(inv.steps),
        "settings": json.dumps(inv.settings, sort_keys=True),
    }
    tmp = f"{os.fspath(path)}.partial"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an inversion file, checked to be one of ours."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError, whose import path varies by version
        raise InversionError(f"'{path}' is not a readable safetensors file ({e}); pick a file written by Save STEM Inversion") from None
    if meta.get("format") != FORMAT:
        raise InversionError(f"'{path}' is a safetensors file but not a STEM inversion (no '{FORMAT}' metadata)")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise InversionError(f"'{path}' was written by a newer ComfyUI-STEM (format {meta['format_version']}); update the pack")
    return meta


def load_inversion(path: str | os.PathLike) -> Inversion:
    """Read an inversion written by :func:`save_inversion` (latents come back as fp32)."""
    if not os.path.isfile(path):
        raise InversionError(f"inversion file '{path}' not found")
    meta = read_metadata(path)
    t = load_file(os.fspath(path))
    missing = {"latents", "sigmas", "timesteps"} - set(t)
    if missing:
        raise InversionError(f"'{path}' lacks {sorted(missing)}; the file is damaged")
    inv = Inversion(
        latents=t["latents"].float(),
        timesteps=[int(x) for x in t["timesteps"].tolist()],
        sigmas=t["sigmas"].double(),
        cond=t.get("cond"),
        pooled=t.get("pooled"),
        settings=json.loads(meta.get("settings", "{}")),
    )
    if list(inv.latent_shape) != json.loads(meta["latent_shape"]):
        raise InversionError(f"'{path}' has latents {inv.latent_shape} but its metadata says {meta['latent_shape']}; the file is damaged")
    return inv
