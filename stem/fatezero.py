"""FateZero's attention fusion (Qi et al., ICCV 2023) on plain tensors. docs/FATEZERO.md is the
spec; its section numbers are cited as FZ §n.

FateZero edits from an inversion by replacing, during the first steps of the edit, the target
branch's attention maps with the source's at the same step:

- cross-attention (FZ §4): the target's probabilities over the 77 prompt tokens become
  ``alpha * R(P_src, P_own) + (1 - alpha) * P_own``, ``R`` a word swap (:func:`replacement_mapper`)
  or a refinement of aligned tokens (:func:`refinement_mapper`), optionally reweighted
  (:func:`equalizer`); ``alpha`` is 1 on the steps of the cross window (:func:`cross_replace_alpha`);
- self-attention (FZ §4, §8): in the self window the target attends with the SOURCE's map and its
  OWN values, ``O_fused = A_src V_edit``, blended per query token with its own attention by a mask
  from the source's cross-attention on chosen words (:func:`blend_mask`, :func:`fuse`).

With a STEM inversion a self-attention map is never a ``tokens x tokens`` matrix: each head
attends to M bases, ``O_src = P_src V_b`` with ``P_src = softmax(Q_src mu^T / sqrt d)`` and
``V_b = zn_src^T V_src`` (REFERENCE §4), so ``A_src = P_src zn_src^T`` and

    O_fused = A_src V_edit = P_src (zn_src^T V_edit),

the source's bases and responsibilities with the edit's values: ``stem.attention.stem_attention``
on ``(Q_src, K_src, V_edit)`` with the source layer's EM seed. The same holds for every attention
the inversion may have used (per-frame, inflated, sparse-causal): the fused output is that
attention on the source's queries and keys and the edit's values. Nothing ``tokens x tokens`` is
ever formed or kept across steps.

Prompts are handled as :class:`PromptTokens`: the words (split on spaces, as FateZero does) and
the CLIP tokens of the prompt, which the host reads off its own tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_TOKENS = 77  # one CLIP window: BOS, 75 tokens, EOS (padding after it)
REPLACE, REFINE = "replace", "refine"


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as FateZero aligns it (FZ §4): ``ids`` are its CLIP token ids with BOS first and
    EOS last (no padding); ``texts`` the decoded text of each token between them."""

    text: str
    ids: tuple[int, ...]
    texts: tuple[str, ...]

    @property
    def words(self) -> list[str]:
        return self.text.split(" ")

    def positions(self, word: str | int) -> list[int]:
        """Token positions (BOS = 0) of a word, given as its text (every occurrence) or its index
        among the words. FateZero's ``get_word_inds``: tokens are assigned to words by adding up
        their decoded lengths."""
        words = self.words
        places = {word} if isinstance(word, int) else {i for i, w in enumerate(words) if w == word}
        out: list[int] = []
        length, ptr = 0, 0
        for i, text in enumerate(self.texts):
            if ptr >= len(words):
                break
            length += len(text)
            if ptr in places:
                out.append(i + 1)
            if length >= len(words[ptr]):
                ptr, length = ptr + 1, 0
        return out


def replacement_mapper(source: PromptTokens, target: PromptTokens, max_len: int = MAX_TOKENS) -> torch.Tensor:
    """``[max_len, max_len]`` fp32: source token row -> target token column of a word swap (FZ §4,
    ``AttentionReplace``). Unchanged words map one to one; a swapped word's source tokens map to
    its target tokens (1 each when the counts match, else ``1 / len(target tokens)`` to every one).
    Quirk reproduced: past the last swapped word the diagonal ``(j, j)`` is set, which shifts the
    rest when a swapped word changed its token count."""
    words_s, words_t = source.words, target.words
    if len(words_s) != len(words_t):
        raise ValueError(f"a word swap needs prompts of as many words: the source has {len(words_s)} and the "
                         f"target {len(words_t)}")
    swapped = [i for i in range(len(words_t)) if words_t[i] != words_s[i]]
    src_pos = [source.positions(i) for i in swapped]
    tgt_pos = [target.positions(i) for i in swapped]
    mapper = torch.zeros(max_len, max_len)
    i = j = k = 0
    while i < max_len and j < max_len:
        if k < len(swapped) and src_pos[k] and src_pos[k][0] == i:
            s, t = src_pos[k], tgt_pos[k]
            if len(s) == len(t):
                mapper[s, t] = 1.0
            else:
                for col in t:
                    mapper[s, col] = 1.0 / len(t)
            k += 1
            i += len(s)
            j += len(t)
        elif k < len(swapped):
            mapper[i, j] = 1.0
            i += 1
            j += 1
        else:
            mapper[j, j] = 1.0
            i += 1
            j += 1
    return mapper


