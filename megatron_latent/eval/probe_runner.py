"""The latent probe's runner: one checkpoint, one evaluation set in its method's SFT format, every
measure of latent_probe.py and every ablation of probe_programs.py (tools/latent_probe.py).

The evaluation items come from the method's own SFT data (`method.sft_dataset`, e.g. a
`meta_val.json`), the only format that carries the latents' targets:
- the prompt is the sample's own context up to its first latent span, opener included (for
  LVR: the question and `<|lvr_start|>`, as tools/eval_vqa.py prompts with --answer-prefix);
  the images in it go with it;
- the reference answer is the supervised text after the sample's last latent span (its
  `<answer>` content when it has one), scored by eval/answers.py like tools/eval_vqa.py.
Samples without a latent span are left out (counted). Generation is greedy with the method's
decode program ("as generated"), then once per ablation. The teacher-forced pass runs the
method's SFT step over the whole samples: its hidden states before each latent slot are the
latents the training objective shapes, and its targets (`method.probe_targets`) and regions
(`method.probe_regions`) give the grounding measures; a method without targets gets none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from megatron_latent.eval import latent_probe as lp
from megatron_latent.eval import probe_programs as pp
from megatron_latent.eval.answers import extract_answer, score_prediction
from megatron_latent.inference.generator import Generator, Prompt
from megatron_latent.inference.loading import answer_text, latent_runs, stop_ids
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.latent.base import LatentStep

ABLATIONS = ("zeros", "mean", "shuffled", "span_removed")


@dataclass
class ProbeItem:
    index: int  # in the dataset
    ids: list[int]  # the prompt: the sample's ids up to its first latent span, opener included
    images: int  # the sample's first images, those the prompt holds
    answer: str

    def prompt(self, sample: dict) -> Prompt:
        grid = sample["image_grid_thw"][: self.images]
        if not self.images:
            return Prompt(self.ids)
        return Prompt(self.ids, sample["pixel_values"][: int(grid.prod(-1).sum())], grid)


def probe_item(index: int, x: dict, mask: torch.Tensor, tokenizer, image_token_id: int,
               merge: int, start_id: int | None = None) -> ProbeItem | None:
    """The item of sample `x` (`mask` [s]: its latent slots), None without a latent span. The
    prompt ends with the span's opener `start_id` (a block may hold other tokens between it
    and its first slot: DeepLatent's placeholders), or at the first slot if None."""
    where = mask.nonzero().flatten()
    if not where.numel():
        return None
    first, last = int(where[0]), int(where[-1])
    ids = x["input_ids"][:first].tolist()
    if start_id is not None and start_id in ids:
        ids = ids[:len(ids) - ids[::-1].index(start_id)]
    counts = (x["image_grid_thw"].prod(-1) // merge ** 2).cumsum(0).tolist()
    n_img = ids.count(image_token_id)
    if n_img not in [0] + counts:
        raise ValueError(f"sample {x.get('source')}: its first latent span cuts an image's tokens")
    return ProbeItem(index, ids, ([0] + counts).index(n_img), _reference(tokenizer, x, last))


def _reference(tokenizer, x: dict, last: int) -> str:
    ids, sup = x["input_ids"], x["loss_mask"]
    kept = [int(ids[j]) for j in range(last + 1, len(ids)) if sup[j - 1] > 0]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    inner = extract_answer(text)
    return (text if inner is None else inner).strip()


def accuracy_table(outputs: dict[str, list[str] | None], answers: list[str]) -> dict:
    """Per run: correct, total, accuracy and "changed" (the fraction of outputs that differ from
    the "as_generated" run's); None for a run that did not take place."""
    base = outputs["as_generated"]
    table = {}
    for name, outs in outputs.items():
        if outs is None:
            table[name] = None
            continue
        ok = sum(score_prediction(o, a, None)[1] for o, a in zip(outs, answers))
        changed = sum(o != b for o, b in zip(outs, base))
        table[name] = {"correct": ok, "total": len(outs), "accuracy": ok / max(1, len(outs)),
                       "changed": changed / max(1, len(outs))}
    return table


# ---------------------------------------------------------------------- teacher-forced pass
class _Capture(LatentStep):
    """The method's SFT step, with what the probe reads kept: image features, hidden states,
    norms of the ordinary token embeddings."""

    def __init__(self, step, batch, image_token_id):
        self.step, self.batch, self.image_token_id = step, batch, image_token_id

    def inject(self, embeddings, image_features, modules=None):
        ids = self.batch["input_ids"]
        text = self.batch["attention_mask"].bool() & (ids != self.image_token_id)
        text &= ~self.batch["latent_mask"]
        self.text_norms = embeddings[text].float().norm(dim=-1).cpu()
        self.features = image_features
        return self.step.inject(embeddings, image_features, modules)

    def head(self, model, *, hidden_states, **_):
        self.hidden = hidden_states  # [s, b, h] final-norm
        return hidden_states

    def loss(self, output):
        raise NotImplementedError


def _to(batch: dict, device) -> dict:
    keep_host = ("image_grid_thw",)  # the vision tower reads it on the host
    return {k: v.to(device) if torch.is_tensor(v) and k not in keep_host else v
            for k, v in batch.items()}


@torch.no_grad()
def teacher_forced(model, method, mb: dict, seed: int, max_regions: int) -> dict:
    """One micro-batch through the method's SFT step: per row, its spans {"pred" [n, h]: the
    hidden states before its slots, "target" [n, h] | None, "region": (candidates [k, h], own
    index) | None: the own region and at most `max_regions - 1` others drawn at random};
    the norms of its text embeddings and image features."""
    from megatron_latent.training.step import forward_outputs

    method.prepare_step([model], [mb], forward_outputs)  # e.g. DeepLatent's context pass
    cap = _Capture(method.sft_step(mb), mb, model.cfg.image_token_id)
    model(mb["input_ids"], position_ids=mb["position_ids"], pixel_values=mb["pixel_values"],
          image_grid_thw=mb["image_grid_thw"], latent=cap)
    targets = method.probe_targets(cap.step)
    regions = method.probe_regions(mb, cap.features, model.cfg.spatial_merge_size)
    mask = mb["latent_mask"]
    predictor = torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False)
    pred = cap.hidden.transpose(0, 1)[predictor].float().cpu()
    rows = [[] for _ in range(mask.shape[0])]
    at = 0
    for k, (row, _, n) in enumerate(lp.spans(mask)):
        rows[row].append({
            "pred": pred[at:at + n],
            "target": None if targets is None else targets[at:at + n].float().cpu(),
            "region": None if regions is None else _subsample(*regions[k], seed + k, max_regions)})
        at += n
    image = None if cap.features is None else cap.features.float().norm(dim=-1).cpu()
    return {"rows": rows, "text_norms": cap.text_norms, "image_norms": image}


