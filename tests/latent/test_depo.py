"""HyLaR's DePO terms (latent/depo.py) on hand-worked numbers (hylar-deeplatent-spec.md section
4, oracles 6-7), and one test per HyLaR bug of spec 1.9 that we fix, each failing under the
seed's behaviour (the seed's variant is written out in the test where it is a formula)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_latent.inference.generator import Completion, Prompt
from megatron_latent.latent.depo import DePOLoss, DotPolicy, GaussianPolicy, predictor_rows
from megatron_latent.rl.objective import RLStep
from megatron_latent.rl.rollout import rollout_micro_batches


def test_token_terms_hand_worked():
    """Dual clip eps 0.2/0.28, c = 3 (oracle 6): A = +1, delta = 0.2 -> -e^0.2 = -1.2214;
    A = -1, delta = -0.5 -> max(0.6065, 0.8) = 0.8; A = -1, delta = 1.5 -> min(4.48, 3) = 3;
    plus beta * k3 with logp = -0.1, ref = -0.3: 0.05 * 0.018731."""
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    logp = torch.tensor([[-0.8, -0.1], [-1.5, 0.5]])
    batch = {"advantages": torch.tensor([1.0, -1.0]), "old_logprobs": old,
             "ref_logprobs": torch.tensor([[-0.8, -0.3], [-1.5, 0.5]])}
    loss, logs = DePOLoss(beta=0.05).token_terms(logp, batch)
    kl01 = 0.05 * (math.exp(-0.2) + 0.2 - 1)  # 0.05 * 0.018731
    assert loss[0, 0].item() == pytest.approx(-math.exp(0.2), abs=1e-5)
    assert loss[0, 1].item() == pytest.approx(-1.28 + kl01, abs=1e-5)  # delta 0.9: clipped
    assert loss[1, 0].item() == pytest.approx(0.8, abs=1e-5)
    assert loss[1, 1].item() == pytest.approx(3.0, abs=1e-5)
    assert logs["clip fraction"].tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_kappa_dot_hand_worked():
    """Oracle 7: mu = z = [3, 4], kappa = 0.01 -> 0.25; the seed's "vMF KL" kappa (1 - <mu, z>)
    is -0.24 (negative: kept only as the faithful option's value)."""
    mu = torch.tensor([[3.0, 4.0]])
    assert DotPolicy(0.01).logprob(mu, mu).item() == pytest.approx(0.25)
    loss = DePOLoss(vmf_coef=1.0)
    assert loss.kappa * (1 - (mu * mu).sum()).item() == pytest.approx(-0.24)


def _span_batch(hidden_rows):
    """One sample [x, s, c, c, c, e]: latents fed at 2, 3, 4 (after the start at 1)."""
    lat = torch.tensor([[False, False, True, True, True, False]])
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    hidden = torch.tensor(hidden_rows).unsqueeze(1)  # [s, b=1, h]
    return hidden, {"latent_mask": lat, "latent_vectors": z}


def test_aligned_pairing():
    """Spec 1.9 #1: z_{t+1} is scored by h_t, the output that produced it. The seed pairs z_p
    with h_p (the output at the slot z_p was fed into)."""
    h = [[0.0, 0.0], [2.0, 3.0], [5.0, 7.0], [11.0, 13.0], [17.0, 19.0], [0.0, 0.0]]
    hidden, batch = _span_batch(h)
    g, mu, _ = DePOLoss(kappa=1.0).score_latents(hidden, batch)
    aligned = [2.0 * 1 + 3.0 * 0, 5.0 * 0 + 7.0 * 1, 11.0 + 13.0]  # h_1.z_2, h_2.z_3, h_3.z_4
    seed = [5.0, 13.0, 17.0 + 19.0]  # h_2.z_2, h_3.z_3, h_4.z_4
    assert g.tolist() == aligned and g.tolist() != seed
    assert predictor_rows(batch)[0].tolist() == [1, 2, 3]


def test_latent_count_mismatch_raises():
    """Spec 1.9 #9: the seed drops a sample's latents silently when the counts differ."""
    hidden, batch = _span_batch([[0.0, 0.0]] * 6)
    batch["latent_vectors"] = batch["latent_vectors"][:2]
    with pytest.raises(ValueError, match="3 latent positions but 2 recorded latents"):
        DePOLoss().score_latents(hidden, batch)


def test_gaussian_policy_has_a_gradient_where_a_symmetric_noise_free_one_has_none():
    """Spec 1.9 #5: at z = mu a symmetric density's gradient in mu is 0, so HyLaR's noise-free
    rollouts give a normalised latent term nothing to learn from; a sampled z does."""
    torch.manual_seed(0)
    mu = torch.randn(4, 8, requires_grad=True)
    pol = GaussianPolicy(rho=0.05)
    pol.logprob(mu.detach().clone(), mu).sum().backward()
    assert mu.grad.abs().max().item() <= 1e-7
    mu.grad = None
    z, logp = pol.sample(mu.detach(), torch.Generator().manual_seed(1))
    # the rollout's record equals the training-side log-prob of the same action
    assert torch.allclose(logp, pol.logprob(z, mu.detach()), atol=1e-5)
    pol.logprob(z, mu).sum().backward()
    assert mu.grad.abs().max().item() > 1.0


def test_gaussian_logprob_hand_worked():
    """sigma = rho * RMS(mu) = 0.5 for mu = [0.5, 0.5] / ... : here mu = [1, 1] -> RMS 1,
    rho 0.5; z = [1.5, 1] -> -0.5 * 1 - 2 log 0.5 - log(2 pi)."""
    mu, z = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.5, 1.0]])
    want = -0.5 - 2 * math.log(0.5) - math.log(2 * math.pi)
    assert GaussianPolicy(rho=0.5).logprob(z, mu).item() == pytest.approx(want, abs=1e-6)


