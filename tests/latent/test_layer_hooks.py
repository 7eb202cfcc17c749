"""Losses at intermediate decoder layers (spec 3.3 M4, oracle 18) on tiny-b (3 layers, fp32, CPU):
a cosine alignment 1 - cos(h_l[p], target) at layers {1, 2}, attached with `AuxLoss` through a
latent step's `layer_hooks`, gives after `train_step` the gradient of CE + lambda * align written
against HF transformers' `output_hidden_states` on the same weights, and the same alignment
value; full activation recompute gives the same gradients with each hook called once; PP=2
(gloo) equals PP=1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from functools import partial

from megatron_latent.conversion.hf_mapping import NameTable
from megatron_latent.latent.base import LatentMethod, LatentStep, token_sum_loss
from megatron_latent.latent.teacher import alignment_hook, capture_states
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.layer_hooks import local_range, slot_positions
from megatron_latent.testing.distributed import run_distributed
from megatron_latent.testing.samples import MICRO_BATCH_KEYS, two_sample_batch
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import forward_outputs, train_step

LAMBDA, LAYERS = 4.0, (1, 2)
COMPARED = ["language_model.embedding.word_embeddings.weight",
            "language_model.decoder.layers.0.self_attention.linear_qkv.weight",
            "language_model.decoder.layers.0.mlp.linear_fc2.weight",
            "language_model.decoder.layers.1.self_attention.linear_proj.weight",
            "language_model.decoder.layers.1.mlp.linear_fc1.weight",
            "language_model.decoder.layers.2.mlp.linear_fc1.weight",
            "language_model.output_layer.weight"]


class AlignStep(LatentStep):
    """CE by the default head + LAMBDA * mean over (layer, slot) of 1 - cos at LAYERS. The
    micro-batch's slots and targets: part `mb_index` of the method's."""

    def __init__(self, batch, method):
        self.batch, self.method = batch, method
        self.slots, self.targets = method.parts[batch.get("mb_index", 0)]

    def layer_hooks(self):
        m = self.method
        m.calls += 1
        if m.in_head:  # keep h (with its graph) for the loss; `loss` adds the term
            self.kept = {}
            return {layer: partial(self._keep, layer) for layer in LAYERS}
        return {layer: self._counted(alignment_hook(self.slots, self.targets[layer], self.weight(),
                                                    self.batch["input_ids"].shape[1],
                                                    m.logs[layer]))
                for layer in LAYERS}

    def weight(self) -> float:
        # the global normalisation: data-parallel ranks hold the same batch here
        dp = parallel_state.get_data_parallel_world_size()
        return LAMBDA / (len(LAYERS) * self.method.n_slots * dp)

    def _keep(self, layer, h):
        self.kept[layer] = h
        return h

    def _counted(self, hook):
        def run(h):
            self.method.hook_calls.append(torch._C._current_graph_task_id() != -1)  # backward?
            return hook(h)
        return run

    def head(self, model, **kw):
        return model.lm_head(**kw)

    def loss(self, out):
        total, n, logs = token_sum_loss(self.batch["loss_mask"], out)
        if self.method.in_head:  # the same alignment loss, added to the output loss
            aux = 0.0
            for layer, h in self.kept.items():
                hs = h[self.slots[:, 1], self.slots[:, 0]]
                aux = aux + (1 - F.cosine_similarity(hs, self.targets[layer], dim=-1)).sum()
            # the step divides the loss by the global CE count (training/step.py)
            total = total + aux * self.weight() * self.batch["step_totals"]["ce"]
        return total, n, logs


class AlignMethod(LatentMethod):
    name = "test-align"

    def __init__(self, mask, hidden, in_head=False, split=False):
        self.in_head = in_head
        self.slots = slot_positions(mask)
        self.n_slots = self.slots.shape[0]
        g = torch.Generator().manual_seed(3)
        self.targets = {layer: torch.randn(self.n_slots, hidden, generator=g) for layer in LAYERS}
        self.parts = [(self.slots, self.targets)]
        if split:  # one micro-batch per row: its slots (row 0 of it) and targets
            self.parts = []
            for r in range(mask.shape[0]):
                sel = self.slots[:, 0] == r
                slots = self.slots[sel].clone()
                slots[:, 0] = 0
                self.parts.append((slots, {k: v[sel] for k, v in self.targets.items()}))
        self.logs = {layer: [] for layer in LAYERS}
        self.calls, self.hook_calls = 0, []

    def sft_step(self, mb):
        return AlignStep(mb, self)

    def align(self) -> float:  # the logged mean over (layer, slot)
        pairs = torch.stack([torch.stack(v).sum(0) for v in self.logs.values()]).sum(0)
        return (pairs[0] / pairs[1]).item()


def _batch(path, cfg):
    from transformers import AutoProcessor

    batch = two_sample_batch(AutoProcessor.from_pretrained(path), cfg, seq_length=128)
    ids = batch["input_ids"]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, ids[0] == cfg.image_token_id] = True  # row 0: its image pads (two images)
    mask[1, 3:20:4] = mask[1, 66:78:5] = True  # row 1: text positions in both SP halves
    mask &= batch["attention_mask"].bool()
    return batch, mask


def _rows(mb: dict, image_token_id: int) -> list[dict]:
    """One micro-batch per row (b = 1), with its own images."""
    thw, n_pads = mb["image_grid_thw"], (mb["input_ids"] == image_token_id).sum(1).tolist()
    out, img, patch = [], 0, 0
    for r, pads in enumerate(n_pads):
        first, first_patch = img, patch
        while pads > 0:
            pads -= int(thw[img].prod()) // 4
            patch += int(thw[img].prod())
            img += 1
        out.append({"input_ids": mb["input_ids"][r:r + 1], "labels": mb["labels"][r:r + 1],
                    "loss_mask": mb["loss_mask"][r:r + 1],
                    "position_ids": mb["position_ids"][:, r:r + 1],
                    "image_grid_thw": thw[first:img],
                    "pixel_values": mb["pixel_values"][first_patch:patch], "mb_index": r})
    return out


def _megatron_run(path, over=None, pp=1, first=None, in_head=False, capture=False,
                  split=False):
    torch.manual_seed(0)
    cfg = Qwen25VLConfig.from_hf(path, pipeline_model_parallel_size=pp,
                                 num_layers_in_first_pipeline_stage=first, **(over or {}))
    batch, mask = _batch(path, cfg)
    method = AlignMethod(mask, cfg.hidden_size, in_head, split)
    model = build_model(cfg, path)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-3, clip_grad=0.0))
    mb = {k: batch[k] for k in MICRO_BATCH_KEYS}
    if capture:  # teacher states at the mask's slots, before the step changes the weights
        method.states = capture_states(model, {**mb, "teacher_mask": mask}, (1, 2, 3),
                                       forward_only=forward_outputs)
    logs = train_step(model, optimizer, _rows(mb, cfg.image_token_id) if split else [mb], method)
    grads = {n: p.main_grad.clone() for n, p in unwrap(model[0]).named_parameters()
             if p.requires_grad}
    return logs, grads, method, batch, mask


def _hf_terms(hf, batch, mask, targets, image_id):
    """(CE mean, align mean) by HF transformers: layer-l outputs = output_hidden_states[l]
    (l < num_layers: HF's last entry is after the final norm, ours before)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    feats = torch.cat(hf.model.get_image_features(batch["pixel_values"],
                                                  batch["image_grid_thw"]).pooler_output)
    emb = hf.model.get_input_embeddings()(ids).clone()
    emb[ids == image_id] = feats
    pos, _ = hf.model.get_rope_index(ids, (ids == image_id).int(), batch["image_grid_thw"],
                                     attention_mask=attn)
    out = hf.model.language_model(inputs_embeds=emb, position_ids=pos, attention_mask=attn,
                                  output_hidden_states=True)
    assert len(out.hidden_states) == hf.config.text_config.num_hidden_layers + 1
    sup = batch["loss_mask"][:, :-1].bool()
    logits = hf.lm_head(out.last_hidden_state).float()
    ce = F.cross_entropy(logits[:, :-1][sup], ids[:, 1:][sup])
    terms = []
    for layer in LAYERS:
        h = out.hidden_states[layer][mask]  # row-major slots
        t = targets[layer]
        terms.append(1 - (h * t).sum(-1) / (h.norm(dim=-1) * t.norm(dim=-1)))
    return ce, torch.cat(terms).mean()


