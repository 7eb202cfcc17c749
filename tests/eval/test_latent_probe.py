"""The latent probe (eval/latent_probe.py, probe_programs.py, probe_runner.py): its measures on
hand-worked numbers, its ablation programs on scripted decode steps, and end to end on the tiny
checkpoint: a model that ignores its latents by construction answers the same under every
ablation, and targets used as their own latents are retrieved at top-1 = 1.0."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_latent.eval import latent_probe as lp
from megatron_latent.eval import probe_programs as pp
from megatron_latent.latent import registry
from megatron_latent.latent.decoding import LatentRule
from megatron_latent.models.qwen25vl.model import Qwen25VLModel

S, L, E = 100, 101, 102  # start, latent, end ids
METHODS = [n for n in registry.names() if n != "none"]
R = 1 / math.sqrt(2)


def test_homogeneity_hand_worked():
    a, b, c = torch.tensor([1.0, 0]), torch.tensor([0, 2.0]), torch.tensor([3.0, 3.0])
    # pairs (a, b), (a, c), (b, c): cosines 0, 1/sqrt2, 1/sqrt2
    got = lp.homogeneity([torch.stack([a, b, c])])
    assert got["within_span"] == pytest.approx(2 * R / 3, abs=1e-6)
    assert got["across_samples"] is None  # one sample: no pair across samples
    # spans [a, b] of sample 0 and [c] of sample 1: across pairs (a, c), (b, c)
    got = lp.homogeneity([torch.stack([a, b]), c[None]], samples=[0, 1])
    assert got["within_span"] == pytest.approx(0.0, abs=1e-6)  # [c] alone has no pair
    assert got["across_samples"] == pytest.approx(R, abs=1e-6)
    # two spans of one sample are not "across samples"; a third sample is
    got = lp.homogeneity([a[None], b[None], -a[None]], samples=[0, 0, 1])
    assert got["across_samples"] == pytest.approx((-1 + 0) / 2, abs=1e-6)


def test_identical_latents_are_homogeneous():
    v = torch.randn(16)
    spans = [torch.stack([v * (k + 1)] * 4) for k in range(3)]  # scale does not count
    got = lp.homogeneity(spans)
    assert got["within_span"] == pytest.approx(1.0, abs=1e-6)
    assert got["across_samples"] == pytest.approx(1.0, abs=1e-6)


def test_retrieval_hand_worked():
    cands = torch.tensor([[0, 1.0], [1, 1], [1, 0]])
    q = torch.tensor([[2.0, 0], [0, 1.0]])
    got = lp.retrieval(q, [cands, cands], own=[2, 1])
    # query 1: own (index 2) is the best, cos 1; others 0 and 1/sqrt2
    # query 2: best is index 0, own (index 1) has cos 1/sqrt2; others 1 and 0
    assert got["top1"] == 0.5 and got["n"] == 2
    assert got["cos_own"] == pytest.approx((1 + R) / 2)
    assert got["cos_other"] == pytest.approx((R / 2 + 1 / 2) / 2)
    assert got["chance"] == pytest.approx(1 / 3)
    assert lp.slot_cosine(q, cands[1:]) == pytest.approx((R + 0) / 2)
    assert lp.mean_norm(torch.tensor([[3.0, 4], [0, 1]])) == pytest.approx(3.0)


def test_tile_regions_hand_worked():
    feats = torch.arange(16.0).reshape(16, 1)  # a 4x4 grid, value = row-major index
    # box rows 1-2, cols 0-1 (indices 4, 5, 8, 9): 2x2 tiles anchored at (1, 0) fit at
    # (1, 0) and (1, 2); the row above and below leave no room for another tile
    regions, own = lp.tile_regions(feats, (4, 4), torch.tensor([4, 5, 8, 9]))
    assert own == 0 and regions[:, 0].tolist() == [6.5, 8.5]
    regions, own = lp.tile_regions(feats, (4, 4), torch.tensor([5]))  # 1x1: every token
    assert own == 5 and regions[:, 0].tolist() == list(range(16))
    with pytest.raises(ValueError, match="rectangle"):
        lp.tile_regions(feats, (4, 4), torch.tensor([4, 9]))


def test_large_images_keep_their_own_region_among_a_random_few():
    from megatron_latent.eval.probe_runner import _subsample

    cands = torch.arange(10.0).reshape(10, 1)
    got, own = _subsample(cands, 3, seed=0, limit=4)
    assert own == 0 and got[0, 0] == 3 and got.shape == (4, 1)
    assert len(set(got[:, 0].tolist())) == 4  # distinct others, never the own one again
    assert torch.equal(got, _subsample(cands, 3, seed=0, limit=4)[0])  # seeded
    same, own = _subsample(cands, 3, seed=0, limit=10)
    assert own == 3 and torch.equal(same, cands)


def test_latents_copying_their_targets_are_retrieved():
    torch.manual_seed(0)
    items = []
    for i in range(5):
        feats = torch.randn(12, 8)  # one image, a 3x4 grid
        index = torch.tensor([1, 2])
        regions = lp.tile_regions(feats, (3, 4), index)
        target = feats[index]
        items.append([{"pred": target.clone(), "target": target, "region": regions}])
    got = lp.grounding([[s["pred"]] for s in (it[0] for it in items)], items)
    for kind in ("teacher_forced", "generated", "targets"):
        for among in ("regions", "samples"):
            assert got[kind][among]["top1"] == 1.0, (kind, among)
            assert got[kind][among]["cos_own"] == pytest.approx(1.0, abs=1e-6)
    assert got["teacher_forced"]["slot_cos_own"] == pytest.approx(1.0, abs=1e-6)
    assert got["teacher_forced"]["regions"]["chance"] == pytest.approx(1 / 3)  # 3 rows x 1
    assert lp.grounding([[]], [[{"pred": target, "target": None, "region": None}]]) is None
    from megatron_latent.eval.probe_runner import teacher_forced_logs

    logs = teacher_forced_logs(items)  # the cheap subset, for a training run's evaluations
    assert logs["probe top1 regions"] == logs["probe top1 samples"] == 1.0
    assert logs["probe slot cosine"] == pytest.approx(1.0, abs=1e-6)
    assert logs["probe norm ratio"] == pytest.approx(1.0)
    assert logs["probe within-span cosine"] == pytest.approx(
        lp.homogeneity([it[0]["pred"] for it in items])["within_span"])


def _drive(program, rows: int, consumed, sampled_steps, hidden=None):
    """Run a program's step/feed_vectors like the generator: -> [(appended, fed vectors)]."""
    state = program.init_state(rows, "cpu")
    consumed, out = torch.tensor(consumed), []
    for j, tok in enumerate(sampled_steps):
        appended, feed = program.step(state, consumed, torch.tensor(tok))
        h = torch.full((rows, 2), float(j)) if hidden is None else hidden
        vec, _ = program.feed_vectors(state, h, feed)
        out.append((appended.tolist(), [v if f else None for v, f in zip(vec.tolist(), feed)]))
        if getattr(program, "uses_position_offsets", False):
            out[-1] += (program.position_offsets(state).tolist(),)
        consumed = appended
    return out


