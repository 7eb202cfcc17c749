"""The latent-ablation benchmark's report (benchmarks/latent_ablation.py): a probe result ->
flat metrics with their n/a reasons, the mean +- std over seeds, the markdown table."""

from __future__ import annotations

import statistics

ACCURACY = ("as_generated", "zeros", "mean", "shuffled", "span_removed")
# the table's rows: (key, label, kind) — kind "pct" for accuracies, "f" for the rest
METRICS = (
    [(f"acc.{k}", f"accuracy: {k.replace('_', ' ')}", "pct") for k in ACCURACY]
    + [("homog.within", "homogeneity: within span (generated)", "f"),
       ("homog.across", "homogeneity: across samples (generated)", "f"),
       ("ground.regions_top1", "grounding top-1 among regions (teacher-forced)", "pct"),
       ("ground.regions_chance", "  chance", "pct"),
       ("ground.samples_top1", "grounding top-1 among samples (teacher-forced)", "pct"),
       ("ground.samples_chance", "  chance", "pct"),
       ("scale.latent_over_target", "scale: latent / target norm (teacher-forced)", "f"),
       ("scale.latent_over_text", "scale: latent / text-embedding norm (generated)", "f"),
       ("latents_per_item", "latents per item (generated)", "f")])
NO_LATENTS = "no latents"
PROBE_LIMITS = {
    "deeplatent": {
        "grounding": "no probe targets for DeepLatent (method.probe_targets: None; the "
                     "teacher-forced probe reads the state before each slot, not its "
                     "LatentFormer latents)",
        "scale.latent_over_target": "no probe targets for DeepLatent",
    },
}


def _mean(v):
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else None


def _ratio(a, b):
    return None if a is None or not b else a / b


# ---------------------------------------------------------------------- training


def metrics_of(arm: str, res: dict) -> tuple[dict, dict]:
    """A probe result -> (flat metrics {key: float | None}, n/a reasons {key: reason})."""
    acc, m, na = res["accuracy"], {}, {}
    limits = PROBE_LIMITS.get(arm, {})
    base = acc["as_generated"]["accuracy"]
    no_latents = bool(res.get("no_latents"))
    for k in ACCURACY:
        if k == "as_generated":
            m["acc.as_generated"] = base
        elif no_latents:  # no latents: every ablation is the identity
            m[f"acc.{k}"] = base
            na[f"acc.{k}"] = "="
        elif acc.get(k) is None:
            m[f"acc.{k}"] = None
            na[f"acc.{k}"] = limits.get("ablations", "not run (needs 2 items with latents)")
        else:
            m[f"acc.{k}"] = acc[k]["accuracy"]
            m[f"changed.{k}"] = acc[k]["changed"]
    hom = (res.get("homogeneity") or {}).get("generated") or {}
    m["homog.within"], m["homog.across"] = hom.get("within_span"), hom.get("across_samples")
    g = res.get("grounding")
    tf = (g or {}).get("teacher_forced") or {}
    for among in ("regions", "samples"):
        r = tf.get(among) or {}
        m[f"ground.{among}_top1"], m[f"ground.{among}_chance"] = r.get("top1"), r.get("chance")
    m["ground.generated_samples_top1"] = (((g or {}).get("generated") or {}).get("samples")
                                          or {}).get("top1")
    sc = res.get("scale") or {}
    m["scale.latent_over_target"] = _ratio(sc.get("latents_teacher_forced"), sc.get("targets"))
    m["scale.latent_over_text"] = _ratio(sc.get("latents_generated"), sc.get("text_embeddings"))
    m["latents_per_item"] = res["mean_latents_per_item"]
    for key in [k for k, v in m.items() if v is None and k not in na]:
        if no_latents:
            na[key] = NO_LATENTS
        elif key.startswith("ground.") and "grounding" in limits:
            na[key] = limits["grounding"]
        elif key in limits:
            na[key] = limits[key]
        elif key.startswith("ground.regions"):
            na[key] = "the method's targets are not image regions"
        elif key.startswith("ground.") or key == "scale.latent_over_target":
            na[key] = "the method has no latent targets"
        else:
            na[key] = "not measured"
    return m, na


