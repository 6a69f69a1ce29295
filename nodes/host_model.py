"""The MODEL as the STEM nodes see it: which models are supported, where the self-attentions
are, the reference schedule on the model's own noise levels, and per-layer details."""
from __future__ import annotations

import zlib

import torch

from ..stem.ddim import DDIMSchedule, abar_from_sigma
from .host_base import StemError

SUPPORTED_FAMILIES = "SD1.x and SD2.x (eps or v-prediction)"


def model_family(model) -> str:
    cfg = getattr(model.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model.model).__name__


def check_model(model, input_name: str = "model") -> str:
    """The model's prediction type ('eps' or 'v'), read from its (possibly patched) noise
    sampling; refuse other families and parameterisations clearly."""
    import comfy.model_sampling as ms
    import comfy.supported_models as sm

    cfg = getattr(model.model, "model_config", None)
    ok_family = isinstance(cfg, (sm.SD15, sm.SD20)) and cfg.unet_config.get("in_channels", 4) == 4
    if not ok_family:
        raise StemError(
            f"{input_name}: {model_family(model)} models are not supported; STEM and TokenFlow here work with "
            f"{SUPPORTED_FAMILIES}. Load an SD1.5 or SD2.1 checkpoint."
        )
    sampling = model.get_model_object("model_sampling")
    kind = type(sampling).__mro__
    discrete = isinstance(sampling, ms.ModelSamplingDiscrete) and ms.EDM not in kind and ms.X0 not in kind
    if discrete and ms.V_PREDICTION in kind:
        return "v"
    if discrete and ms.EPS in kind:
        return "eps"
    raise StemError(f"{input_name}: {type(sampling).__name__} sampling is not supported; use an eps or "
                    "v-prediction SD1.x/SD2.x model (remove ModelSampling nodes that set lcm, x0 or edm)")


def _transformers(unet):
    """``(block, id, SpatialTransformer)`` of the UNet, in the order ComfyUI runs them."""
    from comfy.ldm.modules.attention import SpatialTransformer

    for block, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for i, seq in enumerate(blocks):
            for layer in seq:
                if isinstance(layer, SpatialTransformer):
                    yield block, i, layer


def attn1_sites(model) -> list[tuple[str, int, int]]:
    """Every self-attention of the UNet as ``(block, id, transformer_index)``, the keys of
    ``set_model_attn1_replace``; read from the module tree, not from SD1.5 constants."""
    unet = model.get_model_object("diffusion_model")
    return [(block, i, t) for block, i, layer in _transformers(unet) for t in range(len(layer.transformer_blocks))]


def attn1_module(unet, site: tuple[str, int, int]):
    """The self-attention module (``to_q``, ``to_k``, ``to_v``, ``to_out``) at ``site`` of the
    UNet (``diffusion_model``), as ComfyUI runs it: LoRA and other weight patches included."""
    block, idx, t = site
    for b, i, layer in _transformers(unet):
        if (b, i) == (block, idx):
            return layer.transformer_blocks[t].attn1
    raise KeyError(f"no self-attention at {site}")


def site_key(extra_options: dict) -> tuple[str, int, int]:
    """The ``(block, id, transformer_index)`` of the layer an attn1 hook is running in."""
    block = extra_options["block"]
    return (block[0], int(block[1]), int(extra_options.get("block_index", 0)))


def model_schedule(model, steps: int) -> DDIMSchedule:
    """The reference DDIM schedule on the model's own noise levels (REFERENCE §2)."""
    ms = model.get_model_object("model_sampling")
    return DDIMSchedule.create(steps, abar_from_sigma(ms.sigmas.double().cpu()))


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


def interrupted() -> None:
    """Raise ComfyUI's interruption if the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
