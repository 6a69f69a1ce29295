"""What TokenFlow's passes and hooks did during an edit, observed from outside the pack.

``TokenFlowProbe(monkeypatch, pack)`` wraps, for the test's duration, the guider's steps and
UNet calls, the hook functions and the feature module of ``nodes/host``, and records:
- ``passes``: ``(step, kind, batch)`` of every UNet call of a pass (a keyframe pass in several
  passes gives one entry per pass);
- ``calls(hook)``: ``{(step, kind): {site: count}}`` for the hooks "norm", "attn" and "out" (each
  call), "pnp_qk" (an edit branch attended with the source's queries and keys) and
  "pnp_features" (the edit branches' residual branch came out equal to the source's);
- ``split_calls``: UNet calls that ran the source branch alone.
"""
from __future__ import annotations

import collections

import torch

import comfy_harness as harness


class TokenFlowProbe:
    def __init__(self, monkeypatch, pack):
        mod = lambda name: harness.pack_submodule(pack, name)  # noqa: E731
        guider, hooks, layer = mod("nodes.host.tokenflow_guider"), mod("nodes.host.tokenflow_hooks"), mod("nodes.host.layer")
        self.passes: list[tuple[int, str, int]] = []
        self.split_calls = 0
        self._counts: dict = collections.defaultdict(collections.Counter)
        self._step = -1
        self._site = None
        self._kind = None
        probe = self

        real_predict = guider.TokenFlowGuider.predict_noise

        def predict_noise(g, *args, **kwargs):
            probe._step += 1
            return real_predict(g, *args, **kwargs)

        real_calls = guider.TokenFlowGuider.calls

        def calls(g, step, ctx, *args, **kwargs):
            probe.passes.append((probe._step, ctx.kind, ctx.batch))
            return real_calls(g, step, ctx, *args, **kwargs)

        monkeypatch.setattr(guider.TokenFlowGuider, "predict_noise", predict_noise)
        monkeypatch.setattr(guider.TokenFlowGuider, "calls", calls)

        import comfy.samplers

        real_calc = comfy.samplers.calc_cond_batch

        def calc_cond_batch(model, conds, *args, **kwargs):
            if len(conds) == 3 and conds[0] is None and conds[1] is None and conds[2] is not None:
                probe.split_calls += 1
            return real_calc(model, conds, *args, **kwargs)

        monkeypatch.setattr(comfy.samplers, "calc_cond_batch", calc_cond_batch)

        def counted(name: str, real):
            def hook(*args):
                ctx = args[-1].get(hooks.CONTEXT_KEY) if isinstance(args[-1], dict) else None
                if ctx is not None:
                    probe._site, probe._kind = layer.site_key(args[-1]), ctx.kind
                    probe._counts[name][(probe._step, ctx.kind, probe._site)] += 1
                return real(*args)
            return hook

        for name, attr in (("norm", "norm_patch"), ("attn", "attn_replace"), ("out", "output_patch")):
            monkeypatch.setattr(hooks, attr, counted(name, getattr(hooks, attr)))

        real_kf, real_kf_passes = hooks.keyframe_attention, hooks.keyframe_attention_passes

        def keyframe_attention(q, k, v, heads, source_qk=None, precision=None):
            if source_qk is not None:
                probe._counts["pnp_qk"][(probe._step, probe._kind, probe._site)] += 1
            return real_kf(q, k, v, heads, source_qk, precision)

        def keyframe_attention_passes(qs, ks, vs, heads, source_qks, precision=None):
            injected = sum(s is not None for s in source_qks)
            if injected:
                probe._counts["pnp_qk"][(probe._step, probe._kind, probe._site)] += injected
            return real_kf_passes(qs, ks, vs, heads, source_qks, precision)

        monkeypatch.setattr(hooks, "keyframe_attention", keyframe_attention)
        monkeypatch.setattr(hooks, "keyframe_attention_passes", keyframe_attention_passes)

        real_forward = hooks.FeatureInjection.forward

        def forward(module, h):
            out = real_forward(module, h)
            current = hooks._current_pass.get()
            if current is not None:
                ctx, layout = current
                parts = dict(zip(layout, out.chunk(len(layout))))
                source = ctx.source.features
                if source is not None and any(torch.equal(p, source.to(p.dtype)) for c, p in parts.items()
                                              if c != hooks.SOURCE):
                    probe._counts["pnp_features"][(probe._step, ctx.kind, "features")] += 1
            return out

        monkeypatch.setattr(hooks.FeatureInjection, "forward", forward)

    def calls(self, hook: str) -> dict:
        """``{(step, kind): {site: count}}`` of one hook over the edit."""
        out: dict = {}
        for (step, kind, site), n in self._counts[hook].items():
            out.setdefault((step, kind), {})[site] = n
        return out