def _subsample(cands: torch.Tensor, own: int, seed: int, limit: int):
    """(candidates, own index) with at most `limit` candidates: the own one and others drawn at
    random (a large image has thousands of tiles of a small box)."""
    cands = cands.float().cpu()
    if cands.shape[0] <= limit:
        return cands, own
    others = torch.tensor([j for j in range(cands.shape[0]) if j != own])
    pick = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))
                  [: limit - 1]]
    return torch.cat([cands[own:own + 1], cands[pick]]), 0


def _answer(tokenizer, c, budget: int) -> str:
    """`answer_text` of the completion's first `budget` tokens that are not latent positions."""
    latent = set(c.latent_positions)
    kept = [t for j, t in enumerate(c.tokens) if j not in latent][:budget]
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


def _split(c) -> list[torch.Tensor]:
    """A completion's latents, one tensor per span."""
    out, at = [], 0
    for _, n in latent_runs(c.latent_positions):
        out.append(c.latents[at:at + n].float())
        at += n
    return out


def _recorded_spans(c, start_id: int, end_id: int) -> list[tuple[int, int, list[int]]]:
    """(tokens between the span's opener and its closer: its latents and any placeholders before
    them, the token that closed the span, its position offset) per span of a completion (an
    opener not in the completion is the prompt's last token)."""
    out = []
    for start, n in latent_runs(c.latent_positions):
        j = start + n
        tok = c.tokens[j] if j < len(c.tokens) else end_id
        off = ([0, 0, 0] if c.position_offsets is None or j >= len(c.tokens)
               else c.position_offsets[j].tolist())
        opener = max((k for k in range(start) if c.tokens[k] == start_id), default=-1)
        out.append((j - opener - 1, tok, off))
    return out


# ---------------------------------------------------------------------- the whole probe
MAX_REGIONS = 64  # candidate regions per span: its own and at most 63 others


