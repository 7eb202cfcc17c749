"""3-D (temporal, height, width) rope positions for Qwen2.5-VL's mRoPE, written from the rule:

- every non-image token (text, special tokens, latent tokens added later) takes position p on
  all three axes, then p += 1;
- a run of image-pad tokens of one image with merged grid (t, gh, gw) at current position p gets
  (p + i_t, p + i_h, p + i_w) in row-major order, then p += max(gh, gw) (t is 1 for images);
- padding (attention_mask == 0) gets position 0 on every axis, and does not advance p.

Returns positions [3, b, s] and, per sample, `delta = max position + 1 - number of real tokens`,
the offset that cached decoding adds to 1-D positions of newly generated tokens.
"""

from __future__ import annotations

import torch


def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, *,
               image_token_id: int, spatial_merge_size: int,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b, s = input_ids.shape
    positions = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, 1, dtype=torch.long)
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    ids_cpu = input_ids.cpu()
    mask = None if attention_mask is None else attention_mask.cpu().bool()
    for row in range(b):
        keep = torch.arange(s) if mask is None else mask[row].nonzero().squeeze(1)
        ids = ids_cpu[row, keep]
        is_image = (ids == image_token_id).tolist()
        out = torch.empty(3, len(ids), dtype=torch.long)
        p = i = 0
        while i < len(ids):
            if not is_image[i]:
                out[:, i] = p
                p += 1
                i += 1
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError(f"sample {row}: more image-pad runs than entries in "
                                 "image_grid_thw") from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            n = t * gh * gw
            if is_image[i:i + n] != [True] * n or (i + n < len(ids) and is_image[i + n]):
                raise ValueError(f"sample {row}: image-pad run at token {i} does not match "
                                 f"image_grid_thw {[t, h, w]} ({n} merged tokens expected)")
            ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw),
                                        indexing="ij")
            out[:, i:i + n] = torch.stack([ti, hi, wi]).view(3, n) + p
            p += max(gh, gw)
            i += n
        positions[:, row, keep] = out
        deltas[row] = (out.max() + 1 - len(ids)) if len(ids) else 0
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more images than image-pad runs in input_ids")
    return positions.to(input_ids.device), deltas.to(input_ids.device)
