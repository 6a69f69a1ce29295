"""Cancel: ComfyUI's interruption, noticed inside the pack's long loops.

ComfyUI checks for Cancel between sampler steps; one step over a long clip can take minutes. The
pack's UNet calls check more often: between the UNet's blocks and around every attention
(:func:`with_cancel_checks`, through ModelPatcher's own block and attention patches), between the
token chunks of STEM's EM (``EMParams.interrupt``), and inside the per-frame modules (ResBlocks,
up- and downsamplers, feed-forwards, and SD's own self-attention modules, which a STEM layer
replaces but per-frame attention runs), which run a large batch in chunks of rows with a check
between them (``stem.chunks``; ModelPatcher object patches, :func:`chunked_module`). A press stops
a step within the time of one chunk, whatever the clip's size and the pass size. A module with an
object patch inside it (TokenFlow's feature injection, which reads the batch's branches) is left
whole.
"""
from __future__ import annotations

import functools

from ...stem.chunks import WORK_PER_CHUNK, attention_row_work, in_row_chunks


def interrupted() -> None:
    """Raise ComfyUI's interruption if the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def _block_check(h, transformer_options):
    interrupted()
    return h


def _output_block_check(h, hsp, transformer_options):
    interrupted()
    return h, hsp


def _attention_check(n, context, value, extra_options):
    interrupted()
    return n, context, value


def _attention_output_check(n, extra_options):
    interrupted()
    return n


@functools.lru_cache(maxsize=None)
def _chunked_class(cls: type, budget: int, attention: bool = False) -> type:
    """A subclass of ``cls`` whose ``forward`` runs ``cls.forward`` over chunks of the batch's rows
    of at most ``budget`` work (``stem.chunks.in_row_chunks``), checking for Cancel between them; a
    subclass, so that the UNet's dispatch (``isinstance`` on ResBlock, Upsample) treats it as the
    module it stands for. ``attention``: ``cls`` is an attention module (``forward(x, context,
    value, mask, ...)``), whose rows' work is its projections and scores."""

    def forward(self, x, *args, **kwargs):
        work = None
        if attention:
            if kwargs.get("mask") is not None:  # a mask may or may not have a row per batch row: whole
                return cls.forward(self, x, *args, **kwargs)
            work = attention_row_work(x, kwargs.get("context", args[0] if args else None))
        return in_row_chunks(lambda *a, **kw: cls.forward(self, *a, **kw), x, *args, between=interrupted,
                             budget=budget, work=work, **kwargs)

    return type(f"RowChunked{cls.__name__}", (cls,), {"forward": forward, "row_chunked_from": cls,
                                                      "row_chunk_budget": budget})


def chunked_module(module, budget: int = WORK_PER_CHUNK):
    """``module`` as a row-chunked module: the same object state (its ``__dict__`` is shared, so its
    parameters, submodules and their names, and with them weight patches such as LoRA, are the
    module's own), of a subclass whose ``forward`` runs in chunks of rows (:func:`_chunked_class`)."""
    from comfy.ldm.modules.attention import CrossAttention

    cls = getattr(type(module), "row_chunked_from", type(module))
    chunked = object.__new__(_chunked_class(cls, int(budget), issubclass(cls, CrossAttention)))
    object.__setattr__(chunked, "__dict__", module.__dict__)
    return chunked


def _per_frame_modules(unet):
    """``(name, module)`` of the UNet's modules that treat each batch row on its own and are long
    enough to need a check inside: ResBlocks, up- and downsamplers, feed-forwards and self-attention
    modules (exactly these classes, not the video blocks derived from them; or one of them
    already chunked). Cross-attention (77 keys) is short, and other packs hook it by batch."""
    from comfy.ldm.modules.attention import CrossAttention, FeedForward
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    kinds = (ResBlock, Upsample, Downsample, FeedForward)
    for name, module in unet.named_modules():
        cls = getattr(type(module), "row_chunked_from", type(module))
        if cls in kinds or (cls is CrossAttention and name.endswith(".attn1")):
            yield name, module


def with_row_chunks(model, budget: int | None = None):
    """A clone of ``model`` whose per-frame modules run a large batch in chunks of rows of at most
    ``budget`` work (``stem.chunks``; None: those already chunked keep theirs, the others get
    ``WORK_PER_CHUNK``), checking for Cancel between them: object patches of ModelPatcher (restored
    when the model is unpatched), keyed by the module's own path. Another pack's object patch of
    such a module is left in place, and so is a module with another object patch inside it (that
    patch may read the whole batch: ours is removed there)."""
    m = model.clone()
    unet = m.get_model_object("diffusion_model")
    for name, module in _per_frame_modules(unet):
        key = f"diffusion_model.{name}"
        present = m.object_patches.get(key)
        ours = present is not None and hasattr(type(present), "row_chunk_budget")
        inside = any(k.startswith(key + ".") for k in m.object_patches)
        if inside:
            if ours:
                del m.object_patches[key]
        elif present is None or (ours and budget is not None and type(present).row_chunk_budget != budget):
            m.add_object_patch(key, chunked_module(module, WORK_PER_CHUNK if budget is None else budget))
    return m


def with_cancel_checks(model):
    """A clone of ``model`` that notices Cancel between the UNet's blocks, before and after every
    self- and cross-attention (the patches return their inputs unchanged; other patches keep their
    order) and between the row chunks of its per-frame modules (:func:`with_row_chunks`)."""
    m = with_row_chunks(model)
    m.set_model_input_block_patch(_block_check)
    m.set_model_output_block_patch(_output_block_check)
    m.set_model_attn1_patch(_attention_check)
    m.set_model_attn1_output_patch(_attention_output_check)
    m.set_model_attn2_patch(_attention_check)
    m.set_model_attn2_output_patch(_attention_output_check)
    return m
