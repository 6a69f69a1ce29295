"""FateZero's hooks on the UNet (docs/FATEZERO.md §4-5, §8): what the passes of an editing step do at
every self- and cross-attention.

A step runs its branches as separate UNet passes of the same frames that meet at every attention
layer (``passes.LayerSync``):
- SOURCE replays the inversion's UNet call at this level: the stored latent, the inversion's
  attention (its record: STEM with its seeds, or per-frame, inflated, sparse-causal) and source
  prompt, in a pass of its own frames as the inversion ran. Its maps are the inversion's, bit for
  bit, recomputed when needed instead of stored: nothing kept across steps grows with steps x
  frames x tokens^2.
- UNCOND and COND attend with the edit's own attention. At a meeting COND takes the source's maps
  as FateZero's controller says (``stem.fatezero``): in the cross window its cross-attention
  probabilities are controlled; in the self window, on layers of at most 32x32 tokens a frame,
  its self-attention is the source's map on its own values (``attention(Q_src, K_src, V_cond)``),
  blended with its own by the mask of the blend words.
The maths lives in ``stem.fatezero``; this module routes tensors to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ...stem.fatezero import CrossControl, attend_probabilities, attention_probabilities, blend_mask, fuse, word_map
from .cancel import with_cancel_checks
from .layer import site_key
from .passes import LayerSync, joined, parted

CONTEXT_KEY = "stem_fatezero"  # transformer_options of a pass: its PassContext
SOURCE, UNCOND, COND = "source", "uncond", "cond"
CONTROLLED_TOKENS = 32**2  # FateZero controls the layers of at most 32x32 tokens a frame
PROBABILITY_BYTES = 64 * 2**20  # explicit cross-attention probabilities are made this much at a time


class WordMaps:
    """The blend map's running sum (FZ §5): word-summed cross-attention of the mask layers, summed
    over layers and heads, ``[F, h, w]``, and how many layer heads it holds."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.heads = 0

    def add(self, maps: torch.Tensor, heads: int) -> None:
        """One layer's word maps ``[F, h, w]`` (summed over its ``heads``)."""
        self.total = maps if self.total is None else self.total + maps
        self.heads += heads

    def mask(self, size: tuple[int, int], threshold: float) -> torch.Tensor | None:
        return None if self.total is None else blend_mask(self.total, self.heads, size, threshold)


@dataclass
class StepState:
    """What the passes of one step do, and what they leave for the step's end."""

    cross_alpha: torch.Tensor | None  # [77] this step's cross window per target token; None: closed
    fuse_self: bool  # the self window is open
    threshold: float  # blend_th
    self_mask: WordMaps | None = None  # the source's word maps of this step (blend words), from a pre-pass
    source_words: WordMaps | None = None  # filled when not None (source word maps at the mask layers)
    target_words: WordMaps | None = None  # filled when not None (the target's own word maps, latent blend)
    _masks: dict = field(default_factory=dict)

    def mask(self, size: tuple[int, int]) -> torch.Tensor | None:
        """The self-attention blend mask ``[F, h*w]`` at a layer of ``size`` tokens (None: the
        source's attention alone)."""
        if self.self_mask is None:
            return None
        if size not in self._masks:
            self._masks[size] = self.self_mask.mask(size, self.threshold)
        return self._masks[size]


@dataclass
class PassContext:
    """One UNet pass of a step: its branch, where the passes meet, the step."""

    role: str
    sync: LayerSync
    step: StepState


