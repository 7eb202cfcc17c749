"""GRPO: the loss against a hand calculation, rollout/train log-prob equality at step 0, fresh
(never stale) weights in the rollout after an optimizer step, bad input, and a 2-process CPU run
where a learnable reward rises."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_latent.inference.generator import Generator
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.rl.losses import GRPOLoss
from megatron_latent.rl.objective import RLObjective, RLStep, TokenScorer
from megatron_latent.rl.rollout import rollout_micro_batches
from megatron_latent.testing.generation import demo_prompts, lvr_processor, lvr_rule
from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
from megatron_latent.training.step import forward_outputs, train_step


def test_loss_equals_hand_calculation():
    batch = {"advantages": torch.tensor([2.0, -1.0]),
             "old_logprobs": torch.tensor([[-1.2, -2.0, -0.1], [-1.2, -1.0, -1.0]]),
             "ref_logprobs": torch.tensor([[-1.0, -1.5, -0.5], [-1.0, -1.0, -1.0]]),
             "loss_mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])}
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -3.0]])
    step = RLStep(batch, 1.0, GRPOLoss(eps_low=0.2, eps_high=0.2, beta=0.1))
    total, n, logs = step.loss({"logp": logp, "latent": (None, {})})
    r = math.exp(0.2)  # ratio of the tokens with logp - old = 0.2
    # row 0, A = 2: token 0 clipped at 1.2 (binds); token 1 ratio 1, KL(d = 0.5); token 2 masked
    t00 = -min(r * 2, 1.2 * 2)
    t01 = -2.0 + 0.1 * (math.exp(0.5) - 0.5 - 1)
    # row 1, A = -1: min(-r, -1.2) = -r, so the clip does not bind
    t10 = -min(-r, -1.2)
    assert int(n) == 3
    assert total.item() == pytest.approx(t00 + t01 + t10, abs=1e-6)
    assert logs["clip fraction"].tolist() == pytest.approx([1.0, 3.0])
    assert logs["kl"][0].item() == pytest.approx(math.exp(0.5) - 1.5, abs=1e-6)


@pytest.fixture(scope="module")
def rl_setup(tiny_ckpts, megatron_single_rank):
    path = tiny_ckpts["tiny-a"]
    cfg = Qwen25VLConfig.from_hf(path)
    proc, ids = lvr_processor(path)
    return path, cfg, proc, ids


def _rollout(model, cfg, proc, ids, seed=5):
    rule = lvr_rule(ids, steps=2)
    prompts = [p for p in demo_prompts(proc) for _ in range(2)]  # 2 groups of 2
    gen = Generator(unwrap(model[0]), rule=rule, pad_id=proc.tokenizer.pad_token_id)
    unwrap(model[0]).eval()
    comps = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.9, seed=seed))
    unwrap(model[0]).train()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mbs = rollout_micro_batches(prompts, comps, adv, cfg=cfg, pad_id=proc.tokenizer.pad_token_id,
                                micro_batch_size=2, pad_to=512, exclude_ids=(rule.start_id,))
    return comps, mbs


def test_step0_train_logprobs_equal_rollout(rl_setup):
    path, cfg, proc, ids = rl_setup
    model = build_model(cfg, path)
    comps, mbs = _rollout(model, cfg, proc, ids)
    # the first prompt opens its answer with <|lvr_start|>: its rollouts carry latents, which
    # the training forward injects (replay of the recorded vectors, no recomputation)
    assert comps[0].latent_positions == comps[1].latent_positions == [0, 1]
    scored = forward_outputs(model, mbs, TokenScorer(0.9))
    n = 0
    for mb, logp in zip(mbs, scored):
        m = mb["loss_mask"].bool()
        assert (logp[m] - mb["old_logprobs"][m]).abs().max() <= 1e-5
        n += int(m.sum())
    assert n >= 4 * 5  # text tokens of every rollout are compared
    for mb in mbs:
        mb["ref_logprobs"] = mb["old_logprobs"].clone()
    optimizer = build_optimizer(model, OptimSettings(lr=0.0))
    out = train_step(model, optimizer, mbs, RLObjective(GRPOLoss(), temperature=0.9))
    assert out["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert out["clip fraction"] == 0.0 and out["kl"] == pytest.approx(0.0, abs=1e-6)


def test_recompute_gives_ratio_one_at_step0(rl_setup):
    """Option "recompute": the old policy is the training forward's own log-probs, so the step-0
    ratio is exactly 1 while the logged gap to the rollout stays what it is; the step's "rollout
    gap max" equals the max over both micro-batches computed here."""
    from types import SimpleNamespace

    from megatron_latent.rl.loop import _old_policy

    path, cfg, proc, ids = rl_setup
    model = build_model(cfg, path)
    _, mbs = _rollout(model, cfg, proc, ids)
    scored = forward_outputs(model, mbs, TokenScorer(0.9))
    top = max((s - mb["rollout_logprobs"])[mb["loss_mask"].bool()].abs().max().item()
              for s, mb in zip(scored, mbs))
    loss = GRPOLoss(beta=0.0)
    _old_policy(SimpleNamespace(rollout_correction="recompute", ppo_epochs=1, temperature=0.9),
                model, mbs, loss)
    for mb, s in zip(mbs, scored):
        assert torch.equal(mb["old_logprobs"], s) and mb["rollout_logprobs"] is not s
    out = train_step(model, build_optimizer(model, OptimSettings(lr=0.0)), mbs,
                     RLObjective(loss, temperature=0.9))
    assert out["ratio"] == 1.0 and out["clip fraction"] == 0.0
    assert out["rollout gap max"] == pytest.approx(top, rel=1e-6, abs=1e-12)


