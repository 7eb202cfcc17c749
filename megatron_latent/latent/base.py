"""The interface every latent method implements, used the same way by SFT, generation and RL.

A `LatentMethod` (one registered class per recipe: latent/registry.py) owns, behind this one
interface, everything that differs between recipes:

- its tokens (`tokens`, added in that order, `special_tokens` as its released checkpoints have
  them) and hyper-parameters (`hparams()`, recorded in every checkpoint it writes);
- its side modules (`build_modules`): built with the model on the right pipeline stage, held at
  `model.latent_modules`, so DDP, the optimizer (`optimizer_overrides`, `frozen_patterns`), the
  dist checkpoint and the converters (`hf_side_name`) see them like any other parameter;
- its data (`sft_dataset`: a dataset with `collate(samples, pad_to)`);
- its training step (`count`, `sft_step` -> a `LatentStep`, `total_loss`);
- its decode program (`decode_program`: latent.decoding);
- its RL terms (`rl_policy_loss`, `rl_untrained_ids`, `rl_format_reward`).

For each micro-batch, a `LatentStep` is what the model calls at its two injection points:

- `inject(embeddings [b, s, h], image_features [n, h], modules)` on the first pipeline stage,
  after image features are scattered in and before the sequence-parallel scatter: overwrite the
  input embeddings at latent positions (SFT: teacher-forcing targets; RL: recorded rollout
  latents; generation: the fed-back vectors); `modules` = the method's side modules;
- `head(model, hidden_states=[s, b, h] final-norm, output_layer=..., ...)` on the last stage, as
  GPTModel's output processor: whatever the loss (or the decoder) needs;
- `loss(output) -> (loss_sum, n_tokens, logs)`: megatron's per-token loss contract.

`count(micro_batch)` returns the token/element counts of each loss term; the training step sums
them over all micro-batches and data-parallel ranks into `micro_batch["step_totals"]` (0-d
tensors on the compute device) before the schedule runs, so each term is a true mean over the
global batch; the micro-batch's own counts go into `micro_batch["counts"]` (host numbers: a
step reads them instead of syncing on the GPU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from megatron_latent.latent import tokens as token_utils


class LatentStep(ABC):
    def inject(self, embeddings: torch.Tensor, image_features: torch.Tensor | None,
               modules=None) -> torch.Tensor:
        return embeddings

    def layer_hooks(self) -> dict:
        """{global 1-based decoder layer: fn(h) -> h} run at that layer's output [s_local, b, h]
        on its pipeline stage (models/qwen25vl/layer_hooks.py: AuxLoss, select_local)."""
        return {}

    @abstractmethod
    def head(self, model, *, hidden_states, output_layer, output_weight, labels=None, **kwargs):
        ...

    @abstractmethod
    def loss(self, output) -> tuple[torch.Tensor, torch.Tensor, dict]:
        ...


class LatentMethod(ABC):
    name: str = "base"
    tokens: tuple[str, ...] = ()
    special_tokens: bool = True
    # the cap (or quota) of latent inputs per span at generation when the user gives none
    default_latent_steps: int = 8
    # the user turn's layout in the method's SFT data, which generation and RL prompts follow
    prompt_images_first: bool = True
    has_rl_stage: bool = True  # False: its RL stage is not built (train_grpo refuses it)

    # ------------------------------------------------------------ construction
    @classmethod
    def add_tokens(cls, tokenizer, vocab_size: int) -> dict[str, int]:
        """Add this method's tokens (order and specialness fixed) -> {token: id}."""
        if not cls.tokens:
            return {}
        return token_utils.add_tokens(tokenizer, cls.tokens, vocab_size,
                                      special=cls.special_tokens)

    @classmethod
    def create(cls, token_ids: dict[str, int], model_cfg, **hparams) -> "LatentMethod":
        """The method for a model config, its token ids and hyper-parameters (`hparams()`)."""
        return cls(**hparams)

    def hparams(self) -> dict:
        """JSON-able hyper-parameters, recorded in checkpoints; `create` takes them back."""
        return {}

    @classmethod
    def detect_hf(cls, hf_config: dict) -> dict | None:
        """A record {"name", "hparams"} if an HF config.json is this method's release."""
        return None

    @classmethod
    def add_args(cls, parser) -> None:
        """This method's command-line flags (Megatron-LM style names)."""

    @classmethod
    def hparams_from_args(cls, args) -> dict:
        return {}

    # ------------------------------------------------------------ side modules
    def build_modules(self, model_cfg, *, pre_process: bool, post_process: bool):
        """The method's own trainable modules for this pipeline stage (a torch module whose
        parameters become `latent_modules.*` of the model), or None."""
        return None

    def optimizer_overrides(self) -> dict[tuple[str, ...], float]:
        """{fnmatch name patterns: LR} for parameter groups with their own LR."""
        return {}

    def hf_side_name(self, hf_name: str) -> str | None:
        """For a tensor embedded in an HF checkpoint's main weights: its side-module name
        (without `latent_modules.`) if it is this method's, "" if it is the method's but not
        kept (dropped on import), None if it is not the method's."""
        return None

    def hf_config_keys(self) -> dict:
        """Keys this method's released HF checkpoints carry in config.json (added on export)."""
        return {}

    def frozen_patterns(self) -> tuple[str, ...]:
        """fnmatch name patterns of side-module parameters to freeze (no grad, no optimizer
        state), e.g. by a --freeze flag of the method."""
        return ()

    # ------------------------------------------------------------ data and training
    def sft_dataset(self, data_path, **kwargs):
        """The SFT dataset for this method (`collate(samples, pad_to)`, `pack(...)`)."""
        raise NotImplementedError(f"latent method {self.name!r} has no SFT data loader")

    def prepare_step(self, model_chunks, micro_batches: list[dict], forward_only) -> None:
        """Before a step's schedule: forward-only passes whose results the step's micro-batches
        need (e.g. hidden states its latents are built from), attached to them in place.
        `forward_only(model_chunks, micro_batches, method) -> head outputs on the last stage`."""

    @abstractmethod
    def sft_step(self, micro_batch: dict) -> LatentStep:
        ...

    def count(self, micro_batch: dict) -> dict[str, float]:
        return {"ce": float(micro_batch["loss_mask"].sum())}

    def stage_logs(self) -> dict:
        """{log name: (sum, count) tensor [2]} of terms this rank computed outside the head
        during the step just run (e.g. at layer hooks, on any pipeline stage), then cleared;
        the same names on every stage (zeros where none). Summed over stages and data-parallel
        ranks with the head's logs."""
        return {}

    def total_loss(self, means: dict) -> float:
        """The reported loss from the per-term means of the logs (e.g. "lm loss")."""
        return means["lm loss"]

    # ------------------------------------------------------------ generation and RL
    def decode_program(self, mode: str | None = None, steps: int | None = None,
                       threshold: float = 0.5):
        """What generation does at latent events (latent.decoding.LatentRule); None: none."""
        return None

    def for_rl(self) -> "LatentMethod":
        """The method as its RL stage trains it (e.g. side modules only SFT uses frozen)."""
        return self

    def rl_decode_program(self, mode: str | None = None, steps: int | None = None,
                          threshold: float = 0.5):
        """The decode program of RL rollouts: `decode_program`'s, unless the method's latent
        policy is stochastic (its actions sampled and their log-probs recorded)."""
        return self.decode_program(mode, steps, threshold)

    def rl_defaults(self) -> dict:
        """The method's RL recipe: values of the GRPO loop's settings a user leaves unset (the
        LVR seed's stage 2 here: TRL 0.17 GRPO's clip and KL)."""
        return {"eps_low": 0.2, "eps_high": 0.2, "kl_beta": 0.04,
                "rewards": "accuracy:1.0,format:1.0"}

    def rl_untrained_ids(self) -> tuple[int, ...]:
        """Sampled completion ids that get no policy or KL term (besides latent positions)."""
        return ()

    def rl_policy_loss(self, eps_low: float, eps_high: float, kl_beta: float):
        """The policy loss of this method's RL stage (rl/losses.py `PolicyLoss`): GRPO over
        sampled tokens by default; a method adds its latent terms by its own subclass."""
        from megatron_latent.rl.losses import GRPOLoss

        return GRPOLoss(eps_low, eps_high, kl_beta)

    def rl_rewards(self) -> dict:
        """The method's own rewards by name (fn(completion, reference) -> float): its `format`
        by default; they override the generic ones of the same name."""
        fmt = self.rl_format_reward()
        return {} if fmt is None else {"format": fmt}

    def rl_format_reward(self):
        """The method's `format` reward (fn(completion, reference) -> float), or None."""
        return None

    def probe_targets(self, step: LatentStep) -> torch.Tensor | None:
        """The latent probe (eval/probe_runner.py): the targets [n_latent, h] of a teacher-forced
        SFT step's latent slots (row-major) after its forward; None: the method has none."""
        return getattr(step, "targets", None)

    def probe_regions(self, micro_batch: dict, image_features, spatial_merge_size: int):
        """The latent probe: for each latent span of a teacher-forced micro-batch (row-major),
        (candidate regions [k, h] of its own image, the index of its target among them);
        None: the targets are not image regions (the probe compares across samples only)."""
        return None


