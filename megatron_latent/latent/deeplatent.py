"""DeepLatent (spec hylar-deeplatent-spec.md section 2; docs/deeplatent.md says which choices are
the paper's and which are ours).

Stage 1: CE over interleaved trajectories whose reasoning images are real assistant images
(no side modules). Stage 2: each assistant image becomes a latent block
`<latent> scale qmod imod pad*(H*W) </latent>`; the grid is built in one pass by the side
modules (latent/latentformer.py) from the final-norm states at qmod/imod, which come from a
forward-only *context pass* before the step (`prepare_step`: a teacher-forced forward cannot
produce its own inputs). Loss = CE (text, <|im_end|>, <latent>) + 4.0 * (1 - cos) to the stage-1
model's states at the same slots, at the chosen layers (layer hooks, any pipeline stage) +
0.5 * (CE(H) + CE(W)) of the scale head on the training pass's h_scale.

RL (spec 2.9; latent/deeplatent_rl.py): continuous-space GRPO from a stage-2 checkpoint: rollouts
sample both modulations and record their statistics; the loss scores them with the trained
MLPs on the training forward's states; grid, LatentFormer and scale head frozen.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch

from megatron_latent.data.deeplatent_tokens import IMOD, LATENT_TOKENS, PAD, QMOD, SCALE, START
from megatron_latent.latent.base import LatentMethod, LatentStep, _PlainStep, whole_sequence
from megatron_latent.latent.registry import register

END = LATENT_TOKENS[1]


@register
@dataclass
class DeepLatent(LatentMethod):
    ids: dict
    hidden_size: int
    num_layers: int
    image_token_id: int
    spatial_merge_size: int
    stage: int = 2
    align_layers: list[int] | None = None  # None: 4 evenly spaced, the last included
    lambda_align: float = 4.0
    lambda_scale: float = 0.5
    max_blocks: int = 5
    latentformer_layers: int = 1
    latentformer_ffn: bool = False
    sigma_q: float | None = None  # 0.1 x RMS of the base variable, fixed at the first step
    sigma_f: float | None = None
    # the teacher states: a cache dir (tools/cache_teacher_states.py), or a stage-1 checkpoint
    # (a megatron_latent checkpoint or an HF dir) run online as a frozen copy in each step
    teacher: str | None = None
    context_passes: int = 1
    latent_positions: str = "image"
    freeze_modules: bool = False
    # RL (spec 2.9): the continuous log-prob summed over all dims (paper) or mean per dim;
    # the old policy of the ratio: this forward's (exactly on-policy) or the rollout's
    cont_logprob_reduction: str = "sum"
    cont_old_policy: str = "forward"
    # the LR of the modulation MLPs (None: the run's): their output moves the sampled actions'
    # mean in units of sigma (0.1 x RMS of the base), which one Adam step at a text LR can
    # move by hundreds of sigmas (docs/deeplatent.md)
    modulation_lr: float | None = None
    name = "deeplatent"
    tokens = LATENT_TOKENS
    special_tokens = False
    prompt_images_first = False  # Zebra-CoT: the question, then its images
    _rl: bool = field(default=False, repr=False, compare=False)
    _teacher_cache: object = field(default=None, repr=False, compare=False)
    _align_logs: list = field(default_factory=list, repr=False, compare=False)
    _split_logs: bool = field(default=False, repr=False, compare=False)
    _feature_sq: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"DeepLatent stage must be 1 or 2, got {self.stage}")
        if self.align_layers is None:
            n = self.num_layers
            self.align_layers = sorted({max(1, round(n * k / 4)) for k in (1, 2, 3, 4)})
        bad = [layer for layer in self.align_layers if not 1 <= layer <= self.num_layers]
        if bad:
            raise ValueError(f"align layers {bad}: the model has layers 1..{self.num_layers}")

    @classmethod
    def create(cls, token_ids, model_cfg, **hparams) -> "DeepLatent":
        return cls(ids=dict(token_ids), hidden_size=model_cfg.hidden_size,
                   num_layers=model_cfg.num_layers, image_token_id=model_cfg.image_token_id,
                   spatial_merge_size=model_cfg.spatial_merge_size, **hparams)

    def hparams(self) -> dict:
        keys = ("stage", "align_layers", "lambda_align", "lambda_scale", "max_blocks",
                "latentformer_layers", "latentformer_ffn", "sigma_q", "sigma_f", "teacher",
                "context_passes", "latent_positions", "freeze_modules",
                "cont_logprob_reduction", "cont_old_policy", "modulation_lr")
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def add_args(cls, parser) -> None:
        a = parser.add_argument
        a("--deeplatent-stage", type=int, choices=(1, 2), default=None,
          help="DeepLatent: 1 = CE with real assistant images, 2 = latent blocks (default 2)")
        a("--align-layers", default=None,
          help="DeepLatent: 1-based decoder layers aligned to the teacher, e.g. 7,14,21,28")
        a("--teacher-states", default=None,
          help="DeepLatent stage 2: the teacher-state cache (tools/cache_teacher_states.py), "
               "or the stage-1 checkpoint to run online (no disk; one more frozen model)")
        a("--align-loss-weight", type=float, default=None, help="DeepLatent: (4.0)")
        a("--scale-loss-weight", type=float, default=None, help="DeepLatent: (0.5)")
        a("--latentformer-layers", type=int, default=None, help="DeepLatent: (1)")
        a("--context-passes", type=int, default=None,
          help="DeepLatent: context passes before a step; n makes blocks <= n exact (1)")
        from megatron_latent.latent.deeplatent_rl import OLD_POLICIES, REDUCTIONS

        a("--cont-logprob-reduction", choices=REDUCTIONS, default=None,
          help="DeepLatent RL: the modulation actions' log-prob and KL summed over all dims "
               "(sum, the paper's) or divided by them (mean_per_dim)")
        a("--cont-old-policy", choices=OLD_POLICIES, default=None,
          help="DeepLatent RL: the ratio's old policy: this forward's, detached (forward, "
               "default), or the rollout's recorded modulation (rollout)")
        a("--modulation-lr", type=float, default=None,
          help="DeepLatent: LR of the modulation MLPs MLP_l / MLP_i (default: --lr)")

    @classmethod
    def hparams_from_args(cls, args) -> dict:
        pairs = (("stage", "deeplatent_stage"), ("teacher", "teacher_states"),
                 ("lambda_align", "align_loss_weight"), ("lambda_scale", "scale_loss_weight"),
                 ("latentformer_layers", "latentformer_layers"),
                 ("context_passes", "context_passes"),
                 ("cont_logprob_reduction", "cont_logprob_reduction"),
                 ("cont_old_policy", "cont_old_policy"), ("modulation_lr", "modulation_lr"))
        out = {k: getattr(args, f) for k, f in pairs if getattr(args, f, None) is not None}
        if getattr(args, "align_layers", None):
            out["align_layers"] = [int(x) for x in args.align_layers.split(",")]
        return out

    # ------------------------------------------------------------ side modules
    def build_modules(self, model_cfg, *, pre_process: bool, post_process: bool):
        if self.stage == 1:
            return None
        from megatron_latent.latent.latentformer import DeepLatentModules

        return DeepLatentModules.from_model_config(
            model_cfg, pre_process=pre_process, post_process=post_process,
            latentformer_layers=self.latentformer_layers, latentformer_ffn=self.latentformer_ffn)

    def optimizer_overrides(self) -> dict:
        if self.modulation_lr is None:
            return {}
        return {("*latent_modules.mlp_l.*", "*latent_modules.mlp_i.*"): self.modulation_lr}

    def frozen_patterns(self) -> tuple[str, ...]:
        if self.freeze_modules:
            return ("*latent_modules.*",)
        if self._rl:
            from megatron_latent.latent.deeplatent_rl import RL_FROZEN_PATTERNS

            return RL_FROZEN_PATTERNS
        return ()

    # ------------------------------------------------------------ data and training
    def sft_dataset(self, data_path, **kwargs):
        from megatron_latent.data.deeplatent_data import DeepLatentDataset

        kwargs.pop("latent_tokens", None)
        ds = DeepLatentDataset(data_path, stage=self.stage, max_blocks=self.max_blocks,
                               latent_positions=self.latent_positions, **kwargs)
        if self.stage == 2 and self.online_teacher:
            return _WithStage1(ds, DeepLatentDataset(data_path, stage=1,
                                                     max_blocks=self.max_blocks, **kwargs))
        return ds

    @property
    def online_teacher(self) -> bool:
        from megatron_latent.latent.teacher import cache_dir

        return self.teacher is not None and not (cache_dir(self.teacher) / "index.json").is_file()

    def count(self, mb: dict) -> dict[str, float]:
        out = {"ce": float(mb["loss_mask"].sum())}
        if self.stage == 2:
            n_slots = int(mb["latent_mask"].sum())
            out["align"] = float(n_slots * len(self.align_layers))
            out["blocks"] = float(mb["blocks"].shape[0])
        return out

    def stage_logs(self) -> dict:
        if self.stage == 1:
            return {}
        logs, self._align_logs[:] = list(self._align_logs), []
        total = (torch.stack(logs).sum(0) if logs else torch.zeros(2))
        if self._split_logs:  # sequence parallel: each TP rank scored its own slots
            import torch.distributed as dist
            from megatron.core import parallel_state as ps

            total = total.to(logs[0].device if logs else _device())
            dist.all_reduce(total, group=ps.get_tensor_model_parallel_group())
            self._split_logs = False
        return {"align loss": total}

    def total_loss(self, means: dict) -> float:
        return (means["lm loss"] + self.lambda_align * means.get("align loss", 0.0)
                + self.lambda_scale * means.get("scale loss", 0.0))

    def sft_step(self, mb: dict) -> LatentStep:
        return _PlainStep(mb) if self.stage == 1 else DeepLatentStep(self, mb)

    def prepare_step(self, model_chunks, micro_batches, forward_only) -> None:
        """The context pass(es): the final-norm states at every block's placeholders; an
        online teacher's states of the step's samples (a cache is read where the alignment
        needs it, `teacher_states`: a forward-only pass, e.g. the latent probe, needs none)."""
        if self.stage == 1:
            return
        if self.sigma_f is None:  # over the whole first global batch: the same in any layout
            self._feature_sq = torch.zeros(2, dtype=torch.float64)
        prev = None
        for _ in range(self.context_passes):
            outs = forward_only(model_chunks, micro_batches, _ContextPass(self, prev))
            prev = [_last_to_first(o if outs else None, (mb["blocks"].shape[0], 3,
                                                         self.hidden_size))
                    for mb, o in zip(micro_batches, outs or [None] * len(micro_batches))]
            if self._feature_sq is not None:  # before a later pass or the step injects noise
                self._fix_sigma_f()
        for mb, mod in zip(micro_batches, prev):
            mb["mod_hidden"] = mod
        if not self.online_teacher:
            return
        if self._teacher_cache is None:
            self._teacher_cache = self._open_teacher(model_chunks, forward_only)
        if any("teacher_batch" not in mb for mb in micro_batches):
            raise ValueError("an online teacher needs each sample's stage-1 sequence: build "
                             "the dataset with this method's sft_dataset")
        states = self._teacher_cache.states([mb.pop("teacher_batch") for mb in micro_batches])
        for mb, st in zip(micro_batches, states):
            mb["teacher"] = st

    def teacher_states(self, mb: dict) -> dict:
        """{layer: states [n_slots, h]} of the micro-batch's grid slots: the online teacher's
        (prepare_step), or read from the cache now."""
        if "teacher" in mb:
            return mb["teacher"]
        if self.teacher is None:
            raise ValueError("DeepLatent stage 2 needs teacher states: --teacher-states DIR (a "
                             "cache written by tools/cache_teacher_states.py, or the stage-1 "
                             "checkpoint to run online)")
        if self._teacher_cache is None:
            self._teacher_cache = self._open_teacher(None, None)
        mb["teacher"] = self._teacher_cache.get(mb["sample_ids"], self.align_layers)
        return mb["teacher"]

    def _fix_sigma_f(self) -> None:
        """sigma_f = 0.1 x RMS of the question features the first context pass saw, over all
        data-parallel ranks: the same in any layout, recorded with the hparams."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        sq = self._feature_sq.to(_device())
        dist.all_reduce(sq, group=ps.get_data_parallel_group())
        if ps.is_pipeline_first_stage():  # the stage that injects
            self.sigma_f = 0.1 * float((sq[0] / sq[1].clamp(min=1)).sqrt())
        self._feature_sq = None

    def _open_teacher(self, model_chunks, forward_only):
        from megatron_latent.latent import teacher

        if not self.online_teacher:
            return teacher.TeacherCache(self.teacher)
        from megatron_latent import checkpointing
        from megatron_latent.training.build import build_model, unwrap

        cfg = unwrap(model_chunks[0]).cfg
        chunks = build_model(cfg, None if checkpointing.is_checkpoint(self.teacher)
                             else self.teacher, wrap_ddp=False)
        if checkpointing.is_checkpoint(self.teacher):
            checkpointing.load_model(self.teacher, chunks[0])
        return teacher.OnlineTeacher(chunks, self.align_layers, forward_only)

    # ------------------------------------------------------------ generation
    def decode_program(self, mode: str | None = None, steps: int | None = None,
                       threshold: float = 0.5, sigmas: tuple[float, float] | None = None):
        """Stage 2: whole blocks (the grid size is the scale head's; `steps` is unused);
        `sigmas`: the modulations sampled with them (RL rollouts), noise-free without."""
        if self.stage == 1:
            return None
        if mode not in (None, "blocks"):
            raise ValueError(f"DeepLatent decodes in latent mode 'blocks' only, got {mode!r}")
        from megatron_latent.latent.deeplatent_decode import DeepLatentProgram

        return DeepLatentProgram(self.ids, self.image_token_id, self.spatial_merge_size,
                                 self.max_blocks, sigmas=sigmas)

    # ------------------------------------------------------------ RL (spec 2.9)
    def for_rl(self) -> "DeepLatent":
        if self.stage != 2:
            raise ValueError("DeepLatent RL starts from a stage-2 checkpoint (its latent blocks "
                             "and modulation MLPs); this one is stage 1")
        return dataclasses.replace(self, _rl=True)

    def rl_decode_program(self, mode=None, steps=None, threshold=0.5):
        if self.sigma_q is None or self.sigma_f is None:
            raise ValueError("DeepLatent RL samples the modulations with the stage-2 sigma_q and "
                             "sigma_f, which this checkpoint does not record: start from a "
                             "checkpoint trained at stage 2")
        return self.decode_program(mode, steps, threshold, sigmas=(self.sigma_q, self.sigma_f))

    def rl_defaults(self) -> dict:
        # spec 2.9 [paper-gap -> ours]: symmetric clip 0.2, KL 0.01, 0.9 accuracy + 0.1 format
        return {"eps_low": 0.2, "eps_high": 0.2, "kl_beta": 0.01,
                "rewards": "accuracy:0.9,format:0.1"}

    def rl_format_reward(self):
        """The paper's format check: a final `\\boxed{}` answer, blocks closed in order."""
        from megatron_latent.eval.formats import make_boxed_format_reward

        return make_boxed_format_reward(START, END)

    def rl_policy_loss(self, eps_low, eps_high, kl_beta):
        from megatron.core import parallel_state as ps

        from megatron_latent.latent.deeplatent_rl import ContinuousGRPOLoss

        if ps.model_parallel_is_initialized() and \
                ps.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError(
                "DeepLatent RL runs at pipeline-parallel size 1: the modulation MLPs it trains "
                "live on the first stage and its loss on the last (use TP / DP instead)")
        ids = self.ids
        return ContinuousGRPOLoss(eps_low, eps_high, kl_beta,
                                  reduction=self.cont_logprob_reduction,
                                  old_policy=self.cont_old_policy,
                                  block_ids=(ids[START], ids[SCALE], ids[PAD], ids[END]),
                                  hidden_size=self.hidden_size)

    def block_noise(self, sample_id: str, k: int, device=None) -> torch.Generator:
        """The noise of block k of a sample: a fixed function of the sample (the same on every
        tensor-parallel rank, and after a resume), drawn on `device` (default the CPU; the
        numbers differ between device types)."""
        digest = hashlib.blake2b(f"{sample_id}/{k}".encode(), digest_size=8).digest()
        return torch.Generator(device=device or "cpu").manual_seed(
            int.from_bytes(digest, "little") & (2 ** 63 - 1))