def test_rollout_uses_the_weights_the_optimizer_just_wrote(rl_setup):
    """If the generator read a stale copy, its log-probs after the step would be the old
    model's, not equal to a fresh scoring forward of the updated model."""
    path, cfg, proc, ids = rl_setup
    model = build_model(cfg, path)
    optimizer = build_optimizer(model, OptimSettings(lr=1e-2))
    _, mbs = _rollout(model, cfg, proc, ids)
    before = forward_outputs(model, mbs, TokenScorer(0.9))
    for mb in mbs:
        mb["ref_logprobs"] = mb["old_logprobs"].clone()
    train_step(model, optimizer, mbs, RLObjective(GRPOLoss(beta=0.0), temperature=0.9))
    after = forward_outputs(model, mbs, TokenScorer(0.9))
    m = mbs[0]["loss_mask"].bool()
    assert (after[0][m] - before[0][m]).abs().max() > 1e-2  # the step changed the model
    comps2, mbs2 = _rollout(model, cfg, proc, ids, seed=6)
    fresh = forward_outputs(model, mbs2, TokenScorer(0.9))
    for mb, logp in zip(mbs2, fresh):
        m = mb["loss_mask"].bool()
        assert (logp[m] - mb["old_logprobs"][m]).abs().max() <= 1e-5


def test_bad_input(rl_setup, synthetic_lvr, tmp_path):
    from megatron_latent.rl.loop import GRPOConfig
    from megatron_latent.rl.step_data import PromptBuilder

    path, cfg, proc, ids = rl_setup
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(data_path="x", group_size=1).check(dp=1)
    from megatron_latent.rl.data import load_rl_prompts

    records = load_rl_prompts(synthetic_lvr / "meta_rl.json")
    gcfg = GRPOConfig(data_path="x", seq_length=10_000, max_new_tokens=8, max_pixels=224 * 224)
    sizes = [len(p.input_ids) for p in PromptBuilder(path, cfg, gcfg).build(records[:6])[0]]
    gcfg.seq_length = sorted(sizes)[3] + 8  # the two longest prompts no longer fit
    prompts, _, _, skipped = PromptBuilder(path, cfg, gcfg).build(records[:6])
    assert sorted(sizes)[3] < sorted(sizes)[4]  # the data has two strictly longer prompts
    assert skipped == 2 and len(prompts) == 4
    gcfg.seq_length = 20
    with pytest.raises(ValueError, match="no prompt of this step fits seq_length 20"):
        PromptBuilder(path, cfg, gcfg).build(records[:6])
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "nope.png", "conversations": []}]')
    from megatron_latent.data.llava_records import LvrDataError

    with pytest.raises(LvrDataError, match=r"bad.json: record 0: field 'image': file not found"):
        load_rl_prompts(bad)


def test_nan_reward_is_a_named_error(rl_setup, synthetic_lvr):
    from megatron_latent.rl.rewards import REWARDS, RewardError, register_reward
    from megatron_latent.testing.rl_workers import grpo_run

    path, cfg, proc, ids = rl_setup
    register_reward("loop_nan", lambda c, r: float("nan"))
    kw = dict(data_path=str(synthetic_lvr / "meta_rl.json"),
              latent_method="lvr", hf_dir=path, prompts_per_step=1,
              group_size=2, micro_batch_size=2, seq_length=1024, max_new_tokens=4,
              rewards="loop_nan:1.0", train_iters=1, max_pixels=112 * 112,
              wandb_mode="disabled")
    try:
        with pytest.raises(RewardError, match="loop_nan.*sample 0"):
            grpo_run(kw, "/dev/null")
    finally:
        REWARDS.pop("loop_nan")


