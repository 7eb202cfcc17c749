"""The HF-transformers side of benchmarks/bench_sft.py: the LVR SFT step written against
`Qwen2_5_VLForConditionalGeneration`'s modules, as the seeds do, and the optimizer of the seeds'
recipe (see bench_sft.py's doc for the recipes)."""

from __future__ import annotations

LAMBDA = 0.1  # the LVR loss weight of both paths
# HF recipes: (gradient checkpointing, fp32 master weights)
HF_RECIPES = {"fastest": (False, False), "seeds": (True, True)}


def hf_loss_terms(hf, mb: dict, ids: dict):
    """(CE sum over loss_mask, squared-error sum at latent predictor positions) of one
    micro-batch, written against transformers' modules: image features and the detached latent
    targets scattered into inputs_embeds, our mRoPE positions, post-norm hidden states."""
    import torch
    import torch.nn.functional as F

    from megatron_latent.latent.lvr import predictor_mask

    input_ids = mb["input_ids"]
    feats = torch.cat(hf.model.get_image_features(mb["pixel_values"],
                                                  mb["image_grid_thw"]).pooler_output)
    emb = hf.model.get_input_embeddings()(input_ids)
    emb = emb.masked_scatter((input_ids == ids["image"]).unsqueeze(-1), feats.to(emb.dtype))
    targets = feats[mb["latent_index"]].detach().to(emb.dtype)
    emb = emb.masked_scatter(mb["latent_mask"].unsqueeze(-1), targets)
    h = hf.model(inputs_embeds=emb, position_ids=mb["position_ids"], attention_mask=None,
                 use_cache=False).last_hidden_state  # after the final RMSNorm
    logits = hf.lm_head(h)
    labels = mb["labels"].masked_fill(mb["loss_mask"] == 0, -100)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                         reduction="sum")
    pred = h[predictor_mask(mb["latent_mask"])]
    sq = (pred.float() - targets.float()).pow(2).sum()
    return ce, sq


def hf_step_totals(micro_batches, hidden: int) -> tuple[float, float]:
    """(loss tokens, latent elements) of the step; the seeds' Trainer counts them on the host
    batch, so the timed step is given them (counting GPU tensors would wait for the GPU)."""
    n_ce = sum(float(mb["loss_mask"].sum()) for mb in micro_batches)
    n_lat = sum(float(mb["latent_mask"].sum()) for mb in micro_batches) * hidden
    return n_ce, n_lat


def hf_loss(hf, micro_batches, ids, hidden) -> dict:
    """{"lm loss", "latent mse", "loss"} of the step, forward only (the keys of eval_losses)."""
    import torch

    n_ce, n_lat = hf_step_totals(micro_batches, hidden)
    with torch.no_grad():
        parts = [hf_loss_terms(hf, mb, ids) for mb in micro_batches]
    ce = sum(c.item() for c, _ in parts) / n_ce
    mse = sum(sq.item() for _, sq in parts) / n_lat
    return {"lm loss": ce, "latent mse": mse, "loss": ce + LAMBDA * mse}


def hf_train_step(hf, optimizer, params, micro_batches, ids, totals) -> None:
    import torch

    n_ce, n_lat = totals  # hf_step_totals
    optimizer.zero_grad(set_to_none=True)
    for mb in micro_batches:  # gradient accumulation: each term a mean over the step
        ce, sq = hf_loss_terms(hf, mb, ids)
        (ce / n_ce + LAMBDA * sq / n_lat).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    optimizer.step()


class MasterAdamW:
    """The seeds' DeepSpeed bf16 optimizer on one GPU (ZeRO stage aside): fp32 master copies of
    the bf16 weights, fused AdamW with fp32 moments on them, the bf16 grads upcast each step and
    the updated masters copied back into the bf16 weights."""

    def __init__(self, params, **adam):
        import torch

        self.params = params
        self.master = [p.detach().float() for p in params]
        self.opt = torch.optim.AdamW(self.master, **adam)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        for m, p in zip(self.master, self.params):
            m.grad = p.grad.float()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)
