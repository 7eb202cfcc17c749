"""A prepared LVR sample as the model sees it: tokens, CE targets, image grids, latent targets
(used by tools/inspect_data.py)."""

from __future__ import annotations

import bisect

from megatron_latent.data.llava_records import bbox_token_indices


def describe_sample(dataset, i: int) -> dict:
    smp, rec = dataset[i], dataset.record(i)
    tok, ids_ = dataset.tokenizer, dataset.ids
    m, patch = dataset.merge, dataset.patch
    ids, labels = smp["input_ids"].tolist(), smp["labels"].tolist()
    lm = [int(v) for v in smp["loss_mask"].tolist()]
    images, offsets, off = [], [], 0
    for k, (t, h, w) in enumerate(smp["image_grid_thw"].tolist()):
        n = t * h * w // m ** 2
        images.append(dict(image=k, path=rec.images[k], resized_hw=[h * patch, w * patch],
                           grid_thw=[t, h, w], merged_hw=[h // m, w // m], n_tokens=n,
                           feature_offset=off))
        offsets.append(off)
        off += n
    boxes = []
    for j, (k, xyxy) in enumerate(rec.boxes):
        idx = bbox_token_indices(xyxy, images[k]["grid_thw"][1:], m)
        w2 = images[k]["merged_hw"][1]
        boxes.append(dict(box=j, image=k, xyxy=list(xyxy), n_tokens=len(idx),
                          rows=[idx[0] // w2, idx[-1] // w2], cols=[idx[0] % w2, idx[-1] % w2]))
    latents = []
    positions = [p for p, v in enumerate(ids) if v == ids_.lvr]
    for p, g in zip(positions, smp["latent_index"].tolist()):
        k = bisect.bisect_right(offsets, g) - 1
        row, col = divmod(g - offsets[k], images[k]["merged_hw"][1])
        latents.append(dict(pos=p, feature_index=g, image=k, local_index=g - offsets[k],
                            row=row, col=col))
    tokens = [dict(pos=p, id=v, text=tok.decode([v]), ce_target=bool(p and lm[p - 1]),
                   label=labels[p], loss_mask=lm[p]) for p, v in enumerate(ids)]
    return dict(source=dict(file=smp["source"][0], index=smp["source"][1]), length=len(ids),
                seq_length=dataset.seq_length, n_ce_targets=sum(lm), n_latent=len(latents),
                images=images, boxes=boxes, latents=latents, tokens=tokens)


def format_description(d: dict) -> str:
    out = [f"{d['source']['file']} record {d['source']['index']}: {d['length']} tokens "
           f"(seq_length {d['seq_length']}), {d['n_ce_targets']} CE targets, "
           f"{d['n_latent']} latent tokens"]
    for im in d["images"]:
        out.append(f"  image {im['image']}: {im['path']} resized {im['resized_hw'][1]}x"
                   f"{im['resized_hw'][0]} (WxH), grid_thw {im['grid_thw']}, merged "
                   f"{im['merged_hw'][0]}x{im['merged_hw'][1]} = {im['n_tokens']} tokens, "
                   f"features {im['feature_offset']}..{im['feature_offset'] + im['n_tokens'] - 1}")
    for b in d["boxes"]:
        out.append(f"  box {b['box']} on image {b['image']}: {b['xyxy']} -> {b['n_tokens']} tokens,"
                   f" rows {b['rows'][0]}..{b['rows'][1]}, cols {b['cols'][0]}..{b['cols'][1]}")
    out.append("  pos    id  ce  token   (ce: this token is a CE target; -> latent target)")
    lat = {x["pos"]: x for x in d["latents"]}
    toks, p = d["tokens"], 0
    while p < len(toks):
        t = toks[p]
        q = p
        while q + 1 < len(toks) and toks[q + 1]["id"] == t["id"] and t["text"] == "<|image_pad|>":
            q += 1
        mark = "*" if t["ce_target"] else " "
        if q > p:
            out.append(f"  {p:>5}-{q:<5} {t['id']:>5}  {mark}  {t['text']} x{q - p + 1}")
        else:
            extra = ""
            if p in lat:
                x = lat[p]
                extra = (f"  -> feature {x['feature_index']} (image {x['image']}, row {x['row']},"
                         f" col {x['col']})")
            out.append(f"  {p:>5} {t['id']:>7}  {mark}  {t['text']!r}{extra}")
        p = q + 1
    return "\n".join(out)
