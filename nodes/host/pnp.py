"""Where TokenFlow injects the source (REFERENCE §5.2), as ComfyUI names the UNet's layers."""
from __future__ import annotations

from dataclasses import dataclass

from .pack import StemError
from .unet import attn1_sites


@dataclass(frozen=True)
class PnPLayout:
    """The injection sites of one UNet."""

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


def parse_blocks(text: str) -> list[int] | None:
    """``pnp_attention_blocks``: None for "auto", else output block ids ("4-11", "1,2,5")."""
    text = (text or "").strip().lower()
    if text in ("", "auto"):
        return None
    ids = []
    try:
        for part in text.replace(" ", "").split(","):
            lo, _, hi = part.partition("-")
            ids += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise StemError(f"pnp_attention_blocks: '{text}' is not 'auto' or output block ids such as '4-11' or "
                        "'1,2,5'") from None
    return ids