def run_probe(model, tokenizer, method, ds, *, num: int | None = None, batch_size: int = 8,
              mode: str | None = None, steps: int | None = None, threshold: float = 0.5,
              max_new_tokens: int = 64, seed: int = 0, progress=None) -> dict:
    """Every measure on the first `num` samples of `ds` -> a JSON-able dict: "accuracy" (as
    generated and per ablation), "homogeneity", "grounding", "scale", "items" (per item: its
    answer, the output and latent count of each run). `progress(stage, done, total)`.

    Pass 1, per batch of samples: the teacher-forced forward and the as-generated run; pass 2,
    per batch of items: the ablations (the mean latent and the shuffle's donors need pass 1
    whole). A sample is loaded once per pass."""
    program = method.decode_program(mode, steps, threshold)
    if program is None:
        raise ValueError(f"latent method {method.name!r} has no decode program: no latents to probe")
    cfg, device = model.cfg, next(model.parameters()).device
    n_samples = len(ds) if num is None else min(num, len(ds))
    total, done = n_samples * (2 + len(ABLATIONS)), [0]

    def tick(stage: str, k: int) -> None:
        done[0] += k
        if progress:
            progress(stage, done[0], total)

    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=stop_ids(tokenizer), seed=seed)
    pad = tokenizer.pad_token_id or 0
    items, tf, base, text_norms, image_norms = [], [], [], [], []
    gen = Generator(model, rule=program, pad_id=pad)
    for lo in range(0, n_samples, batch_size):
        idx = range(lo, min(lo + batch_size, n_samples))
        samples = [ds[i] for i in idx]
        mb = ds.collate(samples)
        got = [probe_item(i, x, m, tokenizer, cfg.image_token_id, cfg.spatial_merge_size,
                          program.start_id)
               for i, x, m in zip(idx, samples, mb["latent_mask"])]
        keep = [k for k, it in enumerate(got) if it is not None]
        if keep:
            mb = _to(ds.collate([samples[k] for k in keep]), device)
            out = teacher_forced(model, method, mb, seed + lo * 1000, MAX_REGIONS)
            tf += out["rows"]
            text_norms.append(out["text_norms"])
            if out["image_norms"] is not None:
                image_norms.append(out["image_norms"])
            base += gen.generate([got[k].prompt(samples[k]) for k in keep], params)
            items += [got[k] for k in keep]
        tick("teacher-forced and as generated", 2 * len(idx))
    if not items:
        raise ValueError(f"none of the {n_samples} samples has a latent span")
    n = len(items)
    total += (n - n_samples) * len(ABLATIONS)
    gen_spans = [_split(c) for c in base]
    flat = [x for sp in gen_spans for x in sp]
    h = cfg.hidden_size
    latents = [torch.cat(sp) if sp else torch.zeros(0, h) for sp in gen_spans]
    eligible = [i for i, x in enumerate(latents) if x.shape[0]]
    random.Random(seed).shuffle(eligible)
    donors = list(range(n))
    for k, i in enumerate(eligible):  # a derangement of the items with latents
        donors[i] = eligible[(k + 1) % len(eligible)]
    programs = {"zeros": pp.Zeros(program),
                "mean": pp.Fixed(program, torch.cat(flat).mean(0) if flat else torch.zeros(h)),
                "shuffled": pp.Bank(program, latents, donors) if len(eligible) > 1 else None,
                "span_removed": pp.CutSpans(program, [
                    _recorded_spans(c, program.start_id, program.end_id) for c in base])}
    # every run gets the text budget the as-generated run had (the span cut out frees the
    # latents' share of max_new_tokens: a longer answer would differ for that reason alone)
    budget = [max_new_tokens - len(c.latent_positions) for c in base]
    outputs = {"as_generated": [answer_text(tokenizer, c) for c in base]}
    outputs.update({k: [] if programs[k] else None for k in ABLATIONS})
    n_latent = {"as_generated": [len(c.latent_positions) for c in base]}
    n_latent.update({k: [] if programs[k] else None for k in ABLATIONS})
    gens = {k: Generator(model, rule=v, pad_id=pad) for k, v in programs.items() if v}
    for lo in range(0, n, batch_size):
        chunk = items[lo:lo + batch_size]
        prompts = [it.prompt(ds[it.index]) for it in chunk]
        for name in ABLATIONS:
            if programs[name] is not None:  # banks are indexed by the items' order
                programs[name].select(list(range(lo, lo + len(chunk))), device)
                comps = gens[name].generate(prompts, params)
                outputs[name] += [_answer(tokenizer, c, b)
                                  for c, b in zip(comps, budget[lo:lo + len(chunk)])]
                n_latent[name] += [len(c.latent_positions) for c in comps]
        tick("ablations", len(ABLATIONS) * len(chunk))
    cat = lambda v: torch.cat(v).mean().item() if v else None  # noqa: E731
    return {"method": method.name, "decode": {"mode": getattr(program, "mode", None),
                                              "steps": program.steps},
            "items_probed": n, "items_without_span": n_samples - n,
            "mean_latents_per_item": sum(n_latent["as_generated"]) / n,
            "accuracy": accuracy_table(outputs, [it.answer for it in items]),
            "homogeneity": _homogeneity(gen_spans, tf),
            "grounding": lp.grounding(gen_spans, tf),
            "scale": {"latents_generated": lp.mean_norm(torch.cat(flat)) if flat else None,
                      "latents_teacher_forced": _norm(tf, "pred"),
                      "targets": _norm(tf, "target"),
                      "text_embeddings": cat(text_norms), "image_features": cat(image_norms)},
            "items": [{"index": it.index, "answer": it.answer,
                       "outputs": {k: (v[i] if v is not None else None) for k, v in outputs.items()},
                       "n_latent": {k: (v[i] if v is not None else None)
                                    for k, v in n_latent.items()}}
                      for i, it in enumerate(items)]}