# ---------------------------------------------------------------------- summary
def summarize(rows: list[dict], arms: list[str]) -> dict:
    """{arm: {metric: {"mean", "std" (sample std; None for one seed), "n", "na"}}}."""
    out = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        cells = {}
        keys = {k for r in mine for k in r.get("metrics", {})} | {k for k, *_ in METRICS}
        for k in sorted(keys):
            vals = [r["metrics"][k] for r in mine if r.get("metrics", {}).get(k) is not None]
            reasons = sorted({r.get("na", {}).get(k) for r in mine} - {None})
            if not mine or any(r["status"] != "ok" for r in mine):
                reasons = sorted(set(reasons) | {r["status"] for r in mine if r["status"] != "ok"}
                                 or {"not run"})
            cells[k] = {"mean": statistics.fmean(vals) if vals else None,
                        "std": statistics.stdev(vals) if len(vals) > 1 else None,
                        "n": len(vals), "na": reasons}
        out[arm] = cells
    return out


def _cell(c: dict, kind: str, notes: dict) -> str:
    reasons = [r for r in c["na"] if r != "="]
    if c["mean"] is None:
        return "n/a" + "".join(_note(notes, r) for r in reasons or ["not run"])
    scale, unit = (100, "%") if kind == "pct" else (1, "")
    s = f"{scale * c['mean']:.1f}" if kind == "pct" else f"{c['mean']:.3f}"
    if c["std"] is not None:
        s += f" ± {scale * c['std']:.1f}" if kind == "pct" else f" ± {c['std']:.3f}"
    s += unit
    if "=" in c["na"]:
        s += _note(notes, "= the as-generated accuracy: the arm has no latents, so every "
                          "ablation is the identity")
    return s + "".join(_note(notes, r) for r in reasons)


def _note(notes: dict, reason: str) -> str:
    if reason not in notes:
        notes[reason] = len(notes) + 1
    return f" [{notes[reason]}]"


def markdown(result: dict) -> str:
    s, arms, summary = result["settings"], result["arms"], result["summary"]
    notes: dict = {}
    head = "| metric | " + " | ".join(arms) + " |"
    lines = [f"# Latent ablation: {s['shape']} shape, seeds {s['seeds']}, {s['steps']} steps",
             "", f"Command: `{result['command']}`", "",
             f"Mean ± sample std over {len(s['seeds'])} seed(s); {s['num_val']} held-out items "
             f"per seed; difficulty {s['difficulty']}; every arm {s['steps']} optimizer steps "
             f"of {s['global_batch']} samples from scratch"
             + (f" (DeepLatent: stage 1 {s['deeplatent_stage1_steps']} + stage 2 "
                f"{s['steps'] - s['deeplatent_stage1_steps']})" if "deeplatent" in arms else "")
             + ".",
             "", head, "|---|" + "---|" * len(arms)]
    for key, label, kind in METRICS:
        lines.append(f"| {label} | " + " | ".join(_cell(summary[a][key], kind, notes)
                                                   for a in arms) + " |")
    lines += ["", "Training (means over seeds; losses: the last 10% of the final stage's steps):",
              "", "| arm | lm loss | latent term(s) | mean step s | wall s (all stages) |",
              "|---|---|---|---|---|"]
    fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for arm in arms:
        stages = [[st for st in r["train"].values() if isinstance(st, dict)]
                  for r in result["rows"] if r["arm"] == arm and r.get("train")]
        stages = [st for st in stages if st]
        final = [st[-1].get("last", {}) for st in stages]
        other = sorted({k for f in final for k in f if k.endswith(("mse", "align loss",
                                                                    "scale loss"))})
        terms = ", ".join(f"{k} {fmt(_mean([f.get(k) for f in final]), 3)}" for k in other)
        step = _mean([x.get("mean_step_s") for st in stages for x in st])
        wall = _mean([sum(x.get("wall_s", 0) for x in st) for st in stages])
        lines.append(f"| {arm} | {fmt(_mean([f.get('lm loss') for f in final]), 3)} | "
                     f"{terms or '-'} | {fmt(step, 3)} | {fmt(wall, 1)} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"[{k}] {r}" for r, k in notes.items()]
    wall = result.get("wall_s")
    lines += ["", (f"Wall time {wall:.0f} s. " if wall is not None else "")
              + "Settings: `settings` in latent_ablation.json.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- the run
