"""A UNet call over a clip in passes of at most n frames, its self-attention still over all frames.

Layer-synchronous execution: the APPLY_MODEL wrapper cuts the batch into passes of
n frames of every cond chunk and runs each pass's UNet forward as a greenlet. At each
self-attention, before its projections, the pass hands the layer's input (the norm output) to
:class:`LayerSync` and suspends (:func:`projection_meeting`); when every pass has reached that
layer, the layer's keys and values of all passes are projected and condensed once (STEM: EM
over the keys of every pass, ``stem.attention.stem_bases``; inflated: all frames' keys and
values), and each pass resumes, projects its own queries and attends to what was shared
(``stem.attention.attend_shared``). One pass computes at a time; a suspended pass holds only
its own activations (its skip connections, the residual and the norm output of the waiting
layer), not its q, k, v. Where groups of frames may straddle passes (STEM's "chunks of n
frames") the passes meet in the attention replacement with q, k, v instead
(:func:`attention_meeting`). The UNet's forward, ComfyUI's classes and functions are left as
they are: a wrapper and attention patches on the clone only.

Cancel is checked at every layer meeting, so it stops a long step within one layer. At a meeting
where the process's resident memory has grown enough since the last time
(:class:`stem.allocator.HandBack`), the pages that the passes freed between the blocks they hold
go back to the system (``stem.allocator.return_free_memory``).
"""
from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...stem.allocator import HandBack, return_free_memory
from .cancel import interrupted
from .layer import chunk_count, site_key
from .unet import attn1_modules

PASSES_KEY = "stem_passes"  # transformer_options entry of a pass: its LayerSync
SHARED_KEY = "stem_layer_shared"  # extra_options of one layer in a pass: what the meeting handed back
WRAPPER_KEY = "comfyui-stem.passes"


class PassesOutOfStep(RuntimeError):
    """The passes of one UNet call did not meet at the same layers."""


@dataclass
class Meeting:
    """What a pass brings to a layer: the layer, how to combine, and its own tensors."""

    key: tuple
    combine: Callable[[list], list]  # payloads of all passes -> one output per pass
    payload: Any


class LayerSync:
    """Runs the passes of one UNet call as greenlets that meet at every self-attention."""

    def __init__(self, check_interrupt: Callable[[], None] = interrupted, attn1: Callable | None = None):
        self.check_interrupt = check_interrupt
        self.attn1 = attn1  # site -> that layer's attention module, for meetings before its projections

    @staticmethod
    def meet(key: tuple, combine: Callable[[list], list], payload) -> Any:
        """Called by a hook inside a pass: suspend until every pass is here, get this pass's
        share of the combined result."""
        import greenlet

        return greenlet.getcurrent().parent.switch(Meeting(key, combine, payload))

    def run(self, passes: list[Callable[[], Any]], entering: Callable[[int], None] | None = None) -> list:
        """Run the passes to their ends, meeting where they meet; ``entering(i)`` is called each
        time pass i is about to compute (state that must follow the pass, like its hints)."""
        import greenlet

        gls = []
        for fn in passes:
            g = greenlet.greenlet(fn)
            g.gr_context = contextvars.copy_context()  # a pass sees the caller's context variables
            gls.append(g)

        def resume(i: int, *value):
            if entering is not None:
                entering(i)
            return gls[i].switch(*value)

        hand_back = HandBack()
        try:
            values = [resume(i) for i in range(len(gls))]
            while True:
                meeting = [isinstance(v, Meeting) for v in values]
                if not any(meeting):
                    return values
                keys = {v.key if isinstance(v, Meeting) else "finished" for v in values}
                if not all(meeting) or len(keys) != 1:
                    raise PassesOutOfStep(f"the passes of one UNet call reached different layers: {sorted(map(str, keys))}")
                self.check_interrupt()
                outs = values[0].combine([v.payload for v in values])
                del meeting, keys
                for v in values:  # a resumed pass frees what it brought while the others still wait
                    v.payload = None
                # what the passes freed between the blocks they hold goes back to the system once
                # it adds up (glibc keeps such pages: stem.allocator)
                if hand_back.due():
                    return_free_memory()
                    hand_back.done()
                values = []
                for i in range(len(gls)):
                    out, outs[i] = outs[i], None  # held by pass i alone from here
                    values.append(resume(i, out))
                    del out
                del outs
        finally:
            for g in gls:  # unwind passes left suspended (Cancel, an error): their memory goes now
                if g and not g.dead:
                    g.throw(greenlet.GreenletExit)


def pass_rows(num_rows: int, num_chunks: int, frames_per_pass: int) -> list[torch.Tensor]:
    """Row indices of each pass: frames [s, s+n) of every cond chunk of the batch."""
    if num_chunks < 1 or num_rows % num_chunks:
        raise ValueError(f"a batch of {num_rows} rows does not split into {num_chunks} equal chunks")
    F = num_rows // num_chunks
    n = max(1, int(frames_per_pass))
    return [torch.cat([torch.arange(c * F + s, c * F + min(s + n, F)) for c in range(num_chunks)])
            for s in range(0, F, n)]