def _global_align(x: tuple[int, ...], y: tuple[int, ...]) -> list[tuple[int, int]]:
    """Needleman-Wunsch alignment of two token sequences (match 1, mismatch -1, gap 0), ties
    resolved left (gap in x), then up (gap in y), then diagonal, as FateZero's ``seq_aligner``.
    Returns ``(j, i)`` for every token j of y: its aligned token i of x, or -1."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        trace[0][j] = 1
    for i in range(1, n + 1):
        trace[i][0] = 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    pairs: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 or j > 0:
        t = trace[i][j]
        if t == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif t == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    return pairs[::-1]


def refinement_mapper(source: PromptTokens, target: PromptTokens,
                      max_len: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """FZ §4 ``AttentionRefine``: ``(mapper, alphas)``, ``[max_len]`` each. ``mapper[u]`` is the source
    token aligned with target token u (global alignment of the token ids, BOS and EOS included);
    ``alphas[u]`` is 0 for a target token with no source counterpart (it keeps its own column),
    1 elsewhere. Padding past the target's tokens maps one to one."""
    if len(target.ids) > max_len or len(source.ids) > max_len:
        raise ValueError(f"prompts longer than {max_len} tokens cannot be aligned")
    pairs = _global_align(source.ids, target.ids)
    mapper = torch.zeros(max_len, dtype=torch.int64)
    alphas = torch.ones(max_len)
    mapper[: len(pairs)] = torch.tensor([i for _, i in pairs], dtype=torch.int64)
    alphas[: len(pairs)] = torch.tensor([float(i != -1) for _, i in pairs])
    mapper[len(pairs):] = len(target.ids) + torch.arange(max_len - len(target.ids))
    return mapper, alphas


def equalizer(target: PromptTokens, words: list[str], values: list[float], max_len: int = MAX_TOKENS) -> torch.Tensor:
    """FZ §4 ``AttentionReweight``: ``[max_len]`` ones, ``values[i]`` at the tokens of ``words[i]``."""
    eq = torch.ones(max_len)
    for word, value in zip(words, values):
        eq[target.positions(word)] = float(value)
    return eq


def window(num: int, bounds: float | tuple[float, float]) -> tuple[int, int]:
    """``(int(start * num), int(end * num))`` of a fraction or a pair of fractions."""
    start, end = (0.0, bounds) if isinstance(bounds, (int, float)) else bounds
    return int(start * num), int(end * num)


def cross_replace_alpha(num_steps: int, bounds: float | tuple[float, float],
                        word_bounds: dict[tuple[int, ...], float | tuple[float, float]] | None = None,
                        max_len: int = MAX_TOKENS) -> torch.Tensor:
    """FZ §4: ``[num_steps + 1, max_len]``, 1 where step i replaces the target token's cross-attention.
    The window is counted over ``num_steps + 1`` rows (FateZero's ``get_time_words_attention_alpha``):
    0.8 of 50 steps is steps 0-39. ``word_bounds`` gives some target token positions windows of
    their own."""
    alpha = torch.zeros(num_steps + 1, max_len)
    start, end = window(num_steps + 1, bounds)
    alpha[start:end] = 1.0
    for positions, b in (word_bounds or {}).items():
        s, e = window(num_steps + 1, b)
        cols = list(positions)
        alpha[:, cols] = 0.0
        alpha[s:e, cols] = 1.0
    return alpha


