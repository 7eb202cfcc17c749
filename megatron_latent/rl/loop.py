"""Co-located GRPO: one set of weights, one process group; per step the policy generates (KV
cache freed after), rewards and group-normalised advantages are computed, the frozen reference
scores the rollouts, and megatron-core's schedules train on them for `ppo_epochs` passes.

Rollout and training share the model object: the generator reads the same parameter tensors the
optimizer has just written, so there is no weight copy to go stale and nothing to reshard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_latent import checkpointing, parallel
from megatron_latent.rl.objective import RLObjective, TokenScorer
from megatron_latent.training.build import OptimSettings, build_model, unwrap
from megatron_latent.training.run_logger import RunLogger
from megatron_latent.training.step import forward_outputs, train_step
from megatron_latent.training.run import (LoopConfig, StopSignals, flat_config, resolve_method,
                                          resolve_start, save, setup_training,
                                          start_checkpoint_writer)
from megatron_latent.training.trainer import SampleOrder, pad_length


@dataclass
class GRPOConfig(LoopConfig):
    reference: str | None = None  # HF dir or Megatron checkpoint for the frozen reference
    prompts_per_step: int = 4  # global, over data-parallel ranks
    group_size: int = 8
    micro_batch_size: int = 4  # rollouts per micro-batch
    max_new_tokens: int = 512  # seq_length limits prompt + completion; longer prompts skipped
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 50
    latent_mode: str | None = None  # None: the method's own (LVR "steps", HyLaR "forced")
    latent_steps: int | None = None  # None: the method's default (LVR 8, HyLaR 32)
    answer_prefix: str = ""
    system_prompt: str | None = "You are a helpful assistant."
    # None below: the latent method's RL recipe (`rl_defaults`; LVR: TRL's GRPO)
    rewards: str | None = None  # "name:weight,..."
    reward_module: str | None = None  # imported first: a module or .py file registering rewards
    judge: str | None = None  # "module:function" re-judging answers the rules score wrong
    eps_low: float | None = None
    eps_high: float | None = None
    kl_beta: float | None = None
    # DAPO's group filter: keep groups whose mean `filter_reward` is in (low, high), refilled
    # from further prompts up to `max_refill_tries` generations
    filter_low: float | None = None
    filter_high: float | None = None
    filter_reward: str = "accuracy"
    max_refill_tries: int = 20
    ppo_epochs: int = 1
    # the train/rollout mismatch (rl/losses.py old_policy): "none" = the rollout's log-probs are
    # the old policy; "recompute" = a training forward before the update gives them; "tis" =
    # truncated importance sampling min(pi_old_train / pi_rollout, tis_cap) per token.
    # None: "tis" with FP8 rollouts, else "none" (docs/rl.md: measured on a trained model)
    rollout_correction: str | None = None
    tis_cap: float = 2.0
    # "params": rollouts in the parameters' dtype; "fp8": the LLM decoder's linears on FP8
    # copies of the weights (inference/fp8_weights.py)
    rollout_precision: str = "params"
    offload_reference: bool = False
    cuda_graphs: bool = False
    # RL defaults that differ from SFT's (LVR stage 2)
    lr_decay_style: str = "constant"
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=5e-6, weight_decay=0.1))
    max_pixels: int = 2560 * 28 * 28  # the LVR seed's stage 2 (docs/rl.md)

    def apply_method_defaults(self, method) -> None:
        for key, value in method.rl_defaults().items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def check(self, dp: int) -> None:
        from megatron_latent.inference.generator import WEIGHT_PRECISIONS
        from megatron_latent.rl.losses import CORRECTIONS

        if self.rollout_precision not in WEIGHT_PRECISIONS:
            raise ValueError(f"rollout precision {self.rollout_precision!r}: expected one of "
                             f"{WEIGHT_PRECISIONS}")
        if self.rollout_correction is None:
            self.rollout_correction = "tis" if self.rollout_precision == "fp8" else "none"
        if self.rollout_correction not in CORRECTIONS:
            raise ValueError(f"rollout correction {self.rollout_correction!r}: expected one of "
                             f"{CORRECTIONS}")
        if self.tis_cap < 1.0:
            raise ValueError(f"tis_cap must be >= 1, got {self.tis_cap}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are group-relative), got "
                             f"{self.group_size}")
        if self.prompts_per_step % dp:
            raise ValueError(f"prompts_per_step {self.prompts_per_step} is not a multiple of "
                             f"data parallel {dp}")
        if (self.prompts_per_step // dp * self.group_size) % self.micro_batch_size:
            raise ValueError(f"{self.prompts_per_step // dp} prompts x group {self.group_size} "
                             f"per rank do not fill micro-batches of {self.micro_batch_size}")


def _device():
    return parallel.device()


class _Reference:
    """The frozen reference policy; kept on the host between uses when offloaded. With
    `method`, its side modules too (a policy loss whose `reference_fields` use them)."""

    def __init__(self, mcfg, source: str, offload: bool, method=None):
        self.chunks = build_model(mcfg, None, wrap_ddp=False, latent_method=method)
        model = self.chunks[0]
        if checkpointing.is_checkpoint(source):
            checkpointing.load_model(source, model)
        else:
            from megatron_latent.conversion.hf_load import load_hf_weights

            load_hf_weights(model, source)
        for p in model.parameters():
            p.requires_grad_(False)
        self.offload = offload and torch.cuda.is_available()
        if self.offload:
            model.cpu()

    def score(self, micro_batches, temperature: float, policy_loss) -> list:
        """Per micro-batch {"logp": token log-probs, **policy_loss.reference_fields}."""
        if self.offload:
            self.chunks[0].to(_device())
        try:
            return forward_outputs(self.chunks, micro_batches,
                                   TokenScorer(temperature, policy_loss, reference=True))
        finally:
            if self.offload:
                self.chunks[0].cpu()


def _dp_mean(values: dict) -> dict:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return {k: v / ps.get_data_parallel_world_size() for k, v in zip(keys, t.tolist())}


def run_grpo(cfg: GRPOConfig) -> list[dict]:
    from megatron_latent.inference.generator import Generator
    from megatron_latent.rl.collect import Scoring
    from megatron_latent.rl.data import load_rl_prompts
    from megatron_latent.rl.rewards import (import_reward_module, load_judge, parse_reward_spec,
                                            with_method_rewards)
    from megatron_latent.rl.step_data import PromptBuilder

    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    parallel.initialize(parallel.ParallelConfig(tp, pp), seed=cfg.seed)
    cfg.check(ps.get_data_parallel_world_size())
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    over = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, spec=cfg.spec,
                params_dtype=dtype, **cfg.model_overrides)
    resume, mcfg, tok_dir = resolve_start(cfg, over)
    builder = PromptBuilder(tok_dir, mcfg, cfg)
    method = resolve_method(cfg, resume, builder.tokenizer, mcfg).for_rl()
    if not method.has_rl_stage:
        raise NotImplementedError(f"latent method {method.name!r} has no RL stage yet")
    cfg.apply_method_defaults(method)
    ref_source = cfg.reference or cfg.pretrained_checkpoint or cfg.hf_dir
    if ref_source is None and cfg.kl_beta:
        raise ValueError("the KL term needs a frozen reference: give --reference (or the initial "
                         "weights, --pretrained-checkpoint / --hf-dir)")
    builder.images_first = method.prompt_images_first
    if cfg.reward_module:
        import_reward_module(cfg.reward_module)
    known = with_method_rewards(method)
    scoring = Scoring(parse_reward_spec(cfg.rewards, known), known,
                      load_judge(cfg.judge) if cfg.judge else None)
    if (cfg.filter_low is not None or cfg.filter_high is not None) and \
            cfg.filter_reward not in dict(scoring.spec):
        raise ValueError(f"the group filter reads reward {cfg.filter_reward!r}, which --rewards "
                         f"{cfg.rewards!r} does not compute")
    records = load_rl_prompts(cfg.data_path)

    model, optimizer, scheduler, iteration, consumed = setup_training(cfg, mcfg, resume, method)
    policy_loss = method.rl_policy_loss(cfg.eps_low, cfg.eps_high, cfg.kl_beta)
    reference = (_Reference(mcfg, ref_source, cfg.offload_reference,
                            method if policy_loss.reference_needs_modules else None)
                 if cfg.kl_beta else None)
    policy = unwrap(model[0])
    generator = Generator(policy, rule=method.rl_decode_program(cfg.latent_mode, cfg.latent_steps),
                          pad_id=builder.pad_id, cuda_graphs=cfg.cuda_graphs,
                          max_context=cfg.seq_length, weight_precision=cfg.rollout_precision)
    objective = RLObjective(policy_loss, cfg.temperature)
    order = SampleOrder(len(records), cfg.seed)
    log = RunLogger(cfg.train_iters, project=cfg.wandb_project, run_name=cfg.wandb_exp_name,
                    config=flat_config(cfg), wandb_mode=cfg.wandb_mode, log_dir=cfg.log_dir,
                    start_step=iteration)
    if cfg.save:
        start_checkpoint_writer()
    stop, history = StopSignals(), []
    while iteration < cfg.train_iters:
        out, consumed = _step(cfg, model, optimizer, policy, generator, builder, records, order,
                              consumed, scoring, reference, objective, method, mcfg, iteration)
        scheduler.step(increment=1)
        iteration += 1
        out["lr"] = scheduler.get_lr(optimizer.param_groups[0])
        history.append({"iteration": iteration, **out})
        log.log(iteration, {k: v for k, v in out.items() if k != "update_ok"})
        last = iteration == cfg.train_iters
        stop.agree()
        if cfg.save and (stop.requested or last or
                         (cfg.save_interval and iteration % cfg.save_interval == 0)):
            save(cfg, mcfg, model, optimizer, scheduler, iteration, consumed,
                 builder.tokenizer, tok_dir, method)
        if stop.requested:
            break
    log.finish()
    return history


def _old_policy(cfg, model, mbs, policy_loss) -> None:
    """The ratio's old policy in place: a training forward before the update where the rollout
    correction needs the training policy's token log-probs and several epochs need them as
    they were before the first (or the old latent policy)."""
    corr = cfg.rollout_correction
    tokens = corr == "recompute" or (corr == "tis" and cfg.ppo_epochs > 1)
    latent = cfg.ppo_epochs > 1 and policy_loss.has_latent_policy
    if tokens or latent:
        scorer = TokenScorer(cfg.temperature, policy_loss if latent else None)
        for mb, old in zip(mbs, forward_outputs(model, mbs, scorer)):
            if latent:
                mb["latent_recomputed_logprobs"], old = old["latent"], old["logp"]
            if tokens:
                mb["old_logprobs"] = old
    if corr == "tis":
        for mb in mbs:
            mb["tis_cap"] = cfg.tis_cap
            if not tokens:  # one epoch: the training forward itself is the old policy
                mb["old_logprobs"] = None


def _step(cfg, model, optimizer, policy, generator, builder, records, order, consumed, scoring,
          reference, objective, method, mcfg, iteration):
    """Rollouts, rewards, advantages, reference scoring and `ppo_epochs` updates of one step.
    -> (logs, consumed samples)."""
    from megatron_latent.rl.collect import collect_groups
    from megatron_latent.rl.rewards import group_advantages
    from megatron_latent.rl.rollout import rollout_micro_batches

    groups, stats, consumed = collect_groups(
        cfg, order=order, consumed=consumed, builder=builder, generator=generator, policy=policy,
        records=records, scoring=scoring, iteration=iteration, device=_device())
    rollouts = [g.prompt for g in groups for _ in range(cfg.group_size)]
    comps = [c for g in groups for c in g.completions]
    rewards = torch.cat([g.rewards for g in groups])
    adv = group_advantages(rewards, cfg.group_size)
    longest = max(len(p.input_ids) + len(c.tokens) for p, c in zip(rollouts, comps))
    mbs = rollout_micro_batches(rollouts, comps, adv, cfg=mcfg, pad_id=builder.pad_id,
                                micro_batch_size=cfg.micro_batch_size,
                                pad_to=pad_length(longest, cfg.tensor_model_parallel_size),
                                exclude_ids=method.rl_untrained_ids(),
                                policy_loss=objective.policy_loss)
    t1 = time.perf_counter()
    if reference is not None:
        for mb, ref in zip(mbs, reference.score(mbs, cfg.temperature, objective.policy_loss)):
            mb["ref_logprobs"] = ref.pop("logp")
            mb.update(ref)
        if not ps.is_pipeline_last_stage():  # only the last stage computes the loss
            for mb in mbs:
                mb["ref_logprobs"] = None
    _old_policy(cfg, model, mbs, objective.policy_loss)
    for epoch in range(cfg.ppo_epochs):
        out = train_step(model, optimizer, mbs, objective)
        if epoch == 0:  # the train/rollout mismatch before any update of this step
            first = {k: v for k, v in out.items() if k.startswith("rollout ")}
    out.update(first)
    t_train = time.perf_counter() - t1
    parts = {k: torch.cat([g.parts[k] for g in groups]) for k in groups[0].parts}
    n_tok = sum(len(c.tokens) for c in comps)
    out.update(_dp_mean({"reward": rewards.mean().item(),
                         **{f"reward/{k}": v.mean().item() for k, v in parts.items()},
                         "response length": n_tok / len(comps),
                         "latent-span rate": sum(bool(c.latent_positions) for c in comps)
                         / len(comps), **stats}), train_s=t_train)
    return out, consumed
