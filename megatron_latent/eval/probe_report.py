"""The latent probe's result (probe_runner.run_probe) as a text table and as a PNG (drawn with PIL,
which the project has anyway: no plotting library needed)."""

from __future__ import annotations

RUNS = (("as_generated", "as generated"), ("zeros", "zeros"), ("mean", "mean latent"),
        ("shuffled", "shuffled"), ("span_removed", "span removed"))
KINDS = (("teacher_forced", "teacher-forced"), ("generated", "generated"),
         ("targets", "targets (ceiling)"))
HOMOGENEITY = (("generated", "generated"), ("teacher_forced", "teacher-forced"),
               ("targets", "targets"))
NORMS = (("latents_generated", "latents as generated"),
         ("latents_teacher_forced", "latents teacher-forced"), ("targets", "targets"),
         ("text_embeddings", "text token embeddings"), ("image_features", "image features"))


def _f(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def table(res: dict) -> str:
    d = res["decode"]
    lines = [f"latent probe: {res['method']}, {res['items_probed']} items "
             f"({res['items_without_span']} without a latent span left out), decode "
             f"{d['mode']} x{d['steps']}, {res['mean_latents_per_item']:.1f} latents per item",
             "", f"{'answer accuracy':<22}{'correct':>10}{'accuracy':>10}{'changed':>10}"]
    for key, label in RUNS:
        a = res["accuracy"].get(key)
        if a is None:
            lines.append(f"  {label:<20}{'(not run: needs 2 items with latents)':>30}")
            continue
        changed = "-" if key == "as_generated" else _f(a["changed"], True)
        lines.append(f"  {label:<20}{a['correct']:>5}/{a['total']:<4}{_f(a['accuracy'], True):>10}"
                     f"{changed:>10}")
    lines += ["", f"{'homogeneity (cosine)':<22}{'within span':>13}{'across samples':>16}"]
    for key, label in HOMOGENEITY:
        h = res["homogeneity"].get(key)
        if h is not None:
            lines.append(f"  {label:<20}{_f(h['within_span']):>13}{_f(h['across_samples']):>16}")
    g = res["grounding"]
    lines.append("")
    if g is None:
        lines.append("grounding: the method has no latent targets")
    else:
        lines.append(f"{'grounding (span mean)':<22}{'among':>9}{'top-1':>8}{'chance':>8}"
                     f"{'cos own':>9}{'cos other':>11}")
        for key, label in KINDS:
            for among in ("regions", "samples"):
                r = (g.get(key) or {}).get(among)
                if r is not None:
                    lines.append(f"  {label:<20}{among:>9}{_f(r['top1'], True):>8}"
                                 f"{_f(r['chance'], True):>8}{_f(r['cos_own']):>9}"
                                 f"{_f(r['cos_other']):>11}")
        lines.append(f"  teacher-forced slot cosine to its own target: "
                     f"{_f(g['teacher_forced']['slot_cos_own'])}")
    lines += ["", "scale (mean L2 norm)"]
    for key, label in NORMS:
        lines.append(f"  {label:<26}{_f(res['scale'].get(key)):>10}")
    return "\n".join(lines)


def plot(res: dict, path) -> None:
    """Four bar panels: accuracy per run, homogeneity, retrieval top-1 (with chance), norms."""
    from PIL import Image, ImageDraw

    acc = [(label, (res["accuracy"].get(k) or {}).get("accuracy")) for k, label in RUNS]
    hom = [(f"{label} {w}", (res["homogeneity"].get(k) or {}).get(f))
           for k, label in HOMOGENEITY for w, f in (("within", "within_span"),
                                              ("across", "across_samples"))]
    g = res["grounding"] or {}
    top = [(f"{label} {among}", ((g.get(k) or {}).get(among) or {}).get("top1"))
           for k, label in KINDS for among in ("regions", "samples")]
    chance = [((g.get(k) or {}).get(among) or {}).get("chance")
              for k, _ in KINDS for among in ("regions", "samples")]
    norms = [(label, res["scale"].get(k)) for k, label in NORMS]
    panels = [("answer accuracy", acc, 1.0, None), ("homogeneity (mean cosine)", hom, 1.0, None),
              ("grounding: top-1 retrieval (| = chance)", top, 1.0, chance),
              ("scale: mean L2 norm", norms, None, None)]
    width, row, pad = 760, 18, 10
    heights = [pad * 3 + row * (1 + len(p[1])) for p in panels]
    img = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(img)
    y = 0
    for (title, bars, top_value, marks), h in zip(panels, heights):
        draw.text((pad, y + pad), title, fill="black")
        known = [v for _, v in bars if v is not None]
        scale = top_value or max([abs(v) for v in known] + [1e-9])
        x0, x1 = 220, width - 80
        for i, (label, v) in enumerate(bars):
            yy = y + pad * 2 + row * (i + 1)
            draw.text((pad, yy), label, fill="black")
            if v is None:
                draw.text((x0, yy), "n/a", fill="grey")
                continue
            frac = max(0.0, min(1.0, v / scale))
            draw.rectangle([x0, yy + 2, x0 + frac * (x1 - x0), yy + row - 4], fill=(70, 110, 180))
            draw.text((x1 + 6, yy), f"{v:.3f}", fill="black")
            if marks and marks[i] is not None:
                xm = x0 + min(1.0, marks[i] / scale) * (x1 - x0)
                draw.line([xm, yy, xm, yy + row - 2], fill=(200, 40, 40), width=2)
        y += h
    img.save(path, format="PNG")
