"""STEM and inflated attention on every self-attention of a UNet: the attn1 hooks and the patched
clone that carries them (the maths is ``stem.attention``'s)."""
from __future__ import annotations

from dataclasses import replace

from ...stem.attention import (
    attend_shared,
    full_attention,
    full_attention_bytes,
    gathered_keys_values,
    sparse_causal_attention,
    stem_attention,
    stem_bases,
)
from .cancel import with_cancel_checks
from .layer import attention_precision, chunk_count, refuse_split_frames
from .memory import free_memory
from .pack import StemError
from .passes import SHARED_KEY, WRAPPER_KEY, attention_meeting, joined, make_pass_wrapper, parted, projection_meeting
from .plans import plan_for_call
from .settings import AttentionSettings
from .unet import attn1_sites, memory_profile

# inflated attention may use at most this share of the free memory of its device
INFLATED_MEMORY_SHARE = 0.5


def _attn1(attend, shared=None):
    """The attn1 hooks of a mode: ``(replace, patch)``.

    ``attend(q, k, v, extra_options)`` is the mode's attention over one batch. In a clip run in
    passes, ``shared(keys, values, extra_options)`` (whole-clip groups) makes what every pass
    attends to, once per layer: the passes meet in the attn1 ``patch`` before their projections
    (``passes.projection_meeting``) and the replacement attends each pass's queries to it.
    Without ``shared`` (groups that may straddle passes; ``patch`` is None) the passes meet in
    the replacement: the layer is joined into one batch for ``attend`` and cut up again.
    """

    def combine(payloads):
        qs, ks, vs, options = (list(x) for x in zip(*payloads))
        chunks = chunk_count(options[0])
        whole = attend(joined(qs, chunks), joined(ks, chunks), joined(vs, chunks), options[0])
        return parted(whole, qs, chunks)

    def replace_attention(q, k, v, extra_options):
        refuse_split_frames(extra_options)
        made = extra_options.pop(SHARED_KEY, None)  # a pass that met the others before its projections
        if made is not None:
            return attend_shared(q, *made, extra_options["n_heads"], chunk_count(extra_options),
                                 attention_precision(extra_options, q.dtype))
        met = attention_meeting(extra_options, q, k, v, combine)  # a pass of a clip in passes
        if met is not None:
            return met
        return attend(q, k, v, extra_options)

    def patch(n, context, value, extra_options):
        return projection_meeting(n, context, value, extra_options, shared)

    return replace_attention, (patch if shared is not None else None)


def _check_inflated_memory(rows: int, chunks: int, q, heads: int, group_size: int | None) -> None:
    """Refuse an inflated layer whose attention over ``rows`` frames (all passes) would not fit."""
    frames = rows // chunks
    group = min(frames, group_size or frames)
    need = full_attention_bytes(group, q.shape[1], q.shape[2], heads, num_groups=rows // group,
                                element_size=q.element_size())
    free = free_memory(q.device)
    if free is not None and need > INFLATED_MEMORY_SHARE * free:
        raise StemError(
            f"inflated attention over {group} frames of {q.shape[1]} tokens needs about {need / 2**30:.2f} GiB "
            f"in one layer, over the limit of {INFLATED_MEMORY_SHARE * free / 2**30:.2f} GiB "
            f"({int(INFLATED_MEMORY_SHARE * 100)}% of the {free / 2**30:.2f} GiB free); use attention 'stem', "
            "fewer frames, a smaller size, or 'chunks of n frames'"
        )


