"""What an attention hook knows of the layer it runs in, from its ``extra_options``: the layer's
key, its cond chunks, the seed of its EM initialisation, its attention precision, and whether
ComfyUI split the frames."""
from __future__ import annotations

import zlib

import torch

from .pack import StemError


def site_key(extra_options: dict) -> tuple[str, int, int]:
    """The ``(block, id, transformer_index)`` of the layer an attn1 hook is running in."""
    block = extra_options["block"]
    return (block[0], int(block[1]), int(extra_options.get("block_index", 0)))


def chunk_count(extra_options: dict) -> int:
    """Cond chunks (cond, uncond, ...) in the batch the hook sees: one entry each in ``cond_or_uncond``."""
    return len(extra_options.get("cond_or_uncond") or [0])


def layer_seed(seed: int, extra_options: dict) -> int:
    """A seed per (run seed, layer, noise level), so the EM initialisation is reproducible
    whatever order ComfyUI runs the layers and conds in."""
    block = extra_options.get("block", ("?", 0))
    sig = extra_options.get("sigmas")
    level = round(float(sig.flatten()[0]), 5) if sig is not None else 0.0
    key = f"{block[0]}:{block[1]}:{extra_options.get('block_index', 0)}:{level}"
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def attention_precision(extra_options: dict, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the layer's attention must run in: the model config's ``attn_precision``
    (SD2.x asks for fp32, as fp16 attention there overflows into NaN or black frames), after
    ComfyUI's own overrides (``--dont-upcast-attention``, forced upcasts)."""
    from comfy.ldm.modules.attention import get_attn_precision

    return get_attn_precision(extra_options.get("attn_precision"), dtype)


def refuse_split_frames(extra_options: dict) -> None:
    """STEM and TokenFlow need every frame of a cond in one call."""
    for key, what in (("context_window", "context windows"), ("ad_params", "AnimateDiff sliding contexts")):
        if key in extra_options:
            raise StemError(
                f"ComfyUI split the frames across passes ({what}); STEM bases and TokenFlow keyframes need "
                "every frame in one pass. Remove the context-window / AnimateDiff context options from the model."
            )


