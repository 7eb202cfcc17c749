"""DeepLatent micro-batches from prepared samples (deeplatent_data.py), with the fields of the
contract in docs/deeplatent.md. `ids` is the dataset's token-id dict (`DeepLatentDataset.ids`),
`merge` the ViT's spatial merge size.

Common fields: input_ids, labels [b, s] long (pad id after each sample), loss_mask [b, s] float32,
attention_mask [b, s] long, position_ids [3, b, s] (mRoPE, padding 0), pixel_values
[sum n_patches, 1176] and image_grid_thw [n_images, 3] (sample order, each sample's images in
sequence order), sample_ids list[str], teacher_grids list[list[(H, W)]] (per row, per assistant
image / latent block in order), sources.
"""

from __future__ import annotations

import torch

from megatron_latent.data.collate import pad_rows
from megatron_latent.data.deeplatent_tokens import END, PAD, PLACEHOLDERS, START
from megatron_latent.models.qwen25vl.rope_index import rope_index


def collate_stage1(samples: list[dict], ids: dict, merge: int, pad_to: int | None = None) -> dict:
    """Common fields plus teacher_mask [b, s] bool: the <|image_pad|> slots of assistant images
    (row-major within an image, images in order; the teacher-state order)."""
    input_ids, labels, loss_mask, attention_mask, teacher_mask, grids = _padded(
        samples, ids, pad_to, "teacher_mask")
    position_ids, _ = rope_index(input_ids, grids, image_token_id=ids["<|image_pad|>"],
                                 spatial_merge_size=merge, attention_mask=attention_mask)
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "attention_mask": attention_mask, "position_ids": position_ids,
            "teacher_mask": teacher_mask, **_per_sample(samples, grids)}


def collate_stage2(samples: list[dict], ids: dict, merge: int, pad_to: int | None = None, *,
                   image_like: bool = True) -> dict:
    """Common fields (images: the question images only) plus
    latent_mask [b, s] bool: the <|latent_pad|> slots (row-major, blocks in order);
    blocks [n_blocks, 4] long: (row, position of <latent>, H, W), rows then blocks in order;
    per block, of its row's question images: question_features (LongTensor: rows of the
    micro-batch's concatenated merged image features), feature_coords ([n_f, 2] long: their
    merged-grid (r, c)), feature_grid ((h_I, w_I) of the row's first question image; the
    block's own (H, W) in a row without question images: its latents then sit at their own
    cells and have no features to attend to).
    Grid slots get image-like mRoPE positions unless `image_like` is False (then text-like)."""
    input_ids, labels, loss_mask, attention_mask, latent_mask, grids = _padded(
        samples, ids, pad_to, "latent_mask")
    latent_grids = [g for x in samples for g in x["teacher_grids"]]
    position_ids, _ = rope_index(input_ids, grids, image_token_id=ids["<|image_pad|>"],
                                 spatial_merge_size=merge, attention_mask=attention_mask,
                                 latent_pad_id=ids[PAD] if image_like else None,
                                 latent_grids=latent_grids if image_like else None)
    blocks = block_table(samples, ids)
    features = question_features(samples, merge)
    rows = blocks[:, 0].tolist()
    frames = [features[r][2] or (h, w) for r, _, h, w in blocks.tolist()]
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "attention_mask": attention_mask, "position_ids": position_ids,
            "latent_mask": latent_mask, "blocks": blocks,
            "question_features": [features[r][0] for r in rows],
            "feature_coords": [features[r][1] for r in rows],
            "feature_grid": frames, **_per_sample(samples, grids)}


def pack_stage1(samples: list[dict], ids: dict, merge: int, pad_to_multiple: int = 8) -> dict:
    """Stage-1 samples in one THD row (b = 1), as data/packing.py packs LVR's: the stage-1
    fields plus cu_seqlens [n + 1] int32 (a trailing padding segment if the row was rounded up)
    and max_seqlen. sample_ids and teacher_grids are per packed sample (segment), in order."""
    if not samples:
        raise ValueError("pack needs at least one sample")
    cols = {k: [x[k] for x in samples] for k in ("input_ids", "labels", "loss_mask", "teacher_mask")}
    pos = [rope_index(x["input_ids"][None], x["image_grid_thw"].long() if len(x["image_grid_thw"])
                      else None, image_token_id=ids["<|image_pad|>"], spatial_merge_size=merge)[0]
           for x in samples]
    lengths = [len(x["input_ids"]) for x in samples]
    total = sum(lengths)
    if pad := -total % pad_to_multiple:
        for k, fill in (("input_ids", ids["pad"]), ("labels", ids["pad"]), ("loss_mask", 0),
                        ("teacher_mask", False)):
            cols[k].append(torch.full((pad,), fill, dtype=cols[k][0].dtype))
        pos.append(torch.zeros(3, 1, pad, dtype=torch.long))
        lengths.append(pad)
    row = {k: torch.cat(v)[None] for k, v in cols.items()}
    for x, n in zip(samples, row["teacher_mask"][0].split(lengths)):
        _check_slots(n[None], [x], "teacher_mask")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return {**row, "loss_mask": row["loss_mask"].float(),
            "attention_mask": (torch.arange(row["input_ids"].shape[1]) < total).long()[None],
            "position_ids": torch.cat(pos, dim=2), "cu_seqlens": cu, "max_seqlen": max(lengths),
            **_per_sample(samples, _image_grids(samples))}


