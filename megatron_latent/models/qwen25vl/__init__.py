"""Megatron-native Qwen2.5-VL (vision tower + Qwen2 LLM with mRoPE)."""

from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

__all__ = ["Qwen25VLConfig"]
