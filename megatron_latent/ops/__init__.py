"""Fused GPU ops in Triton (each checked on the CPU through Triton's interpreter)."""
