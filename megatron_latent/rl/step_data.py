"""Per-step prompt preparation for GRPO: records -> chat prompts with images (over-length ones
skipped and counted), sampling settings, and completion text for the rewards."""

from __future__ import annotations

from megatron_latent.inference.loading import stop_ids
from megatron_latent.inference.prompts import build_prompt
from megatron_latent.inference.sampling import SamplingParams


class PromptBuilder:
    def __init__(self, tok_dir: str, mcfg, cfg):
        from transformers import AutoProcessor

        self.cfg = cfg
        self.processor = AutoProcessor.from_pretrained(tok_dir)
        self.processor.image_processor.size = {"shortest_edge": cfg.min_pixels,
                                               "longest_edge": cfg.max_pixels}
        self.tokenizer = self.processor.tokenizer  # the latent method adds its tokens
        self.pad_id = self.tokenizer.pad_token_id
        self.stop_ids = stop_ids(self.tokenizer)
        self.images_first = True  # the method's prompt layout (`prompt_images_first`)

    def build(self, records, allow_empty: bool = False):
        """-> (prompts, references, record ids, number skipped for length); none fitting is an
        error unless `allow_empty` (the caller draws more)."""
        limit = self.cfg.seq_length - self.cfg.max_new_tokens
        prompts, refs, ids, skipped = [], [], [], 0
        for rec in records:
            images = rec.open_images()  # paths, or parquet bytes decoded now (DataError if bad)
            p = build_prompt(self.processor, rec.question, images, system=self.cfg.system_prompt,
                             answer_prefix=self.cfg.answer_prefix,
                             images_first=self.images_first)
            if len(p.input_ids) > limit:
                skipped += 1
                continue
            prompts.append(p)
            refs.append(rec.reference)
            ids.append(rec.id)
        if not prompts and not allow_empty:
            raise ValueError(f"no prompt of this step fits seq_length {self.cfg.seq_length} - "
                             f"max_new_tokens {self.cfg.max_new_tokens} = {limit} tokens "
                             f"({skipped} skipped); raise --seq-length or shrink images")
        return prompts, refs, ids, skipped

    def sampling(self, iteration: int, dp_rank: int) -> SamplingParams:
        # the same seed on every TP/PP rank of a model replica: identical samples everywhere
        return SamplingParams(max_new_tokens=self.cfg.max_new_tokens,
                              temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                              top_k=self.cfg.top_k, stop_ids=self.stop_ids,
                              seed=self.cfg.seed * 1_000_003 + iteration * 1_009 + dp_rank)

    def completion_text(self, completion) -> str:
        """What the rewards see: the answer prefix (it opened the answer) + the decoded
        completion with special tokens kept (latent positions show as the method's latent token)."""
        return self.cfg.answer_prefix + self.tokenizer.decode(completion.tokens,
                                                              skip_special_tokens=False)
