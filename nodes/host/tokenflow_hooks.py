"""TokenFlow's hooks on the UNet (REFERENCE §5): what one pass does in every transformer block.

Every UNet call of an edit carries its own :class:`PassContext` in
``transformer_options[CONTEXT_KEY]``, as core's PAG hands its per-call options to its attention
replacement: whether it is the keyframe pass or a propagation pass, which batch, the source
latent of its frames, and whether the PnP windows are open at its noise level. The hooks read
that context; a call without one (the same model used elsewhere) gets plain attention.

Within a pass the branches write what the others read:
- :class:`SourceRecord`, written by the source branch only: its keyframe q/k for the PnP
  substitution, its nearest-neighbour fields, its injected ResNet features;
- :class:`KeyframeRecord`, written by the step's keyframe pass and read by the step's
  propagation passes: the source ``norm1(x)`` of the keyframes and every branch's keyframe
  self-attention output.
The maths lives in ``stem.tokenflow``; the hooks only route tensors to it.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

import torch

from ...stem.tokenflow import NNFields, batch_fields, keyframe_attention, keyframe_attention_passes, propagate_outputs
from .cancel import with_cancel_checks
from .layer import attention_precision, refuse_split_frames, site_key
from .passes import WRAPPER_KEY as PASSES_WRAPPER_KEY
from .pnp import PnPLayout, pnp_layout
from .unet import attn1_sites

WRAPPER_KEY = "comfyui-stem.tokenflow"
CONTEXT_KEY = "stem_tokenflow"
PNP_KEY = "stem_pnp_attention"  # transformer_options of the edit model: the q/k injection sites

KEYFRAMES, PROPAGATION = "keyframes", "propagation"
# positions of the conds in each calc_cond_batch call; the source goes last so that ComfyUI,
# when it must split the batch, runs it first
POSITIVE, NEGATIVE, SOURCE = 0, 1, 2


class SourceMissing(RuntimeError):
    """An edit branch ran before the source branch of the same pass."""


@dataclass
class KeyframeRecord:
    """What one step's keyframe pass leaves for that step's propagation passes."""

    source_norm: dict = field(default_factory=dict)  # block -> source norm1(x) of the keyframes [K, N, C]
    outputs: dict = field(default_factory=dict)  # block -> {branch: self-attention output [K, N, C]}

    def take(self, parts: list["KeyframeRecord"]) -> None:
        """Fill this record from the records of keyframe passes over consecutive keyframes."""
        for key in list(parts[0].source_norm):
            self.source_norm[key] = torch.cat([p.source_norm.pop(key) for p in parts])
        for key in list(parts[0].outputs):
            branches = parts[0].outputs[key]
            self.outputs[key] = {c: torch.cat([p.outputs[key][c] for p in parts]) for c in branches}
            for p in parts:
                del p.outputs[key]


@dataclass
class SourceRecord:
    """What the source branch of one pass writes and its edit branches read."""

    qk: dict = field(default_factory=dict)  # block -> (q, k) of the source keyframes (PnP window)
    fields: dict = field(default_factory=dict)  # block -> NNFields of the batch (propagation pass)
    features: torch.Tensor | None = None  # source residual branch of output_blocks[4][0]


@dataclass
class PassContext:
    """One UNet call of the edit: a keyframe pass or the propagation pass of one batch."""

    kind: str  # KEYFRAMES or PROPAGATION
    batch: int  # the propagation batch b (0 in the keyframe pass)
    batch_size: int
    keyframes: torch.Tensor  # [K] absolute keyframe indices of this step
    source_latent: torch.Tensor  # the inversion's latent of this pass's frames, at this level
    inject_attention: bool  # PnP q/k window open at this level
    inject_features: bool  # PnP feature window open at this level
    use_true_positions: bool
    keyframe_record: KeyframeRecord
    source: SourceRecord = field(default_factory=SourceRecord)
    # keyframes split into several passes: the LayerSync where their edit branches' extended
    # attention meets, so that it spans the keyframes of every pass
    sync: Any = None


# The pass whose UNet call is running, with its cond_or_uncond layout: the feature module is a
# plain nn.Module that no transformer_options reach, so the APPLY_MODEL wrapper sets this for
# the duration of the call.
_current_pass: contextvars.ContextVar = contextvars.ContextVar("stem_tokenflow_pass", default=None)


def _layout(extra_options: dict) -> list[int]:
    return list(extra_options.get("cond_or_uncond") or [POSITIVE])


def _branches(x: torch.Tensor, layout: list[int]) -> list[tuple[int, torch.Tensor]]:
    return list(zip(layout, x.chunk(len(layout))))


def _need(record: dict, key, what: str):
    if key not in record:
        raise SourceMissing(what)
    return record[key]


def norm_patch(n, context, value, extra_options):
    """attn1 patch: the source branch's ``norm1(x)``. Recorded for the keyframes; in a
    propagation pass it gives the batch's nearest-neighbour fields (REFERENCE §5.4)."""
    ctx: PassContext | None = extra_options.get(CONTEXT_KEY)
    if ctx is None:
        return n, context, value
    refuse_split_frames(extra_options)
    key = site_key(extra_options)
    for c, part in _branches(n, _layout(extra_options)):
        if c != SOURCE:
            continue
        if ctx.kind == KEYFRAMES:
            ctx.keyframe_record.source_norm[key] = part
        else:
            ctx.source.fields[key] = batch_fields(part, ctx.keyframe_record.source_norm[key], ctx.batch,
                                                  ctx.batch_size, ctx.keyframes, ctx.use_true_positions)
    return n, context, value


