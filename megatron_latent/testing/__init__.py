"""Helpers for tests and demos (tiny offline checkpoints)."""
