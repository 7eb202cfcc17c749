"""Latent-aware generation: KV-cache decoding of the Megatron Qwen2.5-VL (see generator.py)."""