def _rl_batch(latent_counts, n_tokens, adv):
    """A micro-batch with `latent_counts[i]` latents in row i and `n_tokens[i]` trained tokens."""
    b, s = len(latent_counts), 12
    lat = torch.zeros(b, s, dtype=torch.bool)
    mask = torch.zeros(b, s)
    for i, (k, n) in enumerate(zip(latent_counts, n_tokens)):
        lat[i, 2:2 + k] = True
        mask[i, 6:6 + n] = 1.0
    n_lat = int(lat.sum())
    return {"latent_mask": lat, "latent_vectors": torch.ones(n_lat, 2),
            "latent_old_logprobs": torch.zeros(n_lat), "loss_mask": mask,
            "old_logprobs": torch.zeros(b, s), "advantages": torch.tensor(adv)}


def test_each_term_is_a_mean_over_its_own_global_count():
    """Spec 1.9 #8: the seed averages per micro-batch (and HyLaR's latent mean is per micro-batch
    too). Two micro-batches of 1 and 3 latents, 4 and 2 text tokens: the step's loss / global
    text tokens = token-mean of the text term + alpha * latent-mean of the latent term."""
    loss = DePOLoss(beta=0.0, kappa=1.0, latent_weight=0.5)
    mbs = [_rl_batch([1], [4], [2.0]), _rl_batch([2, 1], [1, 1], [1.0, -3.0])]
    totals = {"ce": torch.tensor(6.0), "latent": torch.tensor(4.0)}
    step_sum, lat_terms, tok_terms = 0.0, [], []
    for mb in mbs:
        mb["step_totals"] = totals
        hidden = torch.full((12, mb["loss_mask"].shape[0], 2), 0.5)  # g = kappa <h, z> = 1
        step = RLStep(mb, 1.0, loss)
        logp = torch.zeros_like(mb["old_logprobs"])  # ratio 1 on every token
        total, n, logs = step.loss({"logp": logp,
                                    "latent": loss.latent_terms(_NoSP, hidden, mb)})
        step_sum += total.item()
        rows = predictor_rows(mb)[1]
        lat_terms += (-mb["advantages"][rows]).tolist()  # -A * ratio, ratio 1
        tok_terms += [-a for a, k in zip(mb["advantages"].tolist(), mb["loss_mask"].sum(1))
                      for _ in range(int(k))]
    want = sum(tok_terms) / 6 + 0.5 * sum(lat_terms) / 4
    assert step_sum / 6 == pytest.approx(want, abs=1e-6)


class _NoSP:  # the latent term reads only whether the hidden states are sequence-parallel
    class config:
        sequence_parallel = False


def _completion(tokens, latent_pos, forced=()):
    return Completion(tokens=tokens, logprobs=[-1.0] * len(tokens), latent_positions=latent_pos,
                      latents=torch.ones(len(latent_pos), 4), finish_reason="stop",
                      latent_logprobs=[0.0] * len(latent_pos), forced_positions=list(forced))


