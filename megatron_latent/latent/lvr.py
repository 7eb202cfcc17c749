"""LVR (Latent Visual Reasoning), stage 1: latent steps regress the box's visual tokens.

Input embeddings at `<|lvr|>` positions are overwritten by the (detached) merged visual tokens of
the box, teacher-forced. Loss = CE (targets equal to `<|lvr|>` are not CE-supervised; the data
pipeline leaves them out of loss_mask) + lambda * MSE, where the final-norm hidden state at t is
regressed onto the visual token injected at t+1 (mean over elements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_latent.data.lvr_tokens import LVR_TOKENS as TOKENS
from megatron_latent.latent import pipeline_channel
from megatron_latent.latent.base import LatentMethod, LatentStep, whole_sequence
from megatron_latent.latent.decoding import LatentRule
from megatron_latent.latent.registry import register


@register
@dataclass
class LVR(LatentMethod):
    lvr_id: int
    start_id: int
    end_id: int
    hidden_size: int
    loss_lambda: float = 0.1
    name = "lvr"
    tokens = TOKENS

    @classmethod
    def create(cls, token_ids, model_cfg, loss_lambda: float = 0.1) -> "LVR":
        return cls(lvr_id=token_ids["<|lvr|>"], start_id=token_ids["<|lvr_start|>"],
                   end_id=token_ids["<|lvr_end|>"], hidden_size=model_cfg.hidden_size,
                   loss_lambda=loss_lambda)

    def hparams(self) -> dict:
        return {"loss_lambda": self.loss_lambda}

    @classmethod
    def add_args(cls, parser) -> None:
        parser.add_argument("--lvr-loss-lambda", type=float, default=None,
                            help="LVR: weight of the latent MSE (default 0.1)")

    @classmethod
    def hparams_from_args(cls, args) -> dict:
        lam = getattr(args, "lvr_loss_lambda", None)
        return {} if lam is None else {"loss_lambda": lam}

    def sft_dataset(self, data_path, **kwargs):
        from megatron_latent.data.lvr_dataset import LvrSftDataset

        return LvrSftDataset(data_path, **kwargs)

    def sft_step(self, micro_batch: dict) -> "LVRStep":
        return LVRStep(self, micro_batch)

    def count(self, mb: dict) -> dict[str, float]:
        lat = mb["latent_mask"]
        starts = lat[:, 0] if "cu_seqlens" not in mb else lat[0, mb["cu_seqlens"][:-1].long()]
        if bool(starts.any()):  # its predictor would be another sample's token, or none
            raise ValueError("an <|lvr|> token starts a sample: nothing precedes it to predict "
                             "it (latent tokens follow <|lvr_start|>)")
        return {"ce": float(mb["loss_mask"].sum()), "latent": float(lat.sum()) * self.hidden_size}

    def total_loss(self, means: dict) -> float:
        return means["lm loss"] + self.loss_lambda * means.get("latent mse", 0.0)

    def decode_program(self, mode: str | None = None, steps: int | None = None,
                       threshold: float = 0.5):
        return LatentRule(self.start_id, self.lvr_id, self.end_id, mode or "steps",
                          self.default_latent_steps if steps is None else steps, threshold)

    def rl_untrained_ids(self) -> tuple[int, ...]:
        # seed-methods.md 2.7: the span's opener gets no policy or KL term
        return (self.start_id,)

    def rl_format_reward(self):
        from megatron_latent.eval.formats import make_format_reward

        return make_format_reward(TOKENS[0], TOKENS[2])

    def probe_regions(self, micro_batch, image_features, spatial_merge_size):
        """The box's visual tokens among same-size tiles of its image's merged token grid."""
        from megatron_latent.eval.latent_probe import box_regions

        return box_regions(micro_batch["latent_mask"], micro_batch["latent_index"],
                           image_features, micro_batch["image_grid_thw"], spatial_merge_size)


def predictor_mask(latent_mask: torch.Tensor) -> torch.Tensor:
    """[b, s]: True at t when t+1 is a latent position (its hidden state predicts that token)."""
    return torch.nn.functional.pad(latent_mask[:, 1:], (0, 1), value=False)


class LVRStep(LatentStep):
    def __init__(self, method: LVR, batch: dict):
        self.m, self.batch = method, batch
        self.targets = None

    def n_latent(self) -> int:
        """<|lvr|> tokens of this micro-batch: from the host counts of the training step when
        present (reading the device mask would stall the host on the GPU every micro-batch)."""
        latent = (self.batch.get("counts") or {}).get("latent")
        if latent is not None:
            return round(latent / self.m.hidden_size)
        return int(self.batch["latent_mask"].sum())

    def inject(self, embeddings, image_features, modules=None):
        mask, index = self.batch["latent_mask"], self.batch["latent_index"]
        if self.n_latent() != index.numel():
            raise ValueError(f"{self.n_latent()} <|lvr|> tokens but {index.numel()} latent targets")
        targets = image_features[index].detach().to(embeddings.dtype)
        self.targets = pipeline_channel.first_to_last(targets, tuple(targets.shape),
                                                      targets.dtype, targets.device)
        return embeddings.masked_scatter(mask.unsqueeze(-1), targets)

    def head(self, model, *, hidden_states, output_layer, output_weight, labels=None,
             runtime_gather_output=None, **_):
        if self.targets is None:  # the last stage is not the first: receive them
            n = self.n_latent()
            self.targets = pipeline_channel.first_to_last(
                None, (n, hidden_states.shape[-1]), model.config.params_dtype,
                hidden_states.device)
        logits = model.logits(hidden_states, output_layer, output_weight, runtime_gather_output)
        ce = model.cross_entropy(labels, logits)
        return {"ce": ce, "latent_sq": self.regression_sq(whole_sequence(model, hidden_states))}

    def regression_sq(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Sum over latent slots t+1 of ||h[t] - target||^2 (fp32); `hidden_states` [s, b, h]
        whole (not SP-split), final-norm."""
        mask = predictor_mask(self.batch["latent_mask"])  # [b, s]
        if self.batch.get("counts") is not None:
            # a training step: count() checked no latent token starts a sample, so there is
            # one predictor row per latent token; a fixed-size nonzero needs no host sync
            where = torch.nonzero_static(mask.flatten(), size=self.n_latent()).squeeze(1)
        else:  # unchecked: a missing predictor row then fails on the shapes below
            where = mask.flatten().nonzero().squeeze(1)
        b, s = mask.shape
        pred = hidden_states.flatten(0, 1)[(where % s) * b + where // s]  # [s, b] rows
        return (pred.float() - self.targets.float()).pow(2).sum()

    def loss(self, output):
        mask = self.batch["loss_mask"].float()
        ce_sum, n_ce = (output["ce"].float() * mask).sum(), mask.sum()
        totals = self.batch["step_totals"]
        # each term a mean over the global batch: megatron divides the sum by totals["ce"]
        scale = totals["ce"] / totals["latent"].clamp(min=1.0)  # 0-d tensors, on the GPU
        total = ce_sum + self.m.loss_lambda * output["latent_sq"] * scale
        n_lat = float(self.n_latent() * self.m.hidden_size)
        logs = {"lm loss": torch.stack([ce_sum.detach(), n_ce]),
                "latent mse": torch.stack([output["latent_sq"].detach(),
                                           # a fill kernel, not a synchronous copy
                                           torch.full((), n_lat, device=mask.device)])}
        return total, n_ce.to(torch.int), logs