def test_bank_feeds_the_donors_latents_in_order_and_wraps():
    rule = LatentRule(S, L, E, "steps", steps=3)
    donor_latents = [torch.tensor([[1.0, 1], [2, 2]]), torch.tensor([[7.0, 7], [8, 8], [9, 9]])]
    bank = pp.Bank(rule, donor_latents, donors=[1, 0])
    bank.select([0, 1], "cpu")
    got = _drive(bank, 2, [S, S], [[5, 5]] * 4)
    assert [a for a, _ in got] == [[L, L]] * 3 + [[5, 5]]
    # row 0 feeds item 1's latents, row 1 item 0's (two of them: it wraps round)
    assert [v for _, v in got[:3]] == [[[7, 7], [1, 1]], [[8, 8], [2, 2]], [[9, 9], [1, 1]]]
    zeros = _drive(pp.Zeros(rule), 1, [S], [[5]])
    assert zeros[0][1] == [[0.0, 0.0]]
    fixed = _drive(pp.Fixed(rule, torch.tensor([3.0, 4])), 1, [S], [[5]])
    assert fixed[0][1] == [[3.0, 4.0]] and bank.steps == 3 and bank.end_id == E


def test_cut_spans_keeps_closers_and_positions():
    rule = LatentRule(S, L, E, "steps", steps=3)
    # row 0 had two spans: 3 latents closed by E, then 2 closed by a sampled 7 (offset 4 from
    # the program); row 1 had none
    cut = pp.CutSpans(rule, [[(3, E, [0, 0, 0]), (2, 7, [4, 4, 4])], []])
    cut.select([0, 1], "cpu")
    got = _drive(cut, 2, [S, 9], [[5, 6], [S, 6], [5, 6], [5, S], [5, 6], [S, 6], [5, 6]])
    appended = [a for a, _, _ in got]
    offsets = [o for _, _, o in got]
    assert appended == [[E, 6], [S, 6], [7, 6], [5, S], [5, E], [S, 6], [E, 6]]
    assert all(v == [None, None] for _, v, _ in got)  # nothing is ever fed
    # row 0: E sits 3 positions on (the cut latents); 7 sits 3 + 2 + the recorded 4 on; the
    # unrecorded third span is closed at once; row 1's span was not recorded: no offset
    assert [o[0][0] for o in offsets] == [3, 3, 9, 9, 9, 9, 5]
    assert all(o[i][1] == 0 for o in offsets for i in range(3))


