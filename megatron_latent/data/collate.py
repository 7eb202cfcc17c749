"""Right-padded micro-batches from prepared LVR samples (see lvr_dataset.py)."""

from __future__ import annotations

import functools

import torch

from megatron_latent.models.qwen25vl.rope_index import rope_index


def collate(samples: list[dict], *, pad_id: int, image_token_id: int, lvr_token_id: int,
            spatial_merge_size: int, pad_to: int | None = None) -> dict:
    """Micro-batch dict:

    input_ids, labels [b, s] long (pad_id after each sample); loss_mask [b, s] float32;
    attention_mask [b, s] long (1 = real token); latent_mask [b, s] bool (<|lvr|> tokens);
    position_ids [3, b, s] long (mRoPE, padding 0); pixel_values [sum n_patches, 1176] float32
    and image_grid_thw [n_images, 3] long, concatenated in sample order; latent_index [n_lat]
    long: per <|lvr|> token in b-major order, its target row in the micro-batch's concatenated
    merged image features; sources: list of (file, record index).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    input_ids, labels, loss_mask, attention_mask = pad_rows(samples, pad_id, pad_to)
    latent_mask = (input_ids == (-1 if lvr_token_id is None else lvr_token_id)) & attention_mask.bool()
    latent_index = latent_targets(samples, latent_mask, spatial_merge_size)
    image_grid_thw = torch.cat([x["image_grid_thw"] for x in samples]).long()
    position_ids, _ = rope_index(input_ids, image_grid_thw, image_token_id=image_token_id,
                                 spatial_merge_size=spatial_merge_size,
                                 attention_mask=attention_mask)
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "attention_mask": attention_mask, "position_ids": position_ids,
            "pixel_values": torch.cat([x["pixel_values"] for x in samples]),
            "image_grid_thw": image_grid_thw, "latent_index": latent_index,
            "latent_mask": latent_mask, "sources": [x.get("source") for x in samples]}


def pad_rows(samples: list[dict], pad_id: int, pad_to: int | None = None):
    """Right-padded input_ids, labels [b, s] long, loss_mask [b, s] float32, attention_mask
    [b, s] long (1 = real token) of prepared samples (any dataset's)."""
    lengths = [len(x["input_ids"]) for x in samples]
    s = max(lengths) if pad_to is None else pad_to
    for n, x in zip(lengths, samples):
        if n > s:
            raise ValueError(f"sample {x.get('source')} has {n} tokens > pad_to {pad_to}")
    b = len(samples)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    labels = torch.full((b, s), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(b, s, dtype=torch.float32)
    attention_mask = torch.zeros(b, s, dtype=torch.long)
    for r, (n, x) in enumerate(zip(lengths, samples)):
        input_ids[r, :n], labels[r, :n], loss_mask[r, :n] = x["input_ids"], x["labels"], x["loss_mask"]
        attention_mask[r, :n] = 1
    return input_ids, labels, loss_mask, attention_mask


def latent_targets(samples: list[dict], latent_mask: torch.Tensor,
                   spatial_merge_size: int) -> torch.Tensor:
    """The micro-batch's latent_index: each sample's targets offset by the merged image features
    of the samples before it (features are concatenated in sample order), checked against the
    <|lvr|> tokens of `latent_mask` and the feature count."""
    merge2 = spatial_merge_size ** 2
    latent, offset = [], 0
    for x in samples:
        latent.append(x["latent_index"] + offset)
        offset += int(x["image_grid_thw"].prod(-1).sum()) // merge2
    latent_index = torch.cat(latent)
    where = [x.get("source") for x in samples]
    if int(latent_mask.sum()) != latent_index.numel():
        raise ValueError(f"{int(latent_mask.sum())} <|lvr|> tokens but {latent_index.numel()} "
                         f"latent targets in samples {where}")
    if latent_index.numel() and not 0 <= int(latent_index.min()) <= int(latent_index.max()) < offset:
        raise ValueError(f"latent_index out of range [0, {offset}) in {where}")
    return latent_index


def make_collate(dataset, pad_to: int | None = None):
    """collate bound to a dataset's token ids (DataLoader(collate_fn=make_collate(ds)))."""
    return functools.partial(collate, pad_to=pad_to, **dataset.collate_kwargs)