def with_pass(model_options: dict, ctx: PassContext) -> dict:
    """A copy of ``model_options`` whose transformer_options carry ``ctx``."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), CONTEXT_KEY: ctx}
    return options


def _level_size(extra_options: dict) -> tuple[int, int]:
    """``(h, w)`` tokens of the layer the hook runs in."""
    return tuple(extra_options["activations_shape"][-2:])


def _mask_level(extra_options: dict) -> bool:
    """Whether the layer is one of the blend mask's: the UNet level at a quarter of the latent's
    size (SD1.5 at 512x512: input blocks 7, 8 and output blocks 3, 4, 5, the 16x16 layers
    FateZero takes, FZ §5)."""
    h, w = extra_options["original_shape"][-2:]
    for _ in range(2):
        h, w = -(-h // 2), -(-w // 2)
    return _level_size(extra_options) == (h, w)


def _met(payloads: list) -> tuple[dict, "StepState", dict]:
    """What the passes brought to a meeting, ``(role, q, k, v, extra_options)`` each: the payload
    indices of each role, the step, and each role's q, k, v over all its passes with the options
    of its first pass."""
    roles: dict = {}
    for i, p in enumerate(payloads):
        roles.setdefault(p[0], []).append(i)
    joint = {r: [joined([payloads[i][j] for i in idx], 1) for j in (1, 2, 3)] + [payloads[idx[0]][4]]
             for r, idx in roles.items()}
    return roles, payloads[0][4][CONTEXT_KEY].step, joint


class FateZeroLayers:
    """The attention hooks of a FateZero edit model: ``source_attention`` is the inversion's
    attention (``attention_hooks.attention_function`` of its record), ``own_attention`` the edit's;
    ``control`` the cross-attention controller; ``source_words`` / ``target_words`` ``[77]`` the
    blend words' columns in each prompt."""

    def __init__(self, source_attention: Callable, own_attention: Callable, control: CrossControl,
                 source_words: torch.Tensor, target_words: torch.Tensor):
        self.source_attention = source_attention
        self.own_attention = own_attention
        self.control = control
        self.source_words = source_words
        self.target_words = target_words

    def self_attention(self, q, k, v, extra_options):
        """attn1 replacement: meet the step's other passes (without a pass: the edit's own attention)."""
        ctx: PassContext | None = extra_options.get(CONTEXT_KEY)
        if ctx is None:
            return self.own_attention(q, k, v, extra_options)
        return ctx.sync.meet(("self", site_key(extra_options)), self._self_meeting, (ctx.role, q, k, v, extra_options))

    def cross_attention(self, q, k, v, extra_options):
        """attn2 replacement: meet the step's other passes (without a pass: ComfyUI's own)."""
        ctx: PassContext | None = extra_options.get(CONTEXT_KEY)
        if ctx is None:
            return _comfy_attention(q, k, v, extra_options)
        return ctx.sync.meet(("cross", site_key(extra_options)), self._cross_meeting, (ctx.role, q, k, v, extra_options))

    def _self_meeting(self, payloads: list) -> list:
        roles, step, joint = _met(payloads)
        outs = {}
        if SOURCE in joint:
            outs[SOURCE] = self.source_attention(*joint[SOURCE])
        if UNCOND in joint:
            outs[UNCOND] = self.own_attention(*joint[UNCOND])
        if COND in joint:
            q, k, v, options = joint[COND]
            if step.fuse_self and SOURCE in joint and q.shape[1] <= CONTROLLED_TOKENS:
                qs, ks, _, source_options = joint[SOURCE]
                fused = self.source_attention(qs, ks, v, source_options)  # the source's map on the target's values
                mask = step.mask(_level_size(options))
                outs[COND] = fuse(None if mask is None else self.own_attention(q, k, v, options), fused, mask)
            else:
                outs[COND] = self.own_attention(q, k, v, options)
        return _parted(payloads, roles, outs)

    def _cross_meeting(self, payloads: list) -> list:
        roles, step, joint = _met(payloads)
        outs = {}
        for role in (SOURCE, UNCOND):
            if role in joint:
                outs[role] = _comfy_attention(*joint[role])
        if SOURCE in joint and step.source_words is not None and _mask_level(joint[SOURCE][3]):
            qs, ks, _, options = joint[SOURCE]
            maps = [word_map(p, self.source_words) for _, p in _probability_rows(qs, ks, options["n_heads"])]
            step.source_words.add(torch.cat(maps).view(qs.shape[0], *_level_size(options)), options["n_heads"])
        if COND in joint:
            outs[COND] = self._target_cross(joint, step)
        return _parted(payloads, roles, outs)

    def _target_cross(self, joint: dict, step: StepState) -> torch.Tensor:
        """The target's cross-attention: controlled by the source's maps in the cross window (on
        layers of at most 32x32 tokens), its own elsewhere; its own word maps kept for the latent
        blend."""
        q, k, v, options = joint[COND]
        heads = options["n_heads"]
        record = step.target_words is not None and _mask_level(options)
        controlled = step.cross_alpha is not None and SOURCE in joint and q.shape[1] <= CONTROLLED_TOKENS
        maps = []
        if not controlled:
            if record:
                maps = [word_map(p, self.target_words) for _, p in _probability_rows(q, k, heads)]
            out = _comfy_attention(q, k, v, options)
        else:
            qs, ks = joint[SOURCE][0], joint[SOURCE][1]
            out = torch.empty_like(q)
            for rows, p_own in _probability_rows(q, k, heads):
                if record:
                    maps.append(word_map(p_own, self.target_words))
                p_src = attention_probabilities(qs[rows], ks[rows], heads)
                out[rows] = attend_probabilities(self.control(p_src, p_own, step.cross_alpha), v[rows])
        if record:
            step.target_words.add(torch.cat(maps).view(q.shape[0], *_level_size(options)), heads)
        return out


def _comfy_attention(q, k, v, extra_options):
    """ComfyUI's attention, as an unpatched layer runs it (so the source's replay is exact)."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


def _probability_rows(q: torch.Tensor, k: torch.Tensor, heads: int):
    """``(frames, probabilities [f, heads, N, T])`` over frames a few at a time, each block at most
    :data:`PROBABILITY_BYTES`."""
    per_frame = heads * q.shape[1] * k.shape[1] * 4
    n = max(1, PROBABILITY_BYTES // per_frame)
    for s in range(0, q.shape[0], n):
        rows = slice(s, min(s + n, q.shape[0]))
        yield rows, attention_probabilities(q[rows], k[rows], heads)


def _parted(payloads: list, roles: dict, outs: dict) -> list:
    result = [None] * len(payloads)
    for role, idx in roles.items():
        for i, part in zip(idx, parted(outs[role], [payloads[i][1] for i in idx], 1)):
            result[i] = part
    return result


def build_edit_model(model, layers: FateZeroLayers):
    """A clone of ``model`` with FateZero's hooks on every self- and cross-attention; a STEM Attention
    Patch's own passes are removed (the edit runs its branches' passes itself)."""
    import comfy.patcher_extension

    from .passes import WRAPPER_KEY as PASSES_WRAPPER_KEY
    from .unet import attn1_sites

    m = with_cancel_checks(model)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PASSES_WRAPPER_KEY)
    for block, idx, tidx in attn1_sites(m):
        m.set_model_attn1_replace(layers.self_attention, block, idx, tidx)
        m.set_model_attn2_replace(layers.cross_attention, block, idx, tidx)
    return m