# ---------------------------------------------------------------------- end to end

class LatentBlindModel(Qwen25VLModel):
    """The tiny Qwen2.5-VL with two wiring changes that make it ignore its latents by
    construction, in the decode path the probe's generation runs on:
    - content: a decode step's input embedding is recomputed from its ids, so a latent step
      (whose id is the latent token) reads that token's own embedding, never the fed vector;
    - presence: KV-cache slots of latent tokens are marked invalid, so no later query attends
      to them (a latent step still sees itself and the context before it).
    What follows a span then depends on the prompt and the tokens around the span only, at the
    same positions: every ablation (zeros, mean, shuffled, span cut out with its closer and
    positions kept) must give the as-generated answers."""

    def __init__(self, cfg, latent_id: int):
        super().__init__(cfg)
        self.latent_id = latent_id

    def forward(self, input_ids, *args, decoder_input=None, inference_context=None, **kw):
        if decoder_input is not None:
            decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        if inference_context is not None:
            c = inference_context
            c.mark(c.valid.index_select(1, c.index) & (input_ids != self.latent_id))
        return super().forward(input_ids, *args, decoder_input=decoder_input,
                               inference_context=inference_context, **kw)


@pytest.fixture(scope="module")
def lvr_setup(tiny_ckpts, synthetic_lvr):
    from transformers import AutoProcessor

    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

    path = tiny_ckpts["tiny-a"]
    proc = AutoProcessor.from_pretrained(path)
    cfg = Qwen25VLConfig.from_hf(path)
    method = registry.build("lvr", proc.tokenizer, cfg)
    ds = method.sft_dataset(str(synthetic_lvr / "meta_val.json"), tokenizer=proc.tokenizer,
                            image_processor=proc.image_processor, vocab_size=cfg.vocab_size,
                            seq_length=None, min_pixels=3136, max_pixels=50176)
    return path, proc, cfg, method, ds


def test_latent_blind_model_answers_alike_under_every_ablation(lvr_setup, megatron_single_rank):
    from megatron_latent.conversion.hf_load import load_hf_weights
    from megatron_latent.eval.answers import score_prediction
    from megatron_latent.eval.probe_runner import ABLATIONS, accuracy_table, run_probe

    path, proc, cfg, method, ds = lvr_setup
    model = LatentBlindModel(cfg, method.lvr_id)
    load_hf_weights(model, path)
    res = run_probe(model.eval(), proc.tokenizer, method, ds, num=6, steps=3, max_new_tokens=10)
    rows = res["items"]
    assert res["items_probed"] == 6 and res["mean_latents_per_item"] >= 3
    for r in rows:
        assert len({r["outputs"][k] for k in ("as_generated",) + ABLATIONS}) == 1, r
        assert r["n_latent"]["span_removed"] == 0
        assert r["n_latent"]["zeros"] == r["n_latent"]["as_generated"] >= 3
    assert all(a["changed"] == 0.0 for a in res["accuracy"].values())
    # accuracy with references that half of the as-generated answers match: 0.5 for every run
    refs = [score_prediction(r["outputs"]["as_generated"], "x", None)[0] if i % 2 else "no-such"
            for i, r in enumerate(rows)]
    table = accuracy_table({k: [r["outputs"][k] for r in rows] for k in rows[0]["outputs"]}, refs)
    assert {k: v["accuracy"] for k, v in table.items()} == {k: 0.5 for k in table}
    # the box tokens, pooled, are their own region's mean: the ceiling retrieves them all
    ceiling = res["grounding"]["targets"]
    assert ceiling["regions"]["top1"] == 1.0 and ceiling["samples"]["top1"] == 1.0
    assert ceiling["regions"]["cos_own"] == pytest.approx(1.0, abs=1e-5)
    assert res["homogeneity"]["targets"]["within_span"] is not None


