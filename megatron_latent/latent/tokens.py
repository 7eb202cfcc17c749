"""Adding a latent method's tokens to a tokenizer: in the method's order, special or not as the
method's released checkpoints have them, at the first free ids, never resizing the embeddings."""

from __future__ import annotations


def single_id(tokenizer, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or tokenizer.encode(token, add_special_tokens=False) != [i]:
        raise ValueError(f"{token} does not tokenize to one id with this tokenizer "
                         f"(got {tokenizer.encode(token, add_special_tokens=False)})")
    return i


def add_tokens(tokenizer, tokens: tuple[str, ...], vocab_size: int, *,
               special: bool) -> dict[str, int]:
    """Add the missing `tokens` (in this order) and return every token's id; idempotent.
    `vocab_size` = the config's embedding rows: ids must stay below it. The order fixes the ids
    (released checkpoints depend on it), so tokens already present must sit at consecutive ids
    in that order too."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        first = len(tokenizer)
        if first + len(missing) > vocab_size:
            raise ValueError(f"cannot add {missing}: they would take ids {first}.."
                             f"{first + len(missing) - 1}, but the model has only {vocab_size} "
                             "embedding rows (config vocab_size); embeddings are never resized")
        tokenizer.add_tokens(missing, special_tokens=special)
    ids = {t: single_id(tokenizer, t) for t in tokens}
    if too_big := {t: i for t, i in ids.items() if i >= vocab_size}:
        raise ValueError(f"token ids {too_big} are >= vocab_size {vocab_size}")
    order = [ids[t] for t in tokens]
    if order != list(range(order[0], order[0] + len(order))):
        raise ValueError(f"tokens {tokens} have ids {order}, not consecutive in this order: the "
                         "tokenizer was extended differently from this method's checkpoints")
    return ids
