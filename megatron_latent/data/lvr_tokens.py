"""LVR special tokens and the other token ids the data pipeline needs; HF processing loading."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_latent.data.processing import load_hf_processing  # noqa: F401  (re-export)
from megatron_latent.latent.tokens import add_tokens, single_id

LVR_TOKENS = ("<|lvr_start|>", "<|lvr|>", "<|lvr_end|>")


def add_lvr_tokens(tokenizer, vocab_size: int) -> dict[str, int]:
    """Add <|lvr_start|>, <|lvr|>, <|lvr_end|> (in that order, special) at the first free ids;
    idempotent. `vocab_size` = the config's embedding rows: we never resize embeddings."""
    return add_tokens(tokenizer, LVR_TOKENS, vocab_size, special=True)


@dataclass(frozen=True)
class TokenIds:
    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    lvr_start: int | None  # None: a run without LVR's tokens (latent method "none")
    lvr: int | None
    lvr_end: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, latent: bool = True) -> "TokenIds":
        lvr = add_lvr_tokens(tokenizer, vocab_size) if latent else dict.fromkeys(LVR_TOKENS)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        names = dict(im_start="<|im_start|>", im_end="<|im_end|>", vision_start="<|vision_start|>",
                     vision_end="<|vision_end|>", image_pad="<|image_pad|>")
        return cls(pad=tokenizer.pad_token_id, **{k: single_id(tokenizer, t) for k, t in names.items()},
                   lvr_start=lvr["<|lvr_start|>"], lvr=lvr["<|lvr|>"], lvr_end=lvr["<|lvr_end|>"])
