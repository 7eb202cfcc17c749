"""THD packing against the padded collate: every packed segment holds exactly its sample's
tokens, labels, loss mask and per-sample mRoPE positions, and the latent targets point at the
same image-feature rows."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.data import LvrSftDataset, collate
from megatron_latent.data.packing import pack, segment_sums


def test_packed_segments_equal_collated_samples(tiny_ckpts, synthetic_lvr):
    ds = LvrSftDataset.from_hf_dir(synthetic_lvr / "meta.json", tiny_ckpts["tiny-a"],
                                   seq_length=4096, min_pixels=56 * 56,
                                   max_pixels=224 * 224)
    samples = [ds[i] for i in range(3)]
    packed = pack(samples, pad_to_multiple=64, **ds.collate_kwargs)
    cu = packed["cu_seqlens"].tolist()
    lengths = [len(x["input_ids"]) for x in samples]
    assert cu[:4] == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert cu[-1] == packed["input_ids"].shape[1] and cu[-1] % 64 == 0
    merge2 = ds.collate_kwargs["spatial_merge_size"] ** 2
    offset = 0
    for k, x in enumerate(samples):
        one = collate([x], **ds.collate_kwargs)
        seg = slice(cu[k], cu[k + 1])
        for key in ("input_ids", "labels", "loss_mask", "latent_mask"):
            assert torch.equal(packed[key][:, seg], one[key]), key
        assert torch.equal(packed["position_ids"][:, :, seg], one["position_ids"])
        n_lat = one["latent_index"].numel()
        lat = packed["latent_index"][sum(s["latent_index"].numel() for s in samples[:k]):][:n_lat]
        assert torch.equal(lat - offset, one["latent_index"])
        offset += int(x["image_grid_thw"].prod(-1).sum()) // merge2
    assert packed["loss_mask"][:, cu[3]:].sum() == 0  # the padding segment trains nothing
    sums = segment_sums(torch.ones_like(packed["loss_mask"]), packed["loss_mask"],
                        packed["cu_seqlens"])
    assert sums[:3].tolist() == [float(x["loss_mask"].sum()) for x in samples]


def test_pack_and_collate_refuse_a_latent_target_outside_the_images(tiny_ckpts, synthetic_lvr):
    ds = LvrSftDataset.from_hf_dir(synthetic_lvr / "meta.json", tiny_ckpts["tiny-a"],
                                   seq_length=4096, min_pixels=56 * 56, max_pixels=224 * 224)
    x = next(ds[i] for i in range(len(ds)) if ds[i]["latent_index"].numel())
    n_feat = int(x["image_grid_thw"].prod(-1).sum()) // ds.collate_kwargs["spatial_merge_size"] ** 2
    bad = {**x, "latent_index": x["latent_index"].clone()}
    bad["latent_index"][-1] = n_feat  # one past the last merged image token
    for build in (pack, collate):
        with pytest.raises(ValueError, match=rf"latent_index out of range \[0, {n_feat}\)"):
            build([bad], **ds.collate_kwargs)