class _Cfg:
    image_token_id, spatial_merge_size = 99, 2


@pytest.mark.parametrize("forced_end", [False, True])
def test_forced_tokens_get_no_term_and_the_start_is_trained(forced_end):
    """Spec 1.9 #2, #3, #16: the latent slots (forced <|canvas|>) get no categorical term; the
    span end is trained when it was sampled and not when the cap forced it; HyLaR trains the
    sampled <|canvas_start|> (LVR's GRPO excludes its opener). Ids: start 5, latent 6, end 7."""
    prompt = Prompt(input_ids=[1, 2, 3])
    comp = _completion([8, 5, 6, 6, 7, 9], [2, 3], forced=[4] if forced_end else [])
    mb = rollout_micro_batches([prompt, prompt], [comp, comp], torch.tensor([1.0, -1.0]),
                               cfg=_Cfg, pad_id=0, micro_batch_size=2, pad_to=12,
                               exclude_ids=())[0]
    # label index t carries token t+1: completion token j sits at n_prompt - 1 + j = 2 + j
    trained = mb["loss_mask"][0].nonzero().flatten().tolist()
    want = [2, 3, 7] + ([] if forced_end else [6])
    assert sorted(trained) == sorted(want)
    assert mb["latent_mask"][0].nonzero().flatten().tolist() == [5, 6]


def test_latent_old_is_the_same_forward_not_the_decode_value():
    """Spec 1.9 #7: with one PPO epoch the latent ratio is exactly 1 whatever the decode kernels
    recorded (kappa <h, z> amplifies their rounding by |z|^2); the record is only compared."""
    loss = DePOLoss(kappa=1.0, latent_weight=1.0)
    mb = _rl_batch([2, 1], [1, 1], [1.0, -3.0])
    mb["latent_old_logprobs"] = torch.tensor([5.0, -5.0, 0.3])  # far off: ratio e^-4 if used
    mb["step_totals"] = {"ce": torch.tensor(4.0), "latent": torch.tensor(3.0)}
    hidden = torch.full((12, 2, 2), 0.5)  # g = 1 for every latent
    latent_loss, logs = loss.latent_terms(_NoSP, hidden, mb)
    # sum over latents of -A (ratio 1) = -(1 + 1 - 3) = 1, scaled by ce / latent = 4 / 3
    assert latent_loss.item() == pytest.approx(1.0 * 4 / 3)
    assert logs["latent clip fraction"][0].item() == 0.0
    assert logs["latent rollout gap"][0].item() == pytest.approx(4.0 + 6.0 + 0.7)
    mb["latent_recomputed_logprobs"] = torch.tensor([0.8, 1.0, 1.0])  # a later PPO epoch
    _, logs = loss.latent_terms(_NoSP, hidden, mb)
    assert logs["latent clip fraction"][0].item() == 1.0  # r = e^0.2 > 1.1 with A = +1


def test_hylar_rewards_on_decoded_text(tiny_ckpts):
    """Spec 1.9 #17: HyLaR's format (think, canvas span, think, answer; at least one span) and
    its accuracy (-1 on heavy repetition) on text as the rollout decodes it."""
    from transformers import AutoProcessor

    from megatron_latent.latent import registry
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

    path = tiny_ckpts["tiny-a"]
    proc = AutoProcessor.from_pretrained(path)
    method = registry.build("hylar", proc.tokenizer, Qwen25VLConfig.from_hf(path))
    r = method.rl_rewards()
    span = "<|canvas_start|>" + "<|canvas|>" * 3 + "<|canvas_end|>"
    good = f"<think>look</think>\n{span}\n<think>red</think><answer>red</answer><|im_end|>"
    assert r["format"](good, "red") == 1.0 and r["accuracy"](good, "red") == 1.0
    assert r["format"]("<think>look</think><answer>red</answer>", "red") == 0.0  # no span
    looped = "<think>" + "the cat sat on the mat " * 40 + f"</think>{span}<answer>red</answer>"
    assert r["accuracy"](looped, "red") == -1.0
    assert method.rl_untrained_ids() == ()  # <|canvas_start|> is trained (LVR's opener is not)
    assert method.rl_decode_program().steps == 32  # spec 1.9 #10: the cap is wired, 2 x 16
