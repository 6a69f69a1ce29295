"""The MODEL as the STEM nodes see it: which models are supported, where the self-attentions
are, the reference schedule on the model's own noise levels, and per-layer details."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..stem.ddim import DDIMSchedule, abar_from_sigma
from .host_base import StemError

SUPPORTED_FAMILIES = "SD1.x, SD2.x and SDXL (eps or v-prediction)"


def model_family(model) -> str:
    cfg = getattr(model.model, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(model.model).__name__


def check_model(model, input_name: str = "model") -> str:
    """The model's prediction type ('eps' or 'v'), read from its (possibly patched) noise
    sampling; refuse other families and parameterisations clearly."""
    import comfy.model_sampling as ms
    import comfy.supported_models as sm

    cfg = getattr(model.model, "model_config", None)
    # SDXL and its distilled variants (SSD-1B, Vega, KOALA) share its layout; the refiner and
    # the 8-channel edit/inpaint UNets do not
    ok_family = isinstance(cfg, (sm.SD15, sm.SD20, sm.SDXL)) and cfg.unet_config.get("in_channels", 4) == 4
    if not ok_family:
        raise StemError(
            f"{input_name}: {model_family(model)} models are not supported; STEM and TokenFlow here work with "
            f"{SUPPORTED_FAMILIES}. Load an SD1.5, SD2.1 or SDXL checkpoint."
        )
    sampling = model.get_model_object("model_sampling")
    kind = type(sampling).__mro__
    discrete = isinstance(sampling, ms.ModelSamplingDiscrete) and ms.EDM not in kind and ms.X0 not in kind
    if discrete and ms.V_PREDICTION in kind:
        return "v"
    if discrete and ms.EPS in kind:
        return "eps"
    raise StemError(f"{input_name}: {type(sampling).__name__} sampling is not supported; use an eps or "
                    "v-prediction SD1.x/SD2.x/SDXL model (remove ModelSampling nodes that set lcm, x0 or edm)")


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


def attn1_modules(unet) -> dict:
    """``{(block, id, transformer_index): self-attention module}`` of the UNet
    (``diffusion_model``) as ComfyUI runs it (``to_q``, ``to_k``, ``to_v``, ``to_out``; LoRA and
    other weight patches included)."""
    return {(block, i, t): tb.attn1 for block, i, layer in _transformers(unet)
            for t, tb in enumerate(layer.transformer_blocks)}


def is_sdxl(model) -> bool:
    import comfy.supported_models as sm

    return isinstance(getattr(model.model, "model_config", None), sm.SDXL)


@dataclass(frozen=True)
class PnPLayout:
    """Where TokenFlow injects the source (REFERENCE §5.2), as ComfyUI names the layers."""

    attention: frozenset  # {(block, id, transformer_index)}: self-attentions given the source's q and k
    features: str  # the ResBlock ``out_layers`` (residual branch) given the source's features

    def describe(self) -> str:
        ids = sorted({i for _, i, _ in self.attention})
        return f"PnP q/k at output blocks {ids} (first transformer block), features at {self.features}"


def _decoder_levels(unet) -> list[list[int]]:
    """The output blocks of each decoder level, lowest resolution first: a level ends with the
    block that upsamples."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

    levels, current = [], []
    for i, seq in enumerate(unet.output_blocks):
        current.append(i)
        if any(isinstance(layer, Upsample) for layer in seq):
            levels.append(current)
            current = []
    return levels + ([current] if current else [])


def pnp_layout(model, attention_blocks: list[int] | None = None, feature_block: int | None = None) -> PnPLayout:
    """TokenFlow's injection layers for this UNet, by the reference's rule read off the module tree.

    REFERENCE §5.2 on SD1.5 (PnP's ``res_dict = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}``: "not in
    the first block of the lowest resolution"): q/k go to the first transformer block of every
    decoder self-attention except the first one of the lowest-resolution decoder level that has
    attention (ComfyUI's output_blocks 4..11), and the features to the residual branch of that
    level's second ResBlock (diffusers up_blocks[1].resnets[1], output_blocks[4][0]). On SDXL the
    same rule gives output_blocks 1..5 (up_blocks[0].attentions[1, 2], up_blocks[1].attentions[0..2])
    and output_blocks[1][0] (up_blocks[0].resnets[1]). The published SDXL ports differ from one
    another (FLATTEN's sdxl branch, Veevee, Ctrl-X, Artist), and all of them inject into SDXL's
    lowest decoder level, as this rule does; none is a tuned reference, and neither is this
    choice. ``attention_blocks`` / ``feature_block`` (output block ids) move them.
    """
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = model.get_model_object("diffusion_model")
    with_attention = [i for i, seq in enumerate(unet.output_blocks) if any(isinstance(x, SpatialTransformer) for x in seq)]
    if not with_attention:
        raise StemError("the model's decoder has no self-attention for TokenFlow's injection")
    if attention_blocks is None:
        attention_blocks = with_attention[1:]
    wrong = [i for i in attention_blocks if i not in with_attention]
    if wrong:
        raise StemError(f"pnp_attention_blocks: output blocks {wrong} have no self-attention; this model's decoder "
                        f"has it in output blocks {with_attention}")
    if feature_block is None:
        level = next(lv for lv in _decoder_levels(unet) if with_attention[0] in lv)
        feature_block = level[1] if len(level) > 1 else level[0]
    if not 0 <= feature_block < len(unet.output_blocks) or not hasattr(unet.output_blocks[feature_block][0], "out_layers"):
        raise StemError(f"pnp_feature_block: output block {feature_block} does not start with a ResBlock; use one of "
                        f"0..{len(unet.output_blocks) - 1}")
    sites = frozenset(s for s in attn1_sites(model) if s[0] == "output" and s[1] in attention_blocks and s[2] == 0)
    return PnPLayout(sites, f"diffusion_model.output_blocks.{feature_block}.0.out_layers")


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
