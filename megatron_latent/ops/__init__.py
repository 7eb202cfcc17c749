"""Fused GPU ops written in Triton (each with a CPU-interpreter check in megatron_latent.testing)."""