def attn_replace(q, k, v, extra_options):
    """attn1 replacement. Keyframe pass: the source keeps SD's per-frame attention, each edit
    branch attends over all keyframes, with the source's q/k in the PnP blocks and window.
    Propagation pass: nothing to compute, the output patch supplies the result."""
    from comfy.ldm.modules.attention import optimized_attention

    ctx: PassContext | None = extra_options.get(CONTEXT_KEY)
    heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
    if ctx is None:
        return optimized_attention(q, k, v, heads, attn_precision=precision)
    if ctx.kind == PROPAGATION:
        return torch.zeros_like(q)
    key = site_key(extra_options)
    layout = _layout(extra_options)
    pnp = ctx.inject_attention and key in extra_options.get(PNP_KEY, ())
    parts = {c: (qc, kc, vc) for (c, qc), (_, kc), (_, vc) in zip(_branches(q, layout), _branches(k, layout),
                                                                   _branches(v, layout))}
    if SOURCE in parts and pnp:
        ctx.source.qk[key] = parts[SOURCE][:2]
    work = attention_precision(extra_options, q.dtype)
    outs = {SOURCE: optimized_attention(*parts[SOURCE], heads, attn_precision=precision)} if SOURCE in parts else {}
    edits = {c: (*parts[c], _need(ctx.source.qk, key, "source q/k") if pnp else None) for c in layout if c != SOURCE}
    if ctx.sync is None:
        outs.update({c: keyframe_attention(qc, kc, vc, heads, sqk, work) for c, (qc, kc, vc, sqk) in edits.items()})
    else:  # keyframes in several passes: attend over the keyframes of all of them
        outs.update(ctx.sync.meet(key, lambda payloads: _keyframe_passes(payloads, heads, work), edits))
    return torch.cat([outs[c] for c in layout])


def _keyframe_passes(payloads: list[dict], heads: int, precision) -> list[dict]:
    """Each edit branch's extended attention over the keyframes of every pass; one
    ``{branch: output}`` per pass."""
    branches = list(payloads[0])
    if any(list(p) != branches for p in payloads):
        raise ValueError(f"the keyframe passes ran different branches: {[list(p) for p in payloads]}")
    outs = [{} for _ in payloads]
    for c in branches:
        qs, ks, vs, sqks = (list(x) for x in zip(*(p[c] for p in payloads)))
        for o, r in zip(outs, keyframe_attention_passes(qs, ks, vs, heads, sqks, precision)):
            o[c] = r
    return outs


