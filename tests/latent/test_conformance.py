"""The conformance suite every registered latent method passes (fp32, CPU, tiny checkpoints):

- its loss terms and their gradients equal an independent computation of the same formula on
  HF transformers' modules with the same weights (method_kits.py);
- cached generation with its latent events equals one uncached forward with the recorded
  latents injected (same tokens, logits <= 1e-4);
- its side modules are trained at their own LR, or frozen when asked (no grad, no optimizer
  state).
The multi-process parts (TP=2 / PP=2 vs TP=1 per term, kill -9 and resume) are in
test_conformance_parallel.py."""

from __future__ import annotations

import copy
from fnmatch import fnmatch

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.latent import registry
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.testing.method_kits import KITS
from megatron_latent.training.step import forward_outputs

METHODS = [n for n in registry.names() if n != "none"]
# ours -> HF names of weights whose gradients are compared (embedding: the real vocab rows)
GRAD_PAIRS = {"language_model.embedding.word_embeddings.weight":
              "model.language_model.embed_tokens.weight",
              "language_model.decoder.layers.0.mlp.linear_fc2.weight":
              "model.language_model.layers.0.mlp.down_proj.weight",
              "language_model.decoder.final_layernorm.weight": "model.language_model.norm.weight"}


def test_every_method_has_a_kit():
    assert set(METHODS) <= set(KITS), f"add a kit to testing/method_kits.py for {set(METHODS) - set(KITS)}"


@pytest.fixture(scope="module")
def setups(tiny_ckpts, tmp_path_factory):
    """name -> (hf dir, processor, model config, method, dataset)."""
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("conformance")
    path = tiny_ckpts["tiny-a"]
    out = {}
    for name in METHODS:
        kit = KITS[name]
        proc = AutoProcessor.from_pretrained(path)
        cfg = Qwen25VLConfig.from_hf(path)
        method = registry.build(name, proc.tokenizer, cfg, kit.hparams(root, path))
        ds = method.sft_dataset(kit.make_data(root), tokenizer=proc.tokenizer,
                                image_processor=proc.image_processor, vocab_size=cfg.vocab_size,
                                seq_length=2048, min_pixels=3136, max_pixels=50176)
        out[name] = (path, proc, cfg, method, ds)
    return out


def _model(cfg, method, path):
    modules = method.build_modules(cfg, pre_process=True, post_process=True)
    model = Qwen25VLModel(cfg, latent_modules=modules)
    load_hf_weights(model, path)
    return model


def _twin(method, cfg, modules):
    """An independent copy of the side modules with the same weights (and attached state)."""
    if modules is None:
        return None
    try:
        return copy.deepcopy(modules)
    except TypeError:  # tensor-parallel layers hold process groups: build anew and load
        twin = method.build_modules(cfg, pre_process=True, post_process=True)
        twin.load_state_dict(modules.state_dict())
        return twin


@pytest.mark.parametrize("name", METHODS)
def test_loss_terms_and_gradients_match_hf(name, setups, megatron_single_rank):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path, _, cfg, method, ds = setups[name]
    torch.manual_seed(0)
    mb = ds.collate([ds[0], ds[1], ds[2]])
    assert int(mb["latent_mask"].sum()) >= 3
    model = _model(cfg, method, path).train()
    method.prepare_step([model], [mb], forward_outputs)  # e.g. DeepLatent's context pass
    mb["step_totals"] = {k: torch.tensor(float(v)) for k, v in method.count(mb).items()}
    step = method.sft_step(mb)
    out = model(mb["input_ids"], position_ids=mb["position_ids"], pixel_values=mb["pixel_values"],
                image_grid_thw=mb["image_grid_thw"], labels=mb["labels"], latent=step)
    total, n_tokens, logs = step.loss(out)
    logs.update(method.stage_logs())  # terms logged at layer hooks
    # as training.step: the head's sum over the global token count (terms added at layer
    # hooks carry their own global normalisation)
    (total / n_tokens).backward()

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).train()
    hf_modules = _twin(method, cfg, model.latent_modules)
    if hf_modules is not None:
        hf_modules.zero_grad(set_to_none=True)
    terms = KITS[name].hf_terms(hf, mb, method, hf_modules)
    hf_total = method.total_loss(terms)
    hf_total.backward()

    for key, ref in terms.items():  # each term: ours is (sum, count) pairs
        ours = (logs[key][0] / logs[key][1]).item()
        assert abs(ours - ref.item()) <= 1e-5, (key, ours, ref.item())
    assert all(v.item() > 1e-3 for k, v in terms.items() if k != "lm loss"), \
        f"the latent terms should be non-trivial: {terms}"
    # the reported total (terms added at intermediate layers reach the gradient through
    # layer hooks, not the head's loss sum)
    means = {k: (v[0] / v[1]).item() for k, v in logs.items()}
    assert abs(method.total_loss(means) - hf_total.item()) <= 1e-5
    ours_p, hf_p = dict(model.named_parameters()), dict(hf.named_parameters())
    pairs = dict(GRAD_PAIRS)
    if hf_modules is not None:  # the method's own modules get the same gradients too
        pairs.update({f"latent_modules.{n}": n for n, _ in hf_modules.named_parameters()})
    for ours_name, hf_name in pairs.items():
        a = ours_p[ours_name].grad
        b = (hf_modules.get_parameter(hf_name) if ours_name.startswith("latent_modules.")
             else hf_p[hf_name]).grad
        if b is None or not b.abs().max().item():  # e.g. behind a zero-initialised layer
            assert ours_name.startswith("latent_modules.") and (a is None or not a.any()), \
                f"{hf_name}: no gradient"
            continue
        a = a[: b.shape[0]]  # our vocab is padded
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-5 * max(scale, 1.0), ours_name