@pytest.mark.slow
def test_reward_rises_two_processes(tiny_ckpts, synthetic_lvr, tmp_path):
    """DP=2 on gloo, latent steps on (answers open with <|lvr_start|>), the vowel-share reward.
    Measured: mean reward 0.37 over the first 5 steps, 0.67 over the last 5 (lr 1e-2)."""
    from megatron_latent.testing.distributed import run_distributed
    from megatron_latent.testing.rl_workers import grpo_run

    kw = dict(data_path=str(synthetic_lvr / "meta_rl.json"),
              latent_method="lvr", hf_dir=tiny_ckpts["tiny-a"],
              prompts_per_step=4, group_size=8, micro_batch_size=8, seq_length=1024,
              max_new_tokens=8, temperature=1.0, top_k=0, latent_steps=2,
              answer_prefix="<|lvr_start|>", rewards="vowels:1.0", train_iters=25,
              optim={"lr": 1e-2}, max_pixels=112 * 112, wandb_mode="disabled",
              save=str(tmp_path / "ckpt"), save_interval=25)
    out = tmp_path / "history.pt"
    run_distributed(grpo_run, 2, kw, str(out))
    rewards = [h["reward"] for h in torch.load(out)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"\nreward: first 5 steps {first:.3f}, last 5 steps {last:.3f}; {rewards}")
    assert last > first + 0.2
    assert all(h["latent-span rate"] == 1.0 for h in torch.load(out))
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "25"


def test_resume_continues_exactly(tiny_ckpts, synthetic_lvr, tmp_path, megatron_single_rank):
    """Stop after 2 steps (checkpoint), resume to 3: step 3 equals the uninterrupted run's
    (same prompts, same sampling seeds, same weights and optimizer state)."""
    from megatron_latent import parallel
    from megatron_latent.testing.rl_workers import grpo_run

    base = dict(data_path=str(synthetic_lvr / "meta_rl.json"),
              latent_method="lvr", hf_dir=tiny_ckpts["tiny-a"],
                prompts_per_step=2, group_size=4, micro_batch_size=4, seq_length=1024,
                max_new_tokens=6, temperature=1.0, top_k=0, latent_steps=2,
                answer_prefix="<|lvr_start|>", rewards="vowels:1.0", optim={"lr": 1e-2},
                max_pixels=112 * 112, wandb_mode="disabled")
    runs = {}
    for name, extra in [("full", dict(train_iters=3)),
                        ("first", dict(train_iters=2, save=str(tmp_path / "c"), save_interval=2)),
                        ("resumed", dict(train_iters=3, load=str(tmp_path / "c")))]:
        out = tmp_path / f"{name}.pt"
        grpo_run({**base, **extra}, str(out))
        runs[name] = torch.load(out)
    parallel.initialize(parallel.ParallelConfig(), seed=1234)  # the session fixture's state
    assert [h["iteration"] for h in runs["resumed"]] == [3]
    for key in ("reward", "policy loss", "response length"):
        assert runs["resumed"][0][key] == pytest.approx(runs["full"][2][key], abs=1e-6), key


def test_start_from_a_megatron_checkpoint(tiny_ckpts, synthetic_lvr, tmp_path, megatron_single_rank):
    """--pretrained-checkpoint (e.g. the SFT run) starts a fresh run from its weights: the first
    step equals the run started from the same weights in HF form; --load of the new run's own
    save dir then resumes it instead."""
    import subprocess
    import sys
    from pathlib import Path

    from megatron_latent import parallel
    from megatron_latent.testing.rl_workers import grpo_run

    repo = Path(__file__).resolve().parents[2]
    ckpt = tmp_path / "sft"
    subprocess.run([sys.executable, str(repo / "tools/convert_hf_to_megatron.py"), "--hf-dir",
                    tiny_ckpts["tiny-a"], "--out", str(ckpt)], check=True, capture_output=True)
    base = dict(data_path=str(synthetic_lvr / "meta_rl.json"),
              latent_method="lvr", prompts_per_step=2,
                group_size=4, micro_batch_size=4, seq_length=1024, max_new_tokens=6,
                temperature=1.0, top_k=0, latent_steps=2, answer_prefix="<|lvr_start|>",
                rewards="vowels:1.0", optim={"lr": 1e-2}, train_iters=1, max_pixels=112 * 112,
                wandb_mode="disabled")
    hist = {}
    for name, extra in [("hf", dict(hf_dir=tiny_ckpts["tiny-a"])),
                        ("ckpt", dict(pretrained_checkpoint=str(ckpt), load=str(tmp_path / "g"),
                                      save=str(tmp_path / "g")))]:
        grpo_run({**base, **extra}, str(tmp_path / f"{name}.pt"))
        hist[name] = torch.load(tmp_path / f"{name}.pt")
    parallel.initialize(parallel.ParallelConfig(), seed=1234)
    for key in ("reward", "policy loss", "kl"):
        assert hist["ckpt"][0][key] == pytest.approx(hist["hf"][0][key], abs=1e-6), key
    grpo_run({**base, "pretrained_checkpoint": str(ckpt), "load": str(tmp_path / "g"),
              "train_iters": 2}, str(tmp_path / "again.pt"))
    parallel.initialize(parallel.ParallelConfig(), seed=1234)
    assert [h["iteration"] for h in torch.load(tmp_path / "again.pt")] == [2]