class _WithStage1:
    """Stage-2 samples with their stage-1 twin (the same row: both stages keep or skip rows
    alike), whose collated batch an online teacher runs: `mb["teacher_batch"]`."""

    def __init__(self, stage2, stage1):
        if len(stage1) != len(stage2):
            raise ValueError(f"{len(stage1)} stage-1 and {len(stage2)} stage-2 samples")
        self.ds, self.twin = stage2, stage1

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {**self.ds[i], "stage1": self.twin[i]}

    def collate(self, samples, pad_to=None):
        mb = self.ds.collate(samples, pad_to)
        mb["teacher_batch"] = self.twin.collate([s["stage1"] for s in samples], pad_to)
        return mb

    def __getattr__(self, name):  # everything else is the stage-2 dataset's
        if name in ("ds", "twin"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.ds, name)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _last_to_first(t, shape):
    """The last pipeline stage's tensor on every stage (None from the others)."""
    from megatron.core import parallel_state as ps
    import torch.distributed as dist

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return t
    buf = (t if t is not None else torch.empty(shape)).float().to(_device()).contiguous()
    dist.broadcast(buf, ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    return buf


def _at(hidden, rows, positions):
    """hidden [s, b, h] at (row, position) pairs -> [n, h]."""
    dev = hidden.device
    return hidden[positions.to(dev), rows.to(dev)]


class _BlockLatents:
    """Builds every block's latents of a micro-batch on the first stage."""

    def __init__(self, method: DeepLatent, mb: dict, noise: bool):
        self.m, self.mb, self.noise = method, mb, noise

    def __call__(self, embeddings, image_features, modules, mod_hidden):
        m, mb = self.m, self.mb
        if m.sigma_q is None:  # fixed once (spec 2.5); recorded with the method's hparams
            m.sigma_q = 0.1 * float(modules.grid.queries.detach().float().pow(2).mean().sqrt())
        if m.sigma_f is None:
            raise ValueError("DeepLatent's sigma_f is set by the first context pass: run "
                             "method.prepare_step before the step")
        rows = mb["sample_ids"]
        per_row_k: dict[int, int] = {}
        out = []
        for k, (row, _, h, w) in enumerate(mb["blocks"].tolist()):
            j = per_row_k[row] = per_row_k.get(row, -1) + 1
            idx = mb["question_features"][k]
            feats = (image_features[idx.to(image_features.device)] if len(idx)
                     else embeddings.new_zeros(0, embeddings.shape[-1]))
            gen = m.block_noise(rows[row], j, embeddings.device) if self.noise else None
            mod = mod_hidden[k].to(embeddings.device, embeddings.dtype)
            z, _ = modules.build_latents(mod[1], mod[2], h, w, feats, mb["feature_coords"][k],
                                         tuple(mb["feature_grid"][k]), m.sigma_q, m.sigma_f,
                                         noise=self.noise, generator=gen)
            out.append(z)
        latents = torch.cat(out).to(embeddings.dtype)
        return embeddings.masked_scatter(mb["latent_mask"].to(embeddings.device).unsqueeze(-1),
                                         latents)


class _ContextPass(LatentMethod):
    """Forward-only: [n_blocks, 3, h] final-norm states at (scale, qmod, imod) of every block,
    with the grid slots holding the pad embedding, or the latents of a previous pass."""

    name = "deeplatent-context"

    def __init__(self, method: DeepLatent, prev: list | None):
        self.m, self.prev = method, prev
        self._k = 0

    def sft_step(self, mb):
        prev = None if self.prev is None else self.prev[self._k]
        self._k += 1
        return _ContextStep(self.m, mb, prev)


class _ContextStep(LatentStep):
    def __init__(self, method, mb, prev):
        self.m, self.mb, self.prev = method, mb, prev

    def inject(self, embeddings, image_features, modules=None):
        sq = self.m._feature_sq
        if sq is not None and self.prev is None and image_features is not None:
            f = image_features.detach().double()
            sq += torch.stack([f.pow(2).sum().cpu(), torch.tensor(float(f.numel()))])
        if self.prev is None:
            return embeddings
        # the training pass's latents (its noise is a fixed function of the sample), so that
        # n passes make blocks <= n exact
        return _BlockLatents(self.m, self.mb, noise=True)(embeddings, image_features, modules,
                                                         self.prev)

    def head(self, model, *, hidden_states, **_):
        full = whole_sequence(model, hidden_states)
        blocks = self.mb["blocks"]
        rows = blocks[:, 0].repeat_interleave(3)
        pos = (blocks[:, 1:2] + torch.tensor([[1, 2, 3]], device=blocks.device)).flatten()
        return _at(full, rows, pos).detach().float().view(-1, 3, full.shape[-1])

    def loss(self, output):
        raise NotImplementedError


class DeepLatentStep(LatentStep):
    def __init__(self, method: DeepLatent, mb: dict):
        self.m, self.mb = method, mb

    def inject(self, embeddings, image_features, modules=None):
        if modules is None:
            raise ValueError("DeepLatent's step needs its side modules (build_model(..., "
                             "latent_method=method))")
        return _BlockLatents(self.m, self.mb, noise=True)(embeddings, image_features, modules,
                                                         self.mb["mod_hidden"])

    def layer_hooks(self):
        from megatron_latent.latent.teacher import alignment_hook
        from megatron_latent.models.qwen25vl.layer_hooks import slot_positions

        # a layer-hook loss is added to the gradient as is (training.step divides only the
        # head's sum by the global token count): its own global mean
        weight = self.m.lambda_align / self.mb["step_totals"]["align"].clamp(min=1.0)
        slots = slot_positions(self.mb["latent_mask"])
        seq = self.mb["input_ids"].shape[1]
        def sp_aware(fn):
            def hook(h):
                if h.shape[0] != seq:  # this rank's sequence-parallel slice
                    self.m._split_logs = True
                return fn(h)
            return hook

        teacher = self.m.teacher_states(self.mb)
        return {layer: sp_aware(alignment_hook(slots, teacher[layer], weight, seq,
                                               self.m._align_logs))
                for layer in self.m.align_layers}

    def head(self, model, *, hidden_states, output_layer, output_weight, labels=None,
             runtime_gather_output=None, **_):
        logits = model.logits(hidden_states, output_layer, output_weight, runtime_gather_output)
        ce = model.cross_entropy(labels, logits)
        full = whole_sequence(model, hidden_states)
        blocks = self.mb["blocks"]
        h_s = _at(full, blocks[:, 0], blocks[:, 1] + 1)
        scale = model.latent_modules.scale_head.loss(h_s, blocks[:, 2].to(h_s.device),
                                                     blocks[:, 3].to(h_s.device),
                                                     reduction="sum")
        return {"ce": ce, "scale": scale}

    def loss(self, output):
        mask = self.mb["loss_mask"].float()
        ce_sum, n_ce = (output["ce"].float() * mask).sum(), mask.sum()
        totals = self.mb["step_totals"]
        scale_sum = output["scale"].float()
        total = ce_sum + self.m.lambda_scale * scale_sum * totals["ce"] / totals["blocks"].clamp(
            min=1.0)
        n_blocks = torch.full((), float(self.mb["blocks"].shape[0]), device=mask.device)
        logs = {"lm loss": torch.stack([ce_sum.detach(), n_ce]),
                "scale loss": torch.stack([scale_sum.detach(), n_blocks])}
        return total, n_ce.to(torch.int), logs  # "align loss": stage_logs (layer hooks)