def test_cli_on_the_plain_model(lvr_setup, tmp_path):
    """tools/latent_probe.py end to end (subprocess); the plain tiny model does read its
    latents, so the ablations change its answers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    path, *_ = lvr_setup
    data = Path(lvr_setup[4].data_path)
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out, png = tmp_path / "probe.json", tmp_path / "probe.png"
    res = subprocess.run([sys.executable, str(repo / "tools" / "latent_probe.py"), "--ckpt", path,
                          "--data", str(data), "--latent-method", "lvr", "--num", "4",
                          "--latent-steps", "3", "--max-new-tokens", "8", "--min-pixels", "3136",
                          "--max-pixels", "50176", "--out", str(out), "--plot", str(png)],
                         env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[probe] teacher-forced and as generated: 8/24 (33%)" in res.stdout
    assert "[probe] ablations: 24/24 (100%)" in res.stdout and "ETA 0 s" in res.stdout
    for head in ("answer accuracy", "homogeneity", "grounding", "scale (mean L2 norm)"):
        assert head in res.stdout
    got = json.loads(out.read_text())
    assert got["items_probed"] == 4 and len(got["items"]) == 4
    for run in ("zeros", "mean", "shuffled", "span_removed"):
        assert got["accuracy"][run]["changed"] > 0, run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", METHODS)
def test_every_method_is_probed(name, tiny_ckpts, tmp_path_factory, megatron_single_rank):
    """The runner is method-agnostic: each registered method's own SFT data, decode program and
    targets (LVR's box tokens with their image's regions, HyLaR's canvas across samples)."""
    from transformers import AutoProcessor

    from megatron_latent.conversion.hf_load import load_hf_weights
    from megatron_latent.eval.probe_runner import ABLATIONS, run_probe
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.testing.method_kits import KITS

    root = tmp_path_factory.mktemp(f"probe_{name}")
    path = tiny_ckpts["tiny-a"]
    proc, cfg = AutoProcessor.from_pretrained(path), Qwen25VLConfig.from_hf(path)
    kit = KITS[name]
    method = registry.build(name, proc.tokenizer, cfg, kit.hparams(root, path))
    ds = method.sft_dataset(kit.make_data(root), tokenizer=proc.tokenizer,
                            image_processor=proc.image_processor, vocab_size=cfg.vocab_size,
                            seq_length=None, min_pixels=3136, max_pixels=50176)
    model = Qwen25VLModel(cfg, latent_modules=method.build_modules(cfg, pre_process=True,
                                                                   post_process=True))
    load_hf_weights(model, path)
    # room for text after a block (DeepLatent's: 3 placeholders + the scale head's grid, up to
    # 16 x 16, + its end: every ablation must reach the text for "changed" to mean anything)
    budget = 8 + (260 if name == "deeplatent" else 0)
    res = run_probe(model.eval(), proc.tokenizer, method, ds, num=4, steps=3,
                    max_new_tokens=budget)
    assert res["method"] == name and res["items_probed"] == 4
    assert all(r["n_latent"]["span_removed"] == 0 for r in res["items"])
    assert all(r["n_latent"]["as_generated"] >= 1 for r in res["items"])
    changed = {k: res["accuracy"][k]["changed"] for k in ABLATIONS}
    assert max(changed.values()) > 0, changed  # the ablations reach the model
    g = res["grounding"]
    if name == "deeplatent":  # its grid is fed in a chunk append: each replacement reaches it
        assert min(changed.values()) > 0, changed
        # no probe targets: the LatentFormer builds its slots
        assert g is None and res["scale"]["targets"] is None
        return
    assert g["targets"]["samples"]["top1"] == 1.0
    if name == "lvr":  # box tokens: retrieved among their image's regions too
        assert g["teacher_forced"]["regions"]["n"] == 4
    assert res["scale"]["targets"] > 0 and res["scale"]["text_embeddings"] > 0


@pytest.mark.slow
def test_eval_latent_probes_in_an_sft_run(tiny_ckpts, synthetic_lvr, tmp_path):
    """--eval-latent-probes: each evaluation of an SFT run also logs the cheap probes, equal to
    teacher_forced_logs over the same validation micro-batches (here: their presence and range;
    the metrics themselves are the hand-worked tests above)."""
    from megatron_latent.testing.distributed import run_distributed
    from megatron_latent.testing.parity_workers import train_runs

    run = dict(data_path=str(synthetic_lvr / "meta.json"), hf_dir=tiny_ckpts["tiny-a"],
               valid_data_path=str(synthetic_lvr / "meta_val.json"), eval_interval=2,
               eval_latent_probes=True, train_iters=2, micro_batch_size=2, global_batch_size=2,
               seq_length=1024, min_pixels=3136, max_pixels=50176)
    run_distributed(train_runs, 1, {"probe": run}, str(tmp_path / "h.pt"))
    hist = torch.load(tmp_path / "h.pt", weights_only=False)["probe"]
    valid = [h["valid"] for h in hist if "valid" in h]
    assert len(valid) == 1
    v = valid[0]
    assert -1.0 <= v["probe within-span cosine"] <= 1.0 and v["probe latent norm"] > 0
    assert 0.0 <= v["probe top1 regions"] <= 1.0 and 0.0 <= v["probe top1 samples"] <= 1.0