class PlainLM(LatentMethod):
    """No latent steps: next-token CE only (the default head of the model)."""

    name = "none"

    def sft_dataset(self, data_path, **kwargs):
        from megatron_latent.data.lvr_dataset import LvrSftDataset

        return LvrSftDataset(data_path, latent_tokens=False, **kwargs)

    def sft_step(self, micro_batch: dict) -> LatentStep:
        return _PlainStep(micro_batch)


class _PlainStep(LatentStep):
    def __init__(self, batch):
        self.batch = batch

    def head(self, model, **kw):
        return model.lm_head(**kw)

    def loss(self, per_token_ce):
        return token_sum_loss(self.batch["loss_mask"], per_token_ce)


class InjectLatents(LatentStep):
    """Feeds given vectors [n, h] at the True positions of `mask` [b, s] (row-major order):
    replaying recorded rollout latents, or checking cached decoding against a full recompute.
    The head is the model's default (logits, or CE with labels)."""

    def __init__(self, mask: torch.Tensor, vectors: torch.Tensor):
        if int(mask.sum()) != vectors.shape[0]:
            raise ValueError(f"{int(mask.sum())} latent positions but {vectors.shape[0]} vectors")
        self.mask, self.vectors = mask, vectors

    def inject(self, embeddings, image_features, modules=None):
        vec = self.vectors.to(embeddings.device, embeddings.dtype)
        return embeddings.masked_scatter(self.mask.to(embeddings.device).unsqueeze(-1), vec)

    def head(self, model, **kw):
        return model.lm_head(**kw)

    def loss(self, output):
        raise NotImplementedError("InjectLatents only feeds vectors; compute the loss outside")


def whole_sequence(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final-norm states [s, b, h] whole on every tensor-parallel rank (gathered from the
    sequence-parallel slices, the gradient not reduced again): a head term over chosen
    positions is then computed identically on every TP rank."""
    if not model.config.sequence_parallel:
        return hidden
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_sequence_parallel_region(
        hidden, tensor_parallel_output_grad=False)


def token_sum_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(sum, n_tokens, logs) with calculate_per_token_loss: megatron divides by the global count."""
    mask = loss_mask.float()
    total = (per_token_loss.float() * mask).sum()
    n = mask.sum()
    return total, n.to(torch.int), {"lm loss": torch.stack([total.detach(), n.detach()])}