@dataclass(frozen=True)
class CrossControl:
    """How the target's cross-attention takes the source's (FZ §4)."""

    kind: str  # REPLACE or REFINE
    mapper: torch.Tensor  # replace: [77, 77] fp32; refine: [77] source index of each target token
    refine_alphas: torch.Tensor | None = None  # refine: [77], 0 where a target token keeps its own column
    reweight: torch.Tensor | None = None  # [77] word weights, or None

    @classmethod
    def between(cls, source: PromptTokens, target: PromptTokens, kind: str,
                reweight: torch.Tensor | None = None) -> "CrossControl":
        if kind == REPLACE:
            return cls(REPLACE, replacement_mapper(source, target), reweight=reweight)
        if kind == REFINE:
            mapper, alphas = refinement_mapper(source, target)
            return cls(REFINE, mapper, alphas, reweight)
        raise ValueError(f"controller: '{kind}' is not '{REPLACE}' or '{REFINE}'")

    def __call__(self, p_src: torch.Tensor, p_own: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The target's probabilities ``[..., N, 77]`` from the source's and its own (same shape),
        computed in fp32; ``alpha`` ``[77]``: this step's window per target token."""
        p_src, own = p_src.float(), p_own.float()
        if self.kind == REPLACE:
            base = torch.einsum("...pw,wn->...pn", p_src, self.mapper.to(p_src.device))
        else:
            a = self.refine_alphas.to(p_src.device)
            base = p_src[..., self.mapper.to(p_src.device)] * a + own * (1 - a)
        if self.reweight is not None:
            base = base * self.reweight.to(p_src.device)
        alpha = alpha.to(p_src.device)
        return base * alpha + (1 - alpha) * own


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(q k^T / sqrt d)`` per head, fp32: ``q`` ``[B, N, heads*d]``, ``k`` ``[B, T, heads*d]``
    -> ``[B, heads, N, T]`` (FateZero's explicit cross-attention maps)."""
    B, N, E = q.shape
    d = E // heads
    qh = q.float().view(B, N, heads, d).transpose(1, 2)
    kh = k.float().view(B, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1)


def attend_probabilities(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p v`` per head: ``p`` ``[B, heads, N, T]``, ``v`` ``[B, T, heads*d]`` -> ``[B, N, heads*d]``
    in ``v``'s dtype."""
    B, heads, N, T = p.shape
    vh = v.float().view(B, T, heads, -1).transpose(1, 2)
    return (p @ vh).transpose(1, 2).reshape(B, N, -1).to(v.dtype)


def word_map(p: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """One layer's share of the blend map (FZ §5): cross-attention probabilities ``[F, heads, N, 77]``
    summed over the chosen words' columns (``words`` ``[77]``, 1 on them) and over heads: ``[F, N]``.
    The blend map is the sum of these over the mask layers divided by their heads in all."""
    return (p.float() * words.to(p.device)).sum(-1).sum(1)


def blend_mask(summed: torch.Tensor, count: int, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """FZ §5: the mask ``[F, h*w]`` in {0, 1} (1: the edit's own attention) at a layer of ``size``
    ``(h, w)`` tokens, from the source's word maps ``summed`` ``[F, h0, w0]`` over ``count`` layer
    heads: their mean, a 3x3 max-pool, a nearest resize, divided by each frame's maximum, above
    ``threshold``. A threshold of 1 or more gives 0 everywhere (the source's attention alone)."""
    maps = (summed.float() / count)[None]
    pooled = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    resized = F.interpolate(pooled, size=size)[0]
    normed = resized / resized.amax(dim=-2, keepdim=True).amax(dim=-1, keepdim=True)
    return normed.gt(threshold).float().flatten(1)


def fuse(own: torch.Tensor, fused: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """FZ §4: the target's self-attention output in the self window, ``m * own + (1 - m) * fused``
    per query token (``own``, ``fused`` ``[F, N, C]``; ``mask`` ``[F, N]``); without a mask, the
    fused output alone. Blending outputs equals FateZero's blend of probability rows, because
    ``m`` is constant along a row."""
    if mask is None:
        return fused
    m = mask.to(own.device, own.dtype)[..., None]
    return m * own + (1 - m) * fused


def latent_blend_window(num_steps: int, start: float = 0.2, end: float = 0.8) -> range:
    """FZ §5: the steps after which the latents are blended, ``int(start*S) < i+1 < int(end*S)``."""
    return range(int(start * num_steps), max(int(start * num_steps), int(end * num_steps) - 1))


def blend_latents(x_inv: torch.Tensor, x_edit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FZ §5: ``x_inv + m * (x_edit - x_inv)``; ``mask`` ``[F, 1, h, w]`` (1: the edit)."""
    m = mask.to(x_edit.device, x_edit.dtype)
    return x_inv.to(x_edit) + m * (x_edit - x_inv.to(x_edit))
