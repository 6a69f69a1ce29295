"""Cancel: ComfyUI's interruption, noticed inside the pack's long loops.

ComfyUI checks for Cancel between sampler steps; one step over a long clip can take minutes. The
pack's UNet calls check more often: between the UNet's blocks and around every attention
(:func:`with_cancel_checks`, through ModelPatcher's own block and attention patches) and between
the token chunks of STEM's EM (``EMParams.interrupt``), so a press stops a step within the time of
one ResBlock, one feed-forward or one EM chunk.
"""
from __future__ import annotations


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


def with_cancel_checks(model):
    """A clone of ``model`` that notices Cancel between the UNet's blocks and before and after every
    self- and cross-attention (the patches return their inputs unchanged; other patches keep their
    order)."""
    m = model.clone()
    m.set_model_input_block_patch(_block_check)
    m.set_model_output_block_patch(_output_block_check)
    m.set_model_attn1_patch(_attention_check)
    m.set_model_attn1_output_patch(_attention_output_check)
    m.set_model_attn2_patch(_attention_check)
    m.set_model_attn2_output_patch(_attention_output_check)
    return m