def attention_function(settings: AttentionSettings | None):
    """``attend(q, k, v, extra_options) -> out`` of a mode over one batch (``[B, N, heads*d]``, each
    cond chunk its own clip): STEM (its layer's seeded EM), inflated (refused when it would not
    fit), sparse-causal, or SD's own per-frame attention (ComfyUI's, as an unpatched layer runs
    it; also for None, an unpatched model)."""
    mode = "per-frame" if settings is None else settings.mode
    group_size = None if settings is None else settings.group_size

    def stem(q, k, v, options):
        return stem_attention(q, k, v, options["n_heads"], num_chunks=chunk_count(options),
                              frames_per_group=group_size, em=settings.layer_em(options),
                              precision=attention_precision(options, q.dtype))

    def inflated(q, k, v, options):
        _check_inflated_memory(q.shape[0], chunk_count(options), q, options["n_heads"], group_size)
        return full_attention(q, k, v, options["n_heads"], num_chunks=chunk_count(options),
                              frames_per_group=group_size, precision=attention_precision(options, q.dtype))

    def sparse_causal(q, k, v, options):
        return sparse_causal_attention(q, k, v, options["n_heads"], num_chunks=chunk_count(options),
                                       precision=attention_precision(options, q.dtype))

    def per_frame(q, k, v, options):
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, options["n_heads"], attn_precision=options.get("attn_precision"),
                                   transformer_options=options)

    return {"stem": stem, "inflated": inflated, "sparse-causal": sparse_causal, "per-frame": per_frame}[mode]


def inflated_hooks(settings: AttentionSettings):
    """Inflated attention: every frame attends to every frame of its group (the STEM paper's
    "radical" baseline), through SDPA's memory-efficient path. Before each layer it estimates
    the memory and refuses a clip that would not fit. Returns ``(replace, patch)`` (see
    :func:`_attn1`)."""
    group_size = settings.group_size

    def shared(ks, vs, options):
        _check_inflated_memory(sum(k.shape[0] for k in ks), chunk_count(options), ks[0], options["n_heads"],
                               group_size)
        return gathered_keys_values(ks, vs, options["n_heads"], chunk_count(options),
                                    attention_precision(options, ks[0].dtype))

    return _attn1(attention_function(settings), None if group_size else shared)


def stem_hooks(settings: AttentionSettings):
    """STEM attention's attn1 hooks ``(replace, patch)`` (see :func:`_attn1`); the replacement
    is ``p(q, k, v, extra_options) -> out`` with ``[B, N, heads*d]``.

    Closures over the frozen settings, so ``clone()`` deep-copies nothing large. Each cond/uncond
    chunk of the batch is one group (or consecutive groups of n frames).
    """

    def shared(ks, vs, options):
        return stem_bases(ks, vs, options["n_heads"], chunk_count(options), settings.layer_em(options))

    return _attn1(attention_function(settings), None if settings.group_size else shared)


def sparse_causal_hooks(settings: AttentionSettings):
    """FateZero's sparse-causal attention (each frame attends to the previous and the first frame):
    a frame's neighbours may lie in another pass, so passes meet in the replacement (see
    :func:`_attn1`)."""
    return _attn1(attention_function(settings))


def patched_model(model, settings: AttentionSettings):
    """A clone of ``model`` with ``settings.mode`` on every self-attention layer: 'stem',
    'inflated', 'sparse-causal' or 'per-frame' (SD's own, left as it is), and its calls in passes."""
    import comfy.patcher_extension

    settings = replace(settings, profile=memory_profile(model))
    m = with_cancel_checks(settings.on(model))
    if settings.mode != "per-frame":
        hooks = {"stem": stem_hooks, "inflated": inflated_hooks, "sparse-causal": sparse_causal_hooks}[settings.mode]
        replace_attention, patch = hooks(settings)
        for block, idx, tidx in attn1_sites(m):
            m.set_model_attn1_replace(replace_attention, block, idx, tidx)
        if patch is not None:  # passes meet before the projections (acts only in a clip run in passes)
            m.set_model_attn1_patch(patch)
    # clips too long for one UNet call run in passes; the passes meet at every self-attention
    # where it spans more than their own frames (stem, inflated)
    wrapper = make_pass_wrapper(plan_for_call, synchronised=settings.mode != "per-frame")
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    return m
