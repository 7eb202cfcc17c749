"""Our 3-D rope index: a hand-worked example, and agreement with transformers' get_rope_index."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.models.qwen25vl.rope_index import rope_index

IMG = 9  # image-pad id in these hand-made examples


def test_hand_worked_example():
    # 2 text tokens, one image with patch grid (1, 4, 6) -> merged 2 x 3 = 6 tokens, 2 text tokens
    ids = torch.tensor([[1, 2] + [IMG] * 6 + [3, 4]])
    pos, delta = rope_index(ids, torch.tensor([[1, 4, 6]]), image_token_id=IMG,
                            spatial_merge_size=2)
    t = [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
    h = [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]
    w = [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert pos[:, 0].tolist() == [t, h, w]
    # image advances p by max(2, 3) = 3: the last position is 6 for 10 tokens
    assert delta.item() == 6 + 1 - 10


def test_padding_and_latent_like_tokens_advance_like_text():
    # id 7 stands for a latent token added later: it is text for positions
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, 7, 7, 2, 0, 0]])
    mask = torch.tensor([[1] * 8 + [0, 0]])
    pos, _ = rope_index(ids, torch.tensor([[1, 4, 4]]), image_token_id=IMG,
                        spatial_merge_size=2, attention_mask=mask)
    assert pos[0, 0].tolist() == [0, 1, 1, 1, 1, 3, 4, 5, 0, 0]
    assert pos[1, 0, 5:8].tolist() == [3, 4, 5] and pos[2, 0, 5:8].tolist() == [3, 4, 5]


@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_transformers(tiny_ckpts, side):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from megatron_latent.testing.samples import photos

    path = tiny_ckpts["tiny-a"]
    processor = AutoProcessor.from_pretrained(path)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a b c"},
                                          {"type": "image"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "only one"}, {"type": "image"}]}]]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
    enc = processor(text=texts, images=photos(), return_tensors="pt", padding=True,
                    padding_side=side)
    ref, ref_delta = hf.model.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                             enc["image_grid_thw"],
                                             attention_mask=enc["attention_mask"])
    got, delta = rope_index(enc["input_ids"], enc["image_grid_thw"],
                            image_token_id=hf.config.image_token_id, spatial_merge_size=2,
                            attention_mask=enc["attention_mask"])
    assert torch.equal(got, ref)
    assert torch.equal(delta, ref_delta.to(delta.dtype))


def test_grid_mismatch_is_named():
    ids = torch.tensor([[1, IMG, IMG, IMG, 2]])
    with pytest.raises(ValueError, match=r"image-pad run at token 1 does not match image_grid_thw \[1, 4, 4\]"):
        rope_index(ids, torch.tensor([[1, 4, 4]]), image_token_id=IMG, spatial_merge_size=2)
    with pytest.raises(ValueError, match="more image-pad runs"):
        rope_index(ids, None, image_token_id=IMG, spatial_merge_size=2)
    with pytest.raises(ValueError, match="more images than image-pad runs"):
        rope_index(torch.tensor([[1, 2]]), torch.tensor([[1, 2, 2]]), image_token_id=IMG,
                   spatial_merge_size=2)


LAT, PAD = 7, 8  # <latent> and <|latent_pad|> in these hand-made examples


def test_oracle15_latent_grid_positions():
    # spec oracle 15: 5 text tokens, <latent> + 3 placeholders, a block H=2, W=3 at p=9, </latent>
    ids = torch.tensor([[1, 2, 3, 4, 5, LAT, 6, 6, 6] + [PAD] * 6 + [LAT + 10, 5]])
    pos, delta = rope_index(ids, None, image_token_id=IMG, spatial_merge_size=2,
                            latent_pad_id=PAD, latent_grids=[(2, 3)])
    slots = pos[:, 0, 9:15].T.tolist()  # row-major (i, j) -> (9, 9 + i, 9 + j)
    assert slots == [[9, 9 + i, 9 + j] for i in range(2) for j in range(3)]
    assert slots[5] == [9, 10, 11]  # slot (1, 2)
    assert pos[:, 0, 15].tolist() == [12] * 3 and pos[:, 0, 16].tolist() == [13] * 3  # </latent>
    assert delta.item() == 13 + 1 - 17
    # without latent_pad_id the pads are text (the old behaviour)
    text, _ = rope_index(ids, None, image_token_id=IMG, spatial_merge_size=2)
    assert text[0, 0].tolist() == list(range(17))


def test_latent_grids_with_images_over_a_batch():
    # row 0: image then two blocks; row 1 (left padded): one block; grids in batch order
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, 2, PAD, PAD, 3, PAD, PAD, PAD, PAD, 4],
                        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, PAD, PAD, 3]])
    mask = (torch.arange(14) >= 9).long()[None].repeat(2, 1)
    mask[0] = 1
    pos, _ = rope_index(ids, torch.tensor([[1, 4, 4]]), image_token_id=IMG, spatial_merge_size=2,
                        attention_mask=mask, latent_pad_id=PAD, latent_grids=[(1, 2), (2, 2), (2, 1)])
    assert pos[:, 0, 6:8].T.tolist() == [[4, 4, 4], [4, 4, 5]]  # 1x2 block at p = 4
    assert pos[:, 0, 8].tolist() == [6] * 3  # p + max(1, 2)
    assert pos[:, 0, 9:13].T.tolist() == [[7, 7, 7], [7, 7, 8], [7, 8, 7], [7, 8, 8]]
    assert pos[:, 0, 13].tolist() == [9] * 3
    assert pos[:, 1, 11:13].T.tolist() == [[2, 2, 2], [2, 3, 2]]  # 2x1 block
    assert pos[:, 1, :9].abs().sum() == 0 and pos[:, 1, 13].tolist() == [4] * 3


def test_latent_grid_mismatch_is_named():
    ids = torch.tensor([[1, LAT, PAD, PAD, PAD, 2]])
    kw = dict(image_token_id=IMG, spatial_merge_size=2, latent_pad_id=PAD)
    with pytest.raises(ValueError, match=r"latent-pad run at token 2 does not match latent_grids \[2, 2\]"):
        rope_index(ids, None, latent_grids=[(2, 2)], **kw)
    with pytest.raises(ValueError, match="more latent-pad runs than entries in latent_grids"):
        rope_index(ids, None, latent_grids=[], **kw)
    with pytest.raises(ValueError, match="latent_grids has more grids than latent-pad runs"):
        rope_index(ids, None, latent_grids=[(1, 3), (1, 1)], **kw)
    with pytest.raises(ValueError, match="needs latent_pad_id"):
        rope_index(ids, None, image_token_id=IMG, spatial_merge_size=2, latent_grids=[(1, 3)])