def block_table(samples: list[dict], ids: dict) -> torch.Tensor:
    """[n_blocks, 4] (row, position of <latent>, H, W), each block's layout checked."""
    out = []
    placeholders = [ids[t] for t in PLACEHOLDERS]
    for r, x in enumerate(samples):
        seq = x["input_ids"].tolist()
        starts = [p for p, t in enumerate(seq) if t == ids[START]]
        if len(starts) != len(x["teacher_grids"]):
            raise ValueError(f"sample {x.get('source')}: {len(starts)} <latent> tokens but "
                             f"{len(x['teacher_grids'])} grids")
        for p, (h, w) in zip(starts, x["teacher_grids"]):
            body = seq[p + 1:p + 5 + h * w]
            if body != placeholders + [ids[PAD]] * (h * w) + [ids[END]]:
                raise ValueError(f"sample {x.get('source')}: the block at {p} is not <latent>, "
                                 f"3 placeholders, {h}x{w} pads, </latent>")
            out.append((r, p, h, w))
    return torch.tensor(out, dtype=torch.long).view(-1, 4)


def question_features(samples: list[dict], merge: int) -> list[tuple]:
    """Per row: (rows of its question images in the concatenated merged features [n_f] long,
    their merged-grid (r, c) [n_f, 2] long, (h_I, w_I) of its first question image or None)."""
    out, offset = [], 0
    for x in samples:
        coords = []
        for t, gh, gw in x["image_grid_thw"].tolist():
            r, c = torch.meshgrid(torch.arange(gh // merge), torch.arange(gw // merge), indexing="ij")
            coords.append(torch.stack([r.flatten(), c.flatten()], 1).repeat(t, 1))
        coords = torch.cat(coords) if coords else torch.zeros(0, 2, dtype=torch.long)
        first = x["image_grid_thw"][0].tolist() if len(x["image_grid_thw"]) else None
        grid = (first[1] // merge, first[2] // merge) if first else None
        out.append((torch.arange(offset, offset + len(coords)), coords, grid))
        offset += len(coords)
    return out


def _padded(samples: list[dict], ids: dict, pad_to, mask_key: str):
    """Right-padded ids, labels, loss mask, attention mask, the stage's slot mask (checked
    against the samples' grids) and the image grids."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    input_ids, labels, loss_mask, attention_mask = pad_rows(samples, ids["pad"], pad_to)
    mask = _pad_mask(samples, mask_key, input_ids.shape[1])
    _check_slots(mask, samples, mask_key)
    return input_ids, labels, loss_mask, attention_mask, mask, _image_grids(samples)


def _pad_mask(samples: list[dict], key: str, s: int) -> torch.Tensor:
    out = torch.zeros(len(samples), s, dtype=torch.bool)
    for r, x in enumerate(samples):
        out[r, :len(x[key])] = x[key]
    return out


def _check_slots(mask: torch.Tensor, samples: list[dict], what: str) -> None:
    got = mask.sum(1).tolist()
    want = [sum(h * w for h, w in x["teacher_grids"]) for x in samples]
    if got != want:
        bad = [x.get("source") for x, g, w in zip(samples, got, want) if g != w]
        raise ValueError(f"{what} slots per row {got} != sum H*W of teacher_grids {want} in {bad}")


def _image_grids(samples: list[dict]) -> torch.Tensor:
    return torch.cat([x["image_grid_thw"] for x in samples]).long()


def _per_sample(samples: list[dict], grids: torch.Tensor) -> dict:
    pixels = torch.cat([x["pixel_values"] for x in samples])
    if len(pixels) != int(grids.prod(-1).sum()):
        raise ValueError(f"{len(pixels)} pixel rows but image_grid_thw has "
                         f"{int(grids.prod(-1).sum())} patches")
    return {"pixel_values": pixels, "image_grid_thw": grids,
            "sample_ids": [x["sample_id"] for x in samples],
            "teacher_grids": [list(x["teacher_grids"]) for x in samples],
            "sources": [x.get("source") for x in samples]}
