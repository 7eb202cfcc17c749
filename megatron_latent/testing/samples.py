"""Real-photo vision-language batches for tests and demos (scikit-image ships the photos)."""

from __future__ import annotations

from megatron_latent.data.sample_inputs import photos, sample_photo, two_sample_batch

__all__ = ["photos", "sample_photo", "two_sample_batch", "MICRO_BATCH_KEYS",
           "two_sample_micro_batch"]

# what a training step reads from a micro-batch (training/step.py)
MICRO_BATCH_KEYS = ("input_ids", "labels", "loss_mask", "pixel_values", "image_grid_thw",
                    "position_ids")


def two_sample_micro_batch(processor, cfg, seq_length: int | None = None) -> dict:
    """`two_sample_batch` with only the fields a training step reads."""
    batch = two_sample_batch(processor, cfg, seq_length)
    return {k: batch[k] for k in MICRO_BATCH_KEYS}