def _compare(cfg, params_grad: dict, hf, tol: float) -> float:
    table, worst = NameTable(cfg), 0.0
    hf_params = dict(hf.named_parameters())
    for name in COMPARED:
        hf_names, transform = table.lookup(name)
        ref = transform.to_megatron(*(hf_params[h].grad for h in hf_names))
        got = params_grad[name][: ref.shape[0]]
        rel = (got - ref).abs().max().item() / ref.abs().max().item()
        worst = max(worst, rel)
        assert rel <= tol, f"{name}: relative gradient difference {rel:.2e}"
    return worst


def test_aux_loss_equals_the_loss_added_to_the_output_loss(tiny_ckpts, megatron_single_rank):
    """Oracle 18: AuxLoss at layers 1, 2 gives the gradient of the same loss computed from the
    kept layer outputs and added to the output loss in the head."""
    path = tiny_ckpts["tiny-b"]
    logs, grads, _, _, _ = _megatron_run(path)
    logs_ref, ref, _, _, _ = _megatron_run(path, in_head=True)
    assert logs["lm loss"] == logs_ref["lm loss"]
    # the LLM's gradients (the vision tower's differ by fp32 rounding order, ~5e-7 of norm)
    worst = 0.0
    for name, r in ref.items():
        if name.startswith("language_model."):
            worst = max(worst, (grads[name] - r).abs().max().item() / r.abs().max().item())
    print(f"\nlargest relative gradient difference {worst:.1e}")
    assert worst <= 1e-6


