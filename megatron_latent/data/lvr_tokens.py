"""LVR special tokens and the other token ids the data pipeline needs; HF processing loading."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LVR_TOKENS = ("<|lvr_start|>", "<|lvr|>", "<|lvr_end|>")


def _single_id(tokenizer, token: str) -> int:  # noqa: see latent.tokens.single_id
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or tokenizer.encode(token, add_special_tokens=False) != [i]:
        raise ValueError(f"{token} does not tokenize to one id with this tokenizer "
                         f"(got {tokenizer.encode(token, add_special_tokens=False)})")
    return i


def add_lvr_tokens(tokenizer, vocab_size: int) -> dict[str, int]:
    """Add <|lvr_start|>, <|lvr|>, <|lvr_end|> (in that order, special) at the first free ids;
    idempotent. `vocab_size` = the config's embedding rows: we never resize embeddings."""
    missing = [t for t in LVR_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        first = len(tokenizer)
        if first + len(missing) > vocab_size:
            raise ValueError(f"cannot add {missing}: they would take ids {first}.."
                             f"{first + len(missing) - 1}, but the model has only {vocab_size} "
                             "embedding rows (config vocab_size); embeddings are never resized")
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = {t: _single_id(tokenizer, t) for t in LVR_TOKENS}
    if too_big := {t: i for t, i in ids.items() if i >= vocab_size}:
        raise ValueError(f"LVR token ids {too_big} are >= vocab_size {vocab_size}")
    return ids


@dataclass(frozen=True)
class TokenIds:
    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    lvr_start: int
    lvr: int
    lvr_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> "TokenIds":
        lvr = add_lvr_tokens(tokenizer, vocab_size)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        names = dict(im_start="<|im_start|>", im_end="<|im_end|>", vision_start="<|vision_start|>",
                     vision_end="<|vision_end|>", image_pad="<|image_pad|>")
        return cls(pad=tokenizer.pad_token_id, **{k: _single_id(tokenizer, t) for k, t in names.items()},
                   lvr_start=lvr["<|lvr_start|>"], lvr=lvr["<|lvr|>"], lvr_end=lvr["<|lvr_end|>"])


def load_hf_processing(hf_dir):
    """(tokenizer, image_processor, vocab_size) from a Hugging Face Qwen2.5-VL checkpoint dir."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hf_dir)
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    vocab = cfg.get("text_config", {}).get("vocab_size") or cfg.get("vocab_size")
    if not vocab:
        raise ValueError(f"{hf_dir}/config.json has no vocab_size")
    return proc.tokenizer, proc.image_processor, int(vocab)