@pytest.mark.parametrize("name", METHODS)
def test_cached_generation_equals_recompute(name, setups, megatron_single_rank):
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.prompts import build_prompt
    from megatron_latent.inference.sampling import SamplingParams
    from megatron_latent.testing.generation import recompute_logits
    from megatron_latent.testing.samples import photos

    path, proc, cfg, method, _ = setups[name]
    model = _model(cfg, method, path).eval()
    ph = photos()
    prompts = [build_prompt(proc, "Where is the astronaut looking?", [ph[0]],
                            answer_prefix=KITS[name].opener),
               build_prompt(proc, "Describe the cat.", [ph[2]])]  # no event: it must wait
    rule = method.decode_program(None, 3)
    # whole blocks appended at once (chunks): room for a block and text after it
    n_new = 300 if rule.uses_chunks else 8
    gen = Generator(model, rule=rule, pad_id=proc.tokenizer.pad_token_id)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=n_new), record_logits=True)
    first = out[0].latent_positions  # the span opened by the prompt: consecutive latents
    assert first[:3] == list(range(first[0], first[0] + 3)) and first[0] <= 3, first
    assert not out[1].latent_positions  # the row without an event waited
    for prompt, c in zip(prompts, out):
        ref = recompute_logits(model, prompt, c)
        assert (ref - c.logits.float()).abs().max().item() <= 1e-4
        # greedy: every token the program did not append (feed or force) is the argmax among
        # the ids the program lets the head draw
        free = [j for j in range(len(c.tokens))
                if j not in c.latent_positions and j not in c.forced_positions]
        ref[:, gen.suppress.cpu()] = -float("inf")
        assert all(c.tokens[j] == int(ref[j].argmax()) for j in free), (c.tokens, free)
    if rule.uses_chunks:  # = the same tokens and vectors fed one per step
        from megatron_latent.testing.generation import Replay

        replay = Replay(out, rule.latent_id, rule.end_id, rule.never_sample, cfg.hidden_size)
        again = Generator(model, rule=replay, pad_id=proc.tokenizer.pad_token_id).generate(
            prompts, SamplingParams(max_new_tokens=n_new), record_logits=True)
        for a, c in zip(again, out):
            assert a.tokens == c.tokens and a.latent_positions == c.latent_positions
            assert (a.logits.float() - c.logits.float()).abs().max().item() <= 1e-4
        assert 3 < len(out[0].latent_positions) < n_new - 8, "a whole block, then text"


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("frozen", [False, True])
def test_side_modules_frozen_when_asked(name, frozen, setups, megatron_single_rank):
    from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap

    path, proc, cfg, method, _ = setups[name]
    if method.build_modules(cfg, pre_process=True, post_process=True) is None:
        pytest.skip(f"{name} has no side modules")
    flag = {"hylar": "freeze_canvas", "deeplatent": "freeze_modules"}[name]
    method = registry.build(name, proc.tokenizer, cfg, {**method.hparams(), flag: frozen})
    chunks = build_model(cfg, path, latent_method=method)
    optimizer = build_optimizer(chunks, OptimSettings(lr=1e-5), method.optimizer_overrides())
    side = [p for n, p in unwrap(chunks[0]).named_parameters() if n.startswith("latent_modules.")]
    in_optimizer = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert side and all(p.requires_grad != frozen for p in side)
    if frozen:
        assert not any(id(p) in in_optimizer for p in side)
    else:
        lrs = {in_optimizer[id(p)]["max_lr"] for p in side}
        assert lrs == {next(iter(method.optimizer_overrides().values()), 1e-5)}


# the RL part: every method's rollout program and policy loss; HyLaR's Gaussian latent policy too
RL_CASES = ([(n, {}) for n in METHODS if registry.method_class(n).has_rl_stage]
            + [("hylar", {"depo_latent_logprob": "gaussian"})])