def _cut(value, rows: torch.Tensor, num_rows: int):
    """``value`` restricted to ``rows`` wherever it has one entry per row of the batch."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.ndim and value.shape[0] == num_rows else value
    if isinstance(value, list):
        return [_cut(v, rows, num_rows) for v in value]
    if isinstance(value, tuple):
        return tuple(_cut(v, rows, num_rows) for v in value)
    if isinstance(value, dict):
        return {k: _cut(v, rows, num_rows) for k, v in value.items()}
    return value


def make_pass_wrapper(frames_per_pass: Callable[[torch.Tensor, dict], int], synchronised: bool):
    """APPLY_MODEL wrapper that runs the call in passes of ``frames_per_pass(x, options)``
    frames of every chunk (no split when that covers them all). ``synchronised``: the passes
    meet at each self-attention (STEM, inflated); otherwise the attention of a pass needs only
    its own frames (per-frame, or groups aligned with the passes) and they run one by one."""

    def run_in_passes(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        chunks = chunk_count(transformer_options)
        B = x.shape[0]
        n = frames_per_pass(x, transformer_options)
        if n <= 0 or n >= B // chunks:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        sync = LayerSync(attn1=attn1_modules(executor.class_obj.diffusion_model).__getitem__) if synchronised else None

        def one_pass(rows):
            options = _cut(dict(transformer_options), rows, B)
            if sync is not None:
                options[PASSES_KEY] = sync
            return lambda: executor(x[rows], _cut(t, rows, B), _cut(c_concat, rows, B), _cut(c_crossattn, rows, B),
                                    _cut(control, rows, B), options, **_cut(kwargs, rows, B))

        rows = pass_rows(B, chunks, n)
        if sync is not None:
            outs = sync.run([one_pass(r) for r in rows])
        else:
            outs = []
            for r in rows:
                interrupted()
                outs.append(one_pass(r)())
        out = outs[0].new_empty((B, *outs[0].shape[1:]))
        for r, o in zip(rows, outs):
            out[r.to(out.device)] = o
        return out

    return run_in_passes


def joined(parts: list[torch.Tensor], num_chunks: int) -> torch.Tensor:
    """The passes' ``[(c f_p), ...]`` tensors as the one-pass ``[(c F), ...]`` batch."""
    return torch.cat([x.view(num_chunks, x.shape[0] // num_chunks, *x.shape[1:]) for x in parts], dim=1).flatten(0, 1)


def parted(whole: torch.Tensor, like: list[torch.Tensor], num_chunks: int) -> list[torch.Tensor]:
    """Inverse of :func:`joined`: each pass's rows of a one-pass batch."""
    sizes = [x.shape[0] // num_chunks for x in like]
    chunks = whole.view(num_chunks, whole.shape[0] // num_chunks, *whole.shape[1:]).split(sizes, dim=1)
    return [c.flatten(0, 1) for c in chunks]


def projection_meeting(n, context, value, extra_options: dict, shared: Callable[[list, list, dict], Any]):
    """The body of an attn1 patch (it runs before the layer's q, k, v projections). In a pass of
    a synchronised call, meet the other passes holding only the projections' inputs; at the
    meeting the layer's keys and values of every pass are projected (by the layer's own module,
    weight patches included; each pass's values as a function that projects them when they are
    used) and ``shared(keys, values, extra_options)`` makes what every pass
    attends to (STEM's bases, or all frames' keys and values). It is left in ``extra_options``
    under :data:`SHARED_KEY` for the attn1 replacement, and the pass projects only its queries
    (one token of keys and values, unused). Outside such a call nothing changes."""
    sync = extra_options.get(PASSES_KEY)
    if sync is None or sync.attn1 is None:
        return n, context, value
    context = n if context is None else context
    value = context if value is None else value
    site = site_key(extra_options)

    def combine(payloads: list) -> list:
        attn = sync.attn1(site)
        keys = [attn.to_k(c) for c, _, _ in payloads]
        # values are projected when they are used (STEM: EM's last iteration, a pass at a time)
        values = [functools.partial(attn.to_v, v) for _, v, _ in payloads]
        made = shared(keys, values, payloads[0][2])
        return [made] * len(payloads)

    extra_options[SHARED_KEY] = sync.meet(site, combine, (context, value, extra_options))
    return n, context[:, :1], value[:, :1]


def attention_meeting(extra_options: dict, q, k, v, combine: Callable[[list], list]):
    """In a pass of a synchronised call, meet the other passes at this layer with (q, k, v,
    extra_options) and get this pass's output; None outside such a call."""
    sync = extra_options.get(PASSES_KEY)
    if sync is None:
        return None
    return sync.meet(site_key(extra_options), combine, (q, k, v, extra_options))
