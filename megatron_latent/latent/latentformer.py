"""DeepLatent's LatentFormer (TP-sharded) and the per-stage container of its side modules.

LatentFormer (spec 2.5, [ours] where the paper's equation is missing), K blocks (default 1):
    Z'      = Z + SelfAttn(RMSNorm(Z); RoPE2D(pos_Z))
    Z^{k+1} = Z' + CrossAttn(q = RMSNorm(Z'), kv = RMSNorm_kv(F~); RoPE2D(pos_Z), RoPE2D(pos_F))
    (+ Z + FFN(RMSNorm(Z)), GELU 4d, only with `ffn=True`)
No mask (the grid is produced in parallel). Heads and head width are the LLM's; q, k, v and the
output projection have biases (Qwen style); RMSNorm eps 1e-6.

Tensor parallelism like the LLM's attention: q/k/v are ColumnParallelLinear (heads split over TP
ranks, no gather), the output a RowParallelLinear (input already split; its all-reduce makes the
output whole again). Inputs are identical on every TP rank (no sequence parallelism inside), so
the norms and every replicated module feeding the LatentFormer get identical gradients on every
TP rank (the column layers all-reduce their input gradient).

`DeepLatentModules` is what the method's `build_modules` returns for one pipeline stage (held at
`model.latent_modules`): the first stage holds `grid`, `latentformer`, `mlp_l`, `mlp_i` (the
latents are injected there), the last stage `scale_head` (it reads the final-norm h_s); PP = 1
holds both. Its `sharded_state_dict` marks the replicated parts as TP replicas and lets the
parallel linears shard themselves, so the dist checkpoint reshards across TP sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                             make_sharded_tensors_for_checkpoint)
from megatron.core.utils import init_method_normal
from torch import nn

from megatron_latent.latent.deeplatent_modules import (LatentGrid, Modulation, ModulationMLP,
                                                       ScaleHead, grid_coords, latent_coords,
                                                       modulate)
from megatron_latent.models.qwen25vl.vision import VisionRotaryEmbedding


def parallel_linear_config(tensor_parallel_size: int, params_dtype: torch.dtype
                           ) -> ModelParallelConfig:
    """The parallel linears' config: the model's TP size and dtype, never sequence parallel
    (the grid is not split over TP ranks), no fused weight-gradient accumulation at build time
    (training/wgrad_fusion.py switches it per module where a kernel exists)."""
    return ModelParallelConfig(tensor_model_parallel_size=tensor_parallel_size,
                               params_dtype=params_dtype,
                               use_cpu_initialization=not torch.cuda.is_available(),
                               sequence_parallel=False, gradient_accumulation_fusion=False)


def apply_rope2d(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [s, b, heads, head_dim] rotated by angles [s, 1, 1, head_dim] (VisionRotaryEmbedding's
    layout: row frequencies then column frequencies, repeated), rotate_half form as Qwen2-VL's
    ViT, computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)


class LatentAttention(nn.Module):
    """Multi-head attention with 2-D RoPE on q and k, heads split over TP ranks; self-attention
    when kv is the (normed) query input, cross-attention otherwise. Tensors [s, 1, d]."""

    def __init__(self, config: ModelParallelConfig, dim: int, num_heads: int):
        super().__init__()
        init = init_method_normal(0.02)
        column = dict(config=config, init_method=init, bias=True, gather_output=False)
        self.q_proj = ColumnParallelLinear(dim, dim, **column)
        self.k_proj = ColumnParallelLinear(dim, dim, **column)
        self.v_proj = ColumnParallelLinear(dim, dim, **column)
        self.o_proj = RowParallelLinear(dim, dim, config=config, init_method=init, bias=True,
                                        input_is_parallel=True, skip_bias_add=False)
        self.head_dim = dim // num_heads
        self.local_heads = self.q_proj.output_size_per_partition // self.head_dim

    def forward(self, x: torch.Tensor, kv: torch.Tensor, angles_q: torch.Tensor,
                angles_kv: torch.Tensor) -> torch.Tensor:
        def heads(t):  # [s, 1, local d] -> [s, 1, local heads, head_dim]
            return t.view(t.shape[0], t.shape[1], self.local_heads, self.head_dim)

        q = apply_rope2d(heads(self.q_proj(x)[0]), angles_q)
        k = apply_rope2d(heads(self.k_proj(kv)[0]), angles_kv)
        v = heads(self.v_proj(kv)[0])
        # [s, b, n, hd] -> [b, n, s, hd]; no mask: every latent sees every latent / image cell
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)))
        out = out.permute(2, 0, 1, 3).flatten(2)  # [s, b, local d]
        return self.o_proj(out)[0]


class LatentFFN(nn.Module):
    """Optional (off by default: the paper's display has two lines): GELU MLP, 4d, TP-split."""

    def __init__(self, config: ModelParallelConfig, dim: int):
        super().__init__()
        init = init_method_normal(0.02)
        self.fc1 = ColumnParallelLinear(dim, 4 * dim, config=config, init_method=init,
                                        bias=True, gather_output=False)
        self.fc2 = RowParallelLinear(4 * dim, dim, config=config, init_method=init, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)[0]))[0]