def test_alignment_at_layers_matches_hf(tiny_ckpts, megatron_single_rank):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = tiny_ckpts["tiny-b"]
    logs, grads, method, batch, mask = _megatron_run(path)
    assert method.calls == 1 and len(method.hook_calls) == len(LAYERS)

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ce, align = _hf_terms(hf, batch, mask, method.targets, hf.config.image_token_id)
    assert abs(logs["lm loss"] - ce.item()) <= 1e-5
    assert abs(method.align() - align.item()) <= 1e-5, (method.align(), align.item())
    (LAMBDA * align).backward(retain_graph=True)
    align_part = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    ce.backward()
    cfg = Qwen25VLConfig.from_hf(path)
    # fp32 megatron vs HF differ by ~1e-6 relative in every gradient, the output layer's too
    worst = _compare(cfg, grads, hf, 1e-5)
    # the alignment term matters: without it the gradients would differ far beyond 1e-5
    name = "language_model.decoder.layers.0.mlp.linear_fc2.weight"
    hf_names, transform = NameTable(cfg).lookup(name)
    share = (transform.to_megatron(*(align_part[h] for h in hf_names)).abs().max()
             / grads[name].abs().max()).item()
    print(f"\nlargest relative gradient difference {worst:.1e}; alignment share {share:.2f}")
    assert share > 0.05


# uniform, 2 layers a chunk: layers 1, 2 in the first chunk; block, 1 layer: layer 1 is
# checkpointed, layer 2 is not (its hook runs in the forward)
@pytest.mark.parametrize("method,n,in_backward", [("uniform", 2, [True, True]),
                                                  ("block", 1, [True, False])])
def test_full_recompute_adds_each_layer_loss_once(method, n, in_backward, tiny_ckpts,
                                                  megatron_single_rank):
    path = tiny_ckpts["tiny-b"]
    base_logs, base, m0, _, _ = _megatron_run(path)
    over = dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=n)
    logs, grads, m1, _, _ = _megatron_run(path, over)
    # each hook ran once (in the re-run of its chunk, or in the forward) and logged once
    assert m0.hook_calls == [False, False] and sorted(m1.hook_calls) == sorted(in_backward)
    assert len(m1.logs[1]) == len(m1.logs[2]) == 1
    assert m1.align() == pytest.approx(m0.align(), rel=1e-6)
    assert logs["loss"] == pytest.approx(base_logs["loss"], rel=1e-6)
    for name, g in base.items():
        scale = g.abs().max().item() or 1.0
        assert (grads[name] - g).abs().max().item() <= 1e-6 * scale, name


def test_local_range_without_sequence_parallel():
    assert local_range(torch.zeros(7, 2, 4), 7) == (0, 7)


