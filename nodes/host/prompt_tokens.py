"""A prompt as FateZero aligns it, read off the CLIP's own tokenizer, with its conditioning."""
from __future__ import annotations

from ...stem.fatezero import MAX_TOKENS, PromptTokens
from .pack import StemError


def _tokenizer(clip):
    """``(key, SDTokenizer)`` of the CLIP's first CLIP-L/H/G tokenizer: the key of its tokens in
    ``clip.tokenize``'s result and the tokenizer that made them."""
    for name in ("clip_l", "clip_h", "clip_g"):
        tok = getattr(clip.tokenizer, name, None)
        if tok is not None and hasattr(tok, "tokenizer"):
            return name[len("clip_"):], tok
    raise StemError("clip: FateZero Edit needs an SD1.x, SD2.x or SDXL CLIP (a CLIP-L, -H or -G tokenizer) to align "
                    "the prompts' words; load it with the checkpoint")


def encode(clip, text: str, input_name: str):
    """``(PromptTokens, CONDITIONING)`` of one prompt, refused when it is longer than one CLIP window
    (FateZero aligns 77 tokens)."""
    key, tok = _tokenizer(clip)
    tokens = clip.tokenize(text)
    windows = tokens[key]
    if len(windows) != 1:
        raise StemError(f"{input_name}: the prompt is longer than one CLIP window of {MAX_TOKENS} tokens; FateZero "
                        "aligns the words of one window: shorten it")
    ids = [int(t[0]) if not hasattr(t[0], "shape") else -1 for t in windows[0]]
    if tok.end_token not in ids[1:]:
        raise StemError(f"{input_name}: the prompt fills its CLIP window; shorten it")
    ids = ids[: ids.index(tok.end_token, 1) + 1]
    if -1 in ids:
        raise StemError(f"{input_name}: textual-inversion embeddings cannot be aligned word by word; write the "
                        "prompt in words")
    texts = tuple(tok.tokenizer.decode([i]).strip("#") for i in ids[1:-1])
    return PromptTokens(text, tuple(ids), texts), clip.encode_from_tokens_scheduled(tokens)


def word_columns(prompt: PromptTokens, words: list[str], input_name: str, prompt_name: str):
    """The token positions of ``words`` in ``prompt``, refused when a word is not in it."""
    columns = []
    for word in words:
        found = prompt.positions(word)
        if not found:
            raise StemError(f"{input_name}: '{word}' is not a word of the {prompt_name} ('{prompt.text}'); words are "
                            "matched as the prompt writes them, separated by spaces")
        columns += found
    return columns


def split_words(text: str) -> list[str]:
    """Words given in a text input: separated by commas or spaces."""
    return [w for w in text.replace(",", " ").split() if w]
