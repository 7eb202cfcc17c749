"""3-D (temporal, height, width) rope positions for Qwen2.5-VL's mRoPE, written from the rule:

- every non-image token (text, special tokens, latent tokens added later) takes position p on
  all three axes, then p += 1;
- a run of image-pad tokens of one image with merged grid (t, gh, gw) at current position p gets
  (p + i_t, p + i_h, p + i_w) in row-major order, then p += max(gh, gw) (t is 1 for images);
- optionally (`latent_pad_id`, `latent_grids`), a run of latent-pad tokens of a latent grid
  (H, W) is positioned like an image of merged grid (1, H, W): slot (i, j) gets (p, p + i, p + j)
  and p += max(H, W) (DeepLatent's grid slots, spec 2.5: where the stage-1 teacher had the
  assistant image, so aligned positions share their positional structure);
- padding (attention_mask == 0) gets position 0 on every axis, and does not advance p.

Returns positions [3, b, s] and, per sample, `delta = max position + 1 - number of real tokens`,
the offset that cached decoding adds to 1-D positions of newly generated tokens.
"""

from __future__ import annotations

import torch

_TEXT, _IMAGE, _LATENT = 0, 1, 2


def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, *,
               image_token_id: int, spatial_merge_size: int,
               attention_mask: torch.Tensor | None = None, latent_pad_id: int | None = None,
               latent_grids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`image_grid_thw` [n_images, 3] (patch units) and `latent_grids` (merged (H, W) per
    latent-pad run) list the runs of the whole batch in order: row by row, left to right.
    Without `latent_pad_id`, latent pads are text-like."""
    if latent_grids is not None and latent_pad_id is None:
        raise ValueError("latent_grids needs latent_pad_id")
    if latent_pad_id is not None and latent_pad_id == image_token_id:
        raise ValueError(f"latent_pad_id {latent_pad_id} is the image-pad id")
    b, s = input_ids.shape
    positions = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, 1, dtype=torch.long)
    m = spatial_merge_size
    runs = {_IMAGE: iter([(t, h // m, w // m, [t, h, w]) for t, h, w in
                          ([] if image_grid_thw is None else image_grid_thw.tolist())]),
            _LATENT: iter([(1, int(h), int(w), [int(h), int(w)]) for h, w in latent_grids or ()])}
    names = {_IMAGE: ("image-pad", "image_grid_thw", "images"),
             _LATENT: ("latent-pad", "latent_grids", "grids")}
    ids_cpu = input_ids.cpu()
    mask = None if attention_mask is None else attention_mask.cpu().bool()
    for row in range(b):
        keep = torch.arange(s) if mask is None else mask[row].nonzero().squeeze(1)
        ids = ids_cpu[row, keep]
        kind = ((ids == image_token_id).long()
                + (2 * (ids == latent_pad_id).long() if latent_pad_id is not None else 0)).tolist()
        out = torch.empty(3, len(ids), dtype=torch.long)
        p = i = 0
        while i < len(ids):
            k = kind[i]
            if k == _TEXT:
                out[:, i] = p
                p += 1
                i += 1
                continue
            pad, field, _ = names[k]
            try:
                t, gh, gw, shown = next(runs[k])
            except StopIteration:
                raise ValueError(f"sample {row}: more {pad} runs than entries in {field}") from None
            n = t * gh * gw
            if kind[i:i + n] != [k] * n or (i + n < len(ids) and kind[i + n] == k):
                raise ValueError(f"sample {row}: {pad} run at token {i} does not match "
                                 f"{field} {shown} ({n} merged tokens expected)")
            ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw),
                                        indexing="ij")
            out[:, i:i + n] = torch.stack([ti, hi, wi]).view(3, n) + p
            p += max(gh, gw)
            i += n
        positions[:, row, keep] = out
        deltas[row] = (out.max() + 1 - len(ids)) if len(ids) else 0
    for k, (pad, field, what) in names.items():
        if next(runs[k], None) is not None:
            raise ValueError(f"{field} has more {what} than {pad} runs in input_ids")
    return positions.to(input_ids.device), deltas.to(input_ids.device)