# pp2rc: 2 micro-batches (one a row) in flight on the first stage, each layer recomputed
LAYOUTS = {"ref": dict(), "pp2": dict(pp=2, first=1), "tp2sp": dict(tp=2, sp=True),
           "pp2rc": dict(pp=2, first=1, split=True, over=dict(
               recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))}


def _layout_worker(path: str, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_latent import parallel

    results = {}
    for name, lay in LAYOUTS.items():
        tp, pp = lay.get("tp", 1), lay.get("pp", 1)
        parallel.initialize(parallel.ParallelConfig(tp, pp), seed=1234)
        over = dict(tensor_model_parallel_size=tp, sequence_parallel=lay.get("sp", False),
                    **lay.get("over", {}))
        logs, grads, method, _, _ = _megatron_run(path, over, pp=pp, first=lay.get("first"),
                                                  capture=True, split=lay.get("split", False))
        align = {k: torch.stack(v).sum(0) for k, v in method.logs.items() if v}
        if lay.get("sp"):  # each TP rank logged its own slice of the slots
            for v in align.values():
                dist.all_reduce(v, group=ps.get_tensor_model_parallel_group())
        results[name] = {"logs": logs, "align": align, "states": method.states,
                         "in_backward": method.hook_calls,
                         "grads": grads if name != "tp2sp" else None}
        ps.destroy_model_parallel()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save(gathered, out)


@pytest.mark.slow
def test_pp2_and_sequence_parallel_equal_pp1(tiny_ckpts, tmp_path):
    out = tmp_path / "layouts.pt"
    run_distributed(_layout_worker, 2, tiny_ckpts["tiny-b"], str(out))
    ranks = torch.load(out, weights_only=False)
    ref = ranks[0]["ref"]
    assert set(ref["states"]) == {1, 2, 3}
    # PP=2, first stage: vision + layer 1 (local layers.0); second: layers 2, 3 (local 0, 1)
    for name in ("pp2", "pp2rc"):
        first, second = ranks[0][name], ranks[1][name]
        assert set(first["align"]) == {1} and set(second["align"]) == {2}
        assert set(first["states"]) == {1} and set(second["states"]) == {2, 3}
        for layer, stage in ((1, first), (2, second)):
            assert torch.allclose(stage["align"][layer], ref["align"][layer], atol=1e-5), layer
        for stage in (first, second):
            for layer, got in stage["states"].items():
                assert torch.allclose(got, ref["states"][layer], atol=1e-6), layer
        # one row a micro-batch changes fp32 rounding (the vision tower's most: ~1e-6)
        tol = 1e-6 if name == "pp2" else 1e-5
        _same_grads(first["grads"], second["grads"], ref["grads"], tol)
    # recompute: both micro-batches' hooks ran in the re-run of their layer (in backward)
    assert ranks[0]["pp2rc"]["in_backward"] == [True, True]
    assert ranks[1]["pp2rc"]["in_backward"] == [True, True]
    for r in ranks:  # TP=2 with SP: every TP rank holds all slots' states, gathered
        for layer, got in r["tp2sp"]["states"].items():
            assert torch.allclose(got, ref["states"][layer], atol=1e-5), layer
        for layer, got in r["tp2sp"]["align"].items():
            assert torch.allclose(got, ref["align"][layer], atol=1e-5), layer
    for name in ("pp2", "tp2sp", "pp2rc"):
        for key in ("loss", "grad_norm"):
            assert ranks[0][name]["logs"][key] == pytest.approx(ref["logs"][key], rel=1e-5), name


def _same_grads(first: dict, second: dict, ref: dict, tol: float) -> None:
    rename = {"language_model.decoder.layers.0.": "language_model.decoder.layers.1.",
              "language_model.decoder.layers.1.": "language_model.decoder.layers.2."}
    pairs = [(first, lambda n: n), (second, lambda n: next(
        (n.replace(a, b) for a, b in rename.items() if n.startswith(a)), n))]
    n_checked = 0
    for grads, to_ref in pairs:
        for name, g in grads.items():
            r = ref[to_ref(name)]
            scale = r.abs().max().item() or 1.0
            assert (g - r).abs().max().item() <= tol * scale, name
            n_checked += 1
    assert n_checked > 10