def _tf_list(tf_spans, key):
    return [s[key] for item in tf_spans for s in item if s[key] is not None]


def _norm(tf_spans, key):
    vs = _tf_list(tf_spans, key)
    return lp.mean_norm(torch.cat(vs)) if vs else None


def _homogeneity(gen_spans, tf_spans) -> dict:
    def of(per_item):
        spans = [s for item in per_item for s in item]
        samples = [i for i, item in enumerate(per_item) for _ in item]
        return lp.homogeneity(spans, samples)

    out = {"generated": of(gen_spans),
           "teacher_forced": of([[s["pred"] for s in item] for item in tf_spans])}
    if any(s["target"] is not None for item in tf_spans for s in item):
        out["targets"] = of([[s["target"] for s in item if s["target"] is not None]
                             for item in tf_spans])
    return out


def teacher_forced_logs(rows: list[list[dict]]) -> dict[str, float]:
    """The cheap probes (no generation), as flat scalars for a training run's evaluation log:
    `rows` gathered from `teacher_forced` over some validation micro-batches. Homogeneity and
    norms of the teacher-forced latents; with targets, the slot cosine, the retrieval top-1
    among regions / samples, and the latents' norm over their targets'."""
    preds = [s["pred"] for item in rows for s in item]
    if not preds:
        return {}
    h = _homogeneity([[] for _ in rows], rows)["teacher_forced"]
    logs = {"probe within-span cosine": h["within_span"],
            "probe across-sample cosine": h["across_samples"],
            "probe latent norm": _norm(rows, "pred")}
    g = lp.grounding([[] for _ in rows], rows)
    if g is not None:
        tf = g["teacher_forced"]
        logs["probe slot cosine"] = tf["slot_cos_own"]
        logs["probe top1 samples"] = tf["samples"]["top1"]
        if tf["regions"] is not None:
            logs["probe top1 regions"] = tf["regions"]["top1"]
        logs["probe norm ratio"] = logs["probe latent norm"] / max(_norm(rows, "target"), 1e-12)
    return {k: v for k, v in logs.items() if v is not None}


@torch.no_grad()
def eval_probe_logs(model, method, micro_batches: list[dict], seed: int) -> dict[str, float]:
    """`teacher_forced_logs` over a training run's validation micro-batches (this rank's; the
    unwrapped model of one pipeline stage holding all layers)."""
    from megatron.core import parallel_state as ps

    from megatron_latent.platform.devices import device

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("--eval-latent-probes needs pipeline parallel size 1")
    dev, mode = device(), model.training
    model.eval()
    rows = []
    try:
        for k, mb in enumerate(micro_batches):
            b = {key: v.to(dev) if torch.is_tensor(v) and key != "image_grid_thw" else v
                 for key, v in mb.items()}
            rows += teacher_forced(model, method, b, seed + k, MAX_REGIONS)["rows"]
    finally:
        model.train(mode)
    return teacher_forced_logs(rows)