class LatentFormerBlock(nn.Module):
    def __init__(self, config: ModelParallelConfig, dim: int, num_heads: int, ffn: bool):
        super().__init__()
        norm = dict(eps=1e-6, dtype=config.params_dtype)
        self.norm_sa = nn.RMSNorm(dim, **norm)
        self.self_attn = LatentAttention(config, dim, num_heads)
        self.norm_ca_q = nn.RMSNorm(dim, **norm)
        self.norm_ca_kv = nn.RMSNorm(dim, **norm)
        self.cross_attn = LatentAttention(config, dim, num_heads)
        self.norm_ffn = nn.RMSNorm(dim, **norm) if ffn else None
        self.ffn = LatentFFN(config, dim) if ffn else None

    def forward(self, z, feats, angles_z, angles_f):
        x = self.norm_sa(z)
        z = z + self.self_attn(x, x, angles_z, angles_z)
        if feats.shape[0]:  # no question image: nothing to attend to (softmax over 0 keys)
            z = z + self.cross_attn(self.norm_ca_q(z), self.norm_ca_kv(feats), angles_z, angles_f)
        if self.ffn is not None:
            z = z + self.ffn(self.norm_ffn(z))
        return z


class LatentFormer(nn.Module):
    """(Z~ [n_z, d], F~ [n_f, d], pos_Z [n_z, 2], pos_F [n_f, 2]) -> latents [n_z, d].
    `num_layers=0` is the paper's ablation (the modulated queries fed directly)."""

    def __init__(self, config: ModelParallelConfig, dim: int, num_heads: int,
                 num_layers: int = 1, ffn: bool = False, rope_theta: float = 10000.0):
        super().__init__()
        tp = config.tensor_model_parallel_size
        if dim % num_heads or num_heads % tp or (dim // num_heads) % 4:
            raise ValueError(f"LatentFormer: {num_heads} heads must divide width {dim} and be "
                             f"divisible by TP {tp}, and the head width by 4 (2-D RoPE)")
        # the vision tower's 2-D rotary (real-valued positions allowed: it multiplies floats)
        self.rotary = VisionRotaryEmbedding(dim // num_heads, rope_theta)
        self.blocks = nn.ModuleList(LatentFormerBlock(config, dim, num_heads, ffn)
                                    for _ in range(num_layers))

    def forward(self, z: torch.Tensor, feats: torch.Tensor, z_coords: torch.Tensor,
                feat_coords: torch.Tensor) -> torch.Tensor:
        """z [n_z, d] and feats [n_f, d], or a batch of grids [n_z, b, d] and [n_f, b, d]
        sharing their coordinates."""
        angles_z, angles_f = self.rotary(z_coords), self.rotary(feat_coords)
        single = z.dim() == 2
        if single:  # megatron's [s, b, h] with b = 1
            z, feats = z.unsqueeze(1), feats.unsqueeze(1)
        for block in self.blocks:
            z = block(z, feats, angles_z, angles_f)
        return z.squeeze(1) if single else z


@dataclass
class LatentBlockRecord:
    """What one block's latents were built from, for RL: the grid and both modulations
    (gamma, beta, sigma and the Gaussian sufficient statistics; the actions if kept)."""

    grid: tuple[int, int]
    q: Modulation  # the latent queries' modulation (MLP_l on h_l)
    f: Modulation  # the question-image features' modulation (MLP_i on h_i)


SCALE_HEAD_SEED = 20260315


class DeepLatentModules(nn.Module):
    """DeepLatent's side modules on one pipeline stage (see the module docstring). Parameter
    names (after `latent_modules.`): grid.queries, latentformer.blocks.{k}.{norm_sa,
    self_attn.{q,k,v,o}_proj, norm_ca_q, norm_ca_kv, cross_attn.*}, mlp_l.{norm,fc1,fc2},
    mlp_i.*, scale_head.{h,w}. Needs megatron's parallel state (the parallel linears)."""

    def __init__(self, config: ModelParallelConfig, dim: int, num_heads: int, *,
                 first_stage: bool = True, last_stage: bool = True, grid_size: int = 16,
                 mlp_hidden: int = 1024, latentformer_layers: int = 1,
                 latentformer_ffn: bool = False, rope_theta: float = 10000.0):
        super().__init__()
        dtype = config.params_dtype
        self.grid = self.latentformer = self.mlp_l = self.mlp_i = self.scale_head = None
        if first_stage:
            self.grid = LatentGrid(dim, grid_size, dtype)
            self.latentformer = LatentFormer(config, dim, num_heads, latentformer_layers,
                                             latentformer_ffn, rope_theta)
            self.mlp_l = ModulationMLP(dim, mlp_hidden, dtype)
            self.mlp_i = ModulationMLP(dim, mlp_hidden, dtype)
        if last_stage:
            # its own fixed init: the last stage's RNG stream differs between pipeline layouts
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SCALE_HEAD_SEED)
                self.scale_head = ScaleHead(dim, grid_size, dtype)

    @classmethod
    def from_model_config(cls, model_cfg, *, pre_process: bool, post_process: bool, **kwargs):
        """For a Qwen25VLConfig: the LLM's width, heads, TP size and parameter dtype."""
        config = parallel_linear_config(model_cfg.tensor_model_parallel_size,
                                        model_cfg.params_dtype)
        return cls(config, model_cfg.hidden_size, model_cfg.num_attention_heads,
                   first_stage=pre_process, last_stage=post_process, **kwargs)

    def build_latents(self, h_l: torch.Tensor, h_i: torch.Tensor, height: int, width: int,
                      feats: torch.Tensor, feat_coords: torch.Tensor | None,
                      feat_grid: tuple[int, int], sigma_q: float, sigma_f: float, noise: bool,
                      generator: torch.Generator | None = None, keep_actions: bool = False
                      ) -> tuple[torch.Tensor, LatentBlockRecord]:
        """One block's latents [H*W, d] (row-major) and its `LatentBlockRecord`.

        h_l, h_i [d]: the LLM's final-norm states at the qmod/imod placeholders. feats [n_f, d]:
        the question images' merged ViT features (detached here: the ViT is frozen);
        feat_coords [n_f, 2]: their merged-grid (row, col), None for one image of `feat_grid`;
        feat_grid (h_I, w_I): the first question image's merged grid, the frame the latent
        grid is laid over. `noise` (training, RL rollouts): eps_q then eps_f from `generator`;
        off at inference."""
        if self.grid is None:
            raise RuntimeError("build_latents runs on the first pipeline stage: this stage's "
                               "DeepLatentModules holds only the scale head")
        dtype = self.grid.queries.dtype
        gamma_q, beta_q = self.mlp_l(h_l.reshape(-1))
        gamma_f, beta_f = self.mlp_i(h_i.reshape(-1))
        kw = dict(noise=noise, generator=generator, keep_action=keep_actions)
        z, rec_q = modulate(self.grid.resized(height, width), gamma_q, beta_q, sigma_q, **kw)
        f, rec_f = modulate(feats.detach().to(dtype), gamma_f, beta_f, sigma_f, **kw)
        device = z.device
        if feat_coords is None:
            feat_coords = grid_coords(*feat_grid, device=device)
        z_coords = latent_coords(height, width, feat_grid, device=device)
        latents = self.latentformer(z, f, z_coords, feat_coords.to(device))
        return latents, LatentBlockRecord((height, width), rec_q, rec_f)

    def inference_latents(self, h_l: torch.Tensor, h_i: torch.Tensor, height: int, width: int,
                          feats: torch.Tensor, feat_coords: torch.Tensor | None,
                          feat_grid: tuple[int, int], z_coords: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """`build_latents` without noise for r rows sharing a grid size and a question-image
        layout, in one LatentFormer call: h_l, h_i [r, d]; feats [n_f, r, d] -> [r, H*W, d].
        `z_coords`: `latent_coords(height, width, feat_grid)` on the device, made beforehand
        (a CUDA graph capture cannot copy from the host)."""
        dtype = self.grid.queries.dtype
        gamma_q, beta_q = self.mlp_l(h_l)
        gamma_f, beta_f = self.mlp_i(h_i)
        z = (1 + gamma_q) * self.grid.resized(height, width).unsqueeze(1) + beta_q
        f = (1 + gamma_f) * feats.detach().to(dtype) + beta_f
        device = z.device
        if feat_coords is None:
            feat_coords = grid_coords(*feat_grid, device=device)
        if z_coords is None:
            z_coords = latent_coords(height, width, feat_grid, device=device)
        return self.latentformer(z, f, z_coords, feat_coords.to(device)).transpose(0, 1)

    def sample_latents(self, h_l: torch.Tensor, h_i: torch.Tensor, height: int, width: int,
                       feats: torch.Tensor, feat_coords: torch.Tensor | None,
                       feat_grid: tuple[int, int], sigma_q: float, sigma_f: float,
                       generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, list[LatentBlockRecord]]:
        """`inference_latents` with the Gaussian modulation actions sampled (RL rollouts):
        -> (latents [r, H*W, d], one `LatentBlockRecord` per row with its (gamma, beta), sigma
        and sufficient statistics). eps_q [H*W, r, d] then eps_f [n_f, r, d] from `generator`."""
        dtype = self.grid.queries.dtype
        gamma_q, beta_q = self.mlp_l(h_l)
        gamma_f, beta_f = self.mlp_i(h_i)
        r = h_l.shape[0]
        q = self.grid.resized(height, width).unsqueeze(1).expand(-1, r, -1)
        kw = dict(noise=True, generator=generator)
        z, rec_q = modulate(q, gamma_q, beta_q, sigma_q, **kw)
        f, rec_f = modulate(feats.detach().to(dtype), gamma_f, beta_f, sigma_f, **kw)
        device = z.device
        if feat_coords is None:
            feat_coords = grid_coords(*feat_grid, device=device)
        z_coords = latent_coords(height, width, feat_grid, device=device)
        latents = self.latentformer(z, f, z_coords, feat_coords.to(device)).transpose(0, 1)
        records = [LatentBlockRecord((height, width), rec_q.row(i), rec_f.row(i))
                   for i in range(r)]
        return latents, records

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Replicated tensors with a TP replica id (one TP rank writes them); the parallel
        linears through their own sharded_state_dict (q/k/v split on axis 0, o on axis 1)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return _sharded_tree(self, prefix, sharded_offsets, metadata)


def _sharded_tree(module: nn.Module, prefix: str, offsets, metadata: dict) -> dict:
    # megatron's default for a plain nn.Module child treats all its tensors as replicated,
    # which would be wrong below the LatentFormer: recurse down to the parallel linears.
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        return module.sharded_state_dict(prefix, offsets, metadata)
    own: dict = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    out = make_sharded_tensors_for_checkpoint(
        own, prefix, sharded_offsets=offsets,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_cp_group=metadata["dp_cp_group"])
    for name, child in module.named_children():
        out.update(_sharded_tree(child, f"{prefix}{name}.", offsets, metadata))
    return out
