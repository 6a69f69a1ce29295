"""The UNet as the STEM nodes see it: which model families are supported, and where their
self-attentions are (read from the module tree, not from SD1.5 constants)."""
from __future__ import annotations

from ...stem.memory import SD1, SDXL, Profile
from .pack import StemError

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


def attn1_sites(model) -> list[tuple[str, int, int]]:
    """Every self-attention of the UNet as ``(block, id, transformer_index)``, the keys of
    ``set_model_attn1_replace``; read from the module tree, not from SD1.5 constants."""
    unet = model.get_model_object("diffusion_model")
    return [(block, i, t) for block, i, layer in transformers(unet) for t in range(len(layer.transformer_blocks))]


def attn1_modules(unet) -> dict:
    """``{(block, id, transformer_index): self-attention module}`` of the UNet
    (``diffusion_model``) as ComfyUI runs it (``to_q``, ``to_k``, ``to_v``, ``to_out``; LoRA and
    other weight patches included)."""
    return {(block, i, t): tb.attn1 for block, i, layer in transformers(unet)
            for t, tb in enumerate(layer.transformer_blocks)}


def is_sdxl(model) -> bool:
    import comfy.supported_models as sm

    return isinstance(getattr(model.model, "model_config", None), sm.SDXL)


def memory_profile(model) -> Profile:
    """The activation model of the UNet's family (``stem.memory``)."""
    return SDXL if is_sdxl(model) else SD1


def transformers(unet):
    """``(block, id, SpatialTransformer)`` of the UNet, in the order ComfyUI runs them."""
    from comfy.ldm.modules.attention import SpatialTransformer

    for block, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for i, seq in enumerate(blocks):
            for layer in seq:
                if isinstance(layer, SpatialTransformer):
                    yield block, i, layer
