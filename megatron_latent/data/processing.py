"""The HF processing (tokenizer, image processor) and vocabulary size of a checkpoint dir."""

from __future__ import annotations

import json
from pathlib import Path


def load_hf_processing(hf_dir):
    """(tokenizer, image_processor, vocab_size) from a Hugging Face Qwen2.5-VL checkpoint dir."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(hf_dir)
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    vocab = cfg.get("text_config", {}).get("vocab_size") or cfg.get("vocab_size")
    if not vocab:
        raise ValueError(f"{hf_dir}/config.json has no vocab_size")
    return proc.tokenizer, proc.image_processor, int(vocab)
