"""DeepLatent's tokens (docs/deeplatent.md): added in this order, non-special, in free embedding
rows (ids 151665..151670 on Qwen2.5-VL's tokenizer). Generation never samples the last four."""

LATENT_TOKENS = ("<latent>", "</latent>", "<|latent_scale|>", "<|latent_qmod|>", "<|latent_imod|>",
                 "<|latent_pad|>")
START, END, SCALE, QMOD, IMOD, PAD = LATENT_TOKENS
PLACEHOLDERS = (SCALE, QMOD, IMOD)  # at <latent> + 1, + 2, + 3; the first pad at + 4
