"""THD sequence packing: several prepared samples in one [1, T] row with `cu_seqlens`, so no
compute goes to padding. Each sample keeps its own mRoPE positions (computed per sample, then
concatenated) and its own latent targets (latent_index offset by the image features of the
samples before it). Attention stays within a sample: TE's THD attention reads cu_seqlens
(megatron PackedSeqParams, TE spec only).
"""

from __future__ import annotations

import torch

from megatron_latent.data.collate import latent_targets
from megatron_latent.models.qwen25vl.rope_index import rope_index


def pack(samples: list[dict], *, pad_id: int, image_token_id: int, lvr_token_id: int,
         spatial_merge_size: int, pad_to_multiple: int = 8) -> dict:
    """Samples (LvrSftDataset items) -> one packed micro-batch (b = 1) with the collate keys plus
    cu_seqlens [n + 1] int32 (a trailing padding segment if T was rounded up) and max_seqlen."""
    if not samples:
        raise ValueError("pack needs at least one sample")
    ids, labels, loss, pos, lengths = [], [], [], [], []
    for x in samples:
        n = len(x["input_ids"])
        grid = x["image_grid_thw"].long()
        p, _ = rope_index(x["input_ids"][None], grid if len(grid) else None,
                          image_token_id=image_token_id, spatial_merge_size=spatial_merge_size)
        ids.append(x["input_ids"])
        labels.append(x["labels"])
        loss.append(x["loss_mask"])
        pos.append(p)
        lengths.append(n)
    total = sum(lengths)
    pad = -total % pad_to_multiple
    if pad:
        ids.append(torch.full((pad,), pad_id, dtype=torch.long))
        labels.append(torch.full((pad,), pad_id, dtype=torch.long))
        loss.append(torch.zeros(pad))
        pos.append(torch.zeros(3, 1, pad, dtype=torch.long))
        lengths.append(pad)
    input_ids = torch.cat(ids)[None]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    latent_mask = input_ids == (-1 if lvr_token_id is None else lvr_token_id)
    latent_index = latent_targets(samples, latent_mask, spatial_merge_size)
    return {"input_ids": input_ids, "labels": torch.cat(labels)[None],
            "loss_mask": torch.cat(loss)[None].float(),
            "attention_mask": (torch.arange(input_ids.shape[1]) < total).long()[None],
            "position_ids": torch.cat(pos, dim=2),
            "pixel_values": torch.cat([x["pixel_values"] for x in samples]),
            "image_grid_thw": torch.cat([x["image_grid_thw"] for x in samples]).long(),
            "latent_index": latent_index, "latent_mask": latent_mask,
            "cu_seqlens": cu, "max_seqlen": max(lengths),
            "sources": [x.get("source") for x in samples]}


def packed_seq_params(batch: dict):
    """megatron's PackedSeqParams (THD) for a packed micro-batch; None for a padded one."""
    if "cu_seqlens" not in batch:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(batch["max_seqlen"]),
                           max_seqlen_kv=int(batch["max_seqlen"]))


def segment_sums(per_token: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor):
    """Per-sample sums of a [1, T] per-token quantity over `mask`, by packed segment."""
    vals = (per_token.float() * mask.float())[0]
    return torch.stack([vals[int(a):int(b)].sum() for a, b in zip(cu_seqlens[:-1],
                                                                    cu_seqlens[1:])])