@pytest.mark.parametrize("name,rl_hparams", RL_CASES, ids=lambda v: v if isinstance(v, str)
                         else "-".join(map(str, v.values())) or "default")
def test_rl_step0_equals_rollout_and_reaches_the_llm(name, rl_hparams, setups,
                                                    megatron_single_rank):
    """Step 0 of the method's RL stage (fp32): the training forward's token log-probs, and its
    latent actions' log-probs when the method's policy loss has a latent policy, equal the
    rollout's (<= 1e-5); the PPO ratio is 1; the latent term's own gradient reaches the LLM."""
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.sampling import SamplingParams
    from megatron_latent.rl.objective import RLObjective, RLStep, TokenScorer
    from megatron_latent.rl.rollout import rollout_micro_batches
    from megatron_latent.inference.prompts import build_prompt
    from megatron_latent.testing.samples import photos
    from megatron_latent.training.build import OptimSettings, build_model, build_optimizer, unwrap
    from megatron_latent.training.step import MODEL_INPUTS, forward_outputs, train_step

    path, proc, cfg, method, _ = setups[name]
    method = registry.build(name, proc.tokenizer, cfg, {**method.hparams(), **rl_hparams}).for_rl()
    chunks = build_model(cfg, path, latent_method=method)
    policy = unwrap(chunks[0]).eval()
    if KITS[name].rl_start is not None:
        method = KITS[name].rl_start(method, policy.latent_modules)
    ph = photos()
    prompts = [build_prompt(proc, q, [im], answer_prefix=KITS[name].opener,
                            images_first=method.prompt_images_first)
               for q, im in (("Where is the astronaut looking?", ph[0]),
                             ("Describe the cat.", ph[2])) for _ in range(2)]
    rule = method.rl_decode_program(None, 3)
    comps = Generator(policy, rule=rule, pad_id=proc.tokenizer.pad_token_id).generate(
        prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3))
    policy.train()
    assert comps[0].latent_positions and comps[1].latent_positions  # the prompt opened a span
    d = method.rl_defaults()
    loss = method.rl_policy_loss(d["eps_low"], d["eps_high"], 0.0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mbs = rollout_micro_batches(prompts, comps, adv, cfg=cfg, pad_id=proc.tokenizer.pad_token_id,
                                micro_batch_size=2, pad_to=256,
                                exclude_ids=method.rl_untrained_ids(), policy_loss=loss)
    for mb, out in zip(mbs, forward_outputs(chunks, mbs, TokenScorer(1.0, loss))):
        m = mb["loss_mask"].bool()
        assert int(m.sum()) >= 5 and (out["logp"][m] - mb["old_logprobs"][m]).abs().max() <= 1e-5
        if loss.has_latent_policy:  # the rollout recorded each action's log-prob
            gap = loss.latent_rollout_gap(out["latent"], mb).abs().max().item()
            assert gap <= 1e-5 * max(1.0, mb["latent_old_logprobs"].abs().max().item()), gap
    if loss.has_latent_policy:  # the latent term alone: its gradient reaches the LLM
        mb = dict(mbs[0])
        mb["step_totals"] = {k: torch.tensor(float(v))
                             for k, v in RLObjective(loss).count(mb).items()}
        plain = _model(cfg, method, path).train()
        if plain.latent_modules is not None:
            plain.latent_modules.load_state_dict(policy.latent_modules.state_dict())
        out = plain(**{k: mb.get(k) for k in MODEL_INPUTS}, labels=mb["labels"],
                    latent=RLStep(mb, 1.0, loss))
        out["latent"][0].backward()
        g = plain.language_model.decoder.layers[0].mlp.linear_fc2.weight.grad
        assert torch.isfinite(g).all() and g.abs().max().item() > 0
    side = {n: p.detach().clone() for n, p in policy.named_parameters()
            if n.startswith("latent_modules.")}
    frozen = {n for n, p in policy.named_parameters() if n in side and not p.requires_grad}
    assert frozen == {n for n in side if any(fnmatch(n, pat) for pat in method.frozen_patterns())}
    optimizer = build_optimizer(chunks, OptimSettings(lr=1e-4))
    out = train_step(chunks, optimizer, mbs, RLObjective(loss, 1.0))
    assert out["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(torch.tensor(out["grad_norm"])) and out["grad_norm"] > 0
    # the RL stage's frozen side modules are untouched; its trained ones (e.g. DeepLatent's
    # modulation MLPs, reached through the continuous term) move
    after = dict(policy.named_parameters())
    for n, before in side.items():
        moved = not torch.equal(after[n].detach(), before)
        assert moved != (n in frozen), (n, moved)