def output_patch(n, extra_options):
    """attn1 output patch. Keyframe pass: record every branch's self-attention output.
    Propagation pass: replace it with the keyframes' outputs at the nearest neighbours."""
    ctx: PassContext | None = extra_options.get(CONTEXT_KEY)
    if ctx is None:
        return n
    key = site_key(extra_options)
    layout = _layout(extra_options)
    recorded = ctx.keyframe_record.outputs.setdefault(key, {})
    if ctx.kind == KEYFRAMES:
        for c, part in _branches(n, layout):
            recorded[c] = part
        return n
    fields: NNFields = _need(ctx.source.fields, key, "source nearest neighbours")
    b = ctx.batch
    out_b = torch.stack([recorded[c][b] for c in layout])
    out_prev = torch.stack([recorded[c][b - 1] for c in layout]) if b > 0 else None
    out = propagate_outputs(out_b, fields, out_prev)  # [G, F, N, C]
    return out.reshape(-1, *out.shape[2:]).to(n.dtype)


class FeatureInjection(torch.nn.Sequential):
    """``out_layers`` of output_blocks[4][0] with the PnP feature injection (REFERENCE §5.2).

    It holds the original layers under their own names, so weight patches (LoRA) that address
    ``...out_layers.3.weight`` still find them. Installed with ``add_object_patch`` where
    ``pnp.pnp_layout`` says (``output_blocks.4.0.out_layers`` on SD1.x/SD2.x).
    """

    def forward(self, h):
        h = super().forward(h)
        current = _current_pass.get()
        if current is None:
            return h
        ctx, layout = current
        parts = dict(_branches(h, layout))
        if SOURCE in parts:
            ctx.source.features = parts[SOURCE]
        if not ctx.inject_features or list(parts) == [SOURCE]:
            return h
        if ctx.source.features is None:
            raise SourceMissing("source features")
        src = ctx.source.features.to(h.dtype)
        return torch.cat([part if c == SOURCE else src for c, part in parts.items()])


def source_swap(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    """APPLY_MODEL wrapper: the source rows of the batch get the inversion's latent, and the
    call's pass is made current for the feature module."""
    ctx: PassContext | None = transformer_options.get(CONTEXT_KEY)
    if ctx is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    layout = _layout(transformer_options)
    if SOURCE in layout:
        F = x.shape[0] // len(layout)
        i = layout.index(SOURCE)
        x = torch.cat([x[: i * F], ctx.source_latent.to(x), x[(i + 1) * F:]])
    token = _current_pass.set((ctx, layout))
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        _current_pass.reset(token)


def with_pass(model_options: dict, ctx: PassContext) -> dict:
    """A copy of ``model_options`` whose transformer_options carry ``ctx`` (the model's own
    options are left as they are)."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), CONTEXT_KEY: ctx}
    return options


def build_edit_model(model, layout: PnPLayout | None = None):
    """A clone of ``model`` with TokenFlow's hooks; they act only in calls that carry a pass.
    ``layout``: where the source is injected (the reference's rule by default)."""
    import comfy.patcher_extension

    layout = layout or pnp_layout(model)
    m = model.clone()
    # the feature injection reads the batch's branches: its ResBlock stays whole (with_cancel_checks)
    m.add_object_patch(layout.features, FeatureInjection(*m.get_model_object(layout.features)))
    m = with_cancel_checks(m)
    m.model_options["transformer_options"][PNP_KEY] = layout.attention
    # a STEM Attention Patch's passes would cut TokenFlow's passes apart: its attention is
    # replaced below anyway, and TokenFlow's keyframe and batch passes bound their own size
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PASSES_WRAPPER_KEY)
    m.set_model_attn1_patch(norm_patch)
    for block, idx, tidx in attn1_sites(m):
        m.set_model_attn1_replace(attn_replace, block, idx, tidx)
    m.set_model_attn1_output_patch(output_patch)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, source_swap)
    return m
