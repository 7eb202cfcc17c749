"""DeepLatent's decode program (spec 2.8): on a sampled `<latent>`, the three placeholders are
appended in one forward; their final-norm states give the grid size (the scale head's argmax) and
the modulations (no noise at inference); the LatentFormer builds the H x W grid, which is appended
with `</latent>` in a second forward at image-like positions (slot (i, j) of a block whose first
slot is at p: (p, p + i, p + j); the text after it continues at p + max(H, W)). Sampling then
resumes. Uses the generator's chunk appends (latent/decoding.py): PP = 1; when the generator
replays CUDA graphs, the latents replay one too (`LatentGraphs`, per grid and image layout).

RL rollouts (`sigmas` given): the two modulations are sampled (a = mu + sigma eps, eps from the
generator's sampling stream, the same on every tensor-parallel rank) and each block's
`LatentBlockRecord` (gamma, beta and the sufficient statistics the continuous GRPO ratio needs)
is kept per row: `event_records()`, which the generator attaches to the completions."""

from __future__ import annotations

import torch

from megatron_latent.latent.base import LatentStep
from megatron_latent.latent.decoding import Chunk, LatentRule
from megatron_latent.latent.deeplatent_modules import grid_coords, latent_coords
from megatron_latent.platform import graph_registry


class DeepLatentProgram(LatentRule):
    uses_chunks = True
    uses_position_offsets = True

    def __init__(self, ids: dict, image_token_id: int, merge: int, max_blocks: int,
                 max_grid: int = 16, sigmas: tuple[float, float] | None = None):
        from megatron_latent.data.deeplatent_tokens import END, IMOD, PAD, QMOD, SCALE, START

        super().__init__(ids[START], ids[PAD], ids[END], "forced", steps=max_grid * max_grid)
        self.placeholders = torch.tensor([ids[SCALE], ids[QMOD], ids[IMOD]])
        self.never_sample = (ids[SCALE], ids[QMOD], ids[IMOD], ids[PAD], ids[END])
        # spare cache slots for the padding chunk appends leave in rows without an event
        self.chunk_slots = max_blocks * (4 + max_grid * max_grid)
        # the generator's CUDA graphs of chunk forwards: the placeholders, a grid padded to
        # the largest + `</latent>`
        self.chunk_shapes = (3, max_grid * max_grid + 1)
        self.image_token_id, self.merge, self.max_blocks = image_token_id, merge, max_blocks
        self.modules, self.features = None, None
        self.sigmas, self.records = sigmas, []
        self._placeholders = {}  # on each device used
        self._graphs = LatentGraphs()

    def bind(self, model) -> None:
        if model.latent_modules is None:
            raise ValueError("DeepLatent generation needs the model's side modules (build it "
                             "with the method: build_model(..., latent_method=method))")
        self.modules = model.latent_modules
        self._graphs.clear()  # captured over the previous modules

    def prefill_step(self, input_ids, image_grid_thw):
        self.records = [[] for _ in range(input_ids.shape[0])]
        return _KeepFeatures(self, input_ids, image_grid_thw)

    def event_records(self) -> list[list]:
        """Per row, the `LatentBlockRecord` of each sampled block, in order (RL rollouts)."""
        return self.records

    def init_state(self, batch, device):
        return {"shift": torch.zeros(batch, dtype=torch.long, device=device),
                "blocks": torch.zeros(batch, dtype=torch.long, device=device)}

    def step(self, state, consumed, sampled, end_prob=None):
        return sampled, torch.zeros_like(sampled, dtype=torch.bool)

    def position_offsets(self, state):
        return state["shift"].expand(3, -1)

    def chunk(self, state, out):
        b, dev = out.ids.shape[0], out.ids.device
        shift = state["shift"]
        if out.index == 0:
            last = out.ids[torch.arange(b, device=dev), (out.lengths - 1).clamp(min=0)]
            rows = (out.lengths > 0) & (last == self.start_id) & (state["blocks"] < self.max_blocks)
            if not bool(rows.any()):
                return None
            state["blocks"].add_(rows.long())
            if dev not in self._placeholders:
                self._placeholders[dev] = self.placeholders.to(dev)
            return Chunk(self._placeholders[dev].expand(b, 3), torch.where(rows, 3, 0),
                         offsets=shift.view(b, 1, 1).expand(b, 3, 3))
        if out.index != 1:
            return None
        return self._grid(state, out, out.lengths == 3)

    def _grid(self, state, out, rows):
        b, dev = out.ids.shape[0], out.ids.device
        h = out.hidden[:, :3]
        hh, ww = self.modules.scale_head.predict(h[:, 0])
        hh, ww = torch.where(rows, hh, 1), torch.where(rows, ww, 1)
        n = hh * ww
        # one host sync: each row's grid and whether it has an event
        host_h, host_w, fired = torch.stack([hh, ww, rows.long()]).tolist()
        k_max = max(x * y for x, y in zip(host_h, host_w)) + 1
        vectors = torch.zeros(b, k_max, h.shape[-1], dtype=h.dtype, device=dev)
        sel = [i for i in range(b) if fired[i]]
        for idx, z in zip(*self._latents(h, host_h, host_w, sel, dev, out.generator,
                                         graphed=out.graphed)):
            vectors[idx, :z.shape[1]] = z.to(h.dtype)
        k = torch.arange(k_max, device=dev).expand(b, -1)
        feed = k < n.unsqueeze(1)
        ids = torch.where(feed, self.latent_id, self.end_id)
        slot = torch.stack([-k, k // ww.unsqueeze(1) - k, k % ww.unsqueeze(1) - k], -1)
        after = (torch.maximum(hh, ww) - n).view(b, 1, 1)  # `</latent>` at p + max(H, W)
        offsets = torch.where(feed.unsqueeze(-1), slot, after) + state["shift"].view(b, 1, 1)
        state["shift"].copy_(torch.where(rows, state["shift"] + after.view(b), state["shift"]))
        return Chunk(ids, torch.where(rows, n + 1, 0), feed, vectors, offsets)

    def _latents(self, h, hh, ww, sel: list[int], dev, generator=None, graphed: bool = False):
        """The LatentFormer's latents of rows `sel`, one call per group of rows with the same
        grid and the same question-image layout -> (row indices, latents [rows, H*W, d]).
        hh, ww: each row's grid (host lists or tensors). `graphed` (the generator replays CUDA
        graphs): a group's call replays a graph of its shape from the second time that shape
        is seen (`LatentGraphs`); RL's sampled latents stay eager."""
        groups: dict = {}
        for i in sel:
            feats, coords, frame = self.features[i]
            g = (int(hh[i]), int(ww[i]), frame, feats.shape[0])
            for key, members in groups.items():
                if key[:4] == g and torch.equal(self.features[members[0]][1], coords):
                    members.append(i)
                    break
            else:
                groups[(*g, len(groups))] = [i]
        idx_out, z_out = [], []
        for (height, width, frame, _, _), members in groups.items():
            rows = torch.tensor(members, device=dev)
            feats = torch.stack([self.features[i][0].to(dev) for i in members], 1)
            args = (h[rows, 1], h[rows, 2], height, width, feats, self.features[members[0]][1],
                    frame or (height, width))
            if self.sigmas is None:
                z_out.append(self._graphs(self.modules, *args) if graphed
                             else self.modules.inference_latents(*args))
            else:
                z, recs = self.modules.sample_latents(*args, *self.sigmas, generator=generator)
                z_out.append(z)
                for i, rec in zip(members, recs):
                    self.records[i].append(rec)
            idx_out.append(rows)
        return idx_out, z_out


class LatentGraphs:
    """`DeepLatentModules.inference_latents` as CUDA graphs, one per (grid H x W, question-image
    layout, rows): the modulation MLPs, the grid's resize and the LatentFormer are hundreds of
    small kernels, launch-bound at inference. A shape is captured the second time it is seen
    (the first call runs eager: real grids vary), the `max_graphs` most recently used are kept.
    Static inputs h_l, h_i [r, d] and feats [n_f, r, d]; the coordinates are part of the shape
    (fixed in the graph). The output is a static buffer: read it before the next call."""

    def __init__(self, max_graphs: int = 8):
        self.max_graphs, self.graphs, self.seen = max_graphs, {}, set()
        graph_registry.register(self)

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()

    def drop_graphs(self) -> None:
        self.graphs.clear()

    def __call__(self, modules, h_l, h_i, height: int, width: int, feats, feat_coords,
                 feat_grid):
        key = (height, width, tuple(feat_grid), feats.shape[0], h_l.shape[0], h_l.dtype,
               feats.dtype, h_l.device,
               None if feat_coords is None else feat_coords.cpu().numpy().tobytes())
        g = self.graphs.get(key)
        if g is None:
            if key not in self.seen or h_l.device.type != "cuda":
                self.seen.add(key)
                return modules.inference_latents(h_l, h_i, height, width, feats, feat_coords,
                                                 feat_grid)
            g = _LatentsGraph(modules, h_l, h_i, height, width, feats, feat_coords, feat_grid)
        else:
            del self.graphs[key]  # most recently used last
        self.graphs[key] = g
        while len(self.graphs) > self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))
        return g(h_l, h_i, feats)


class _LatentsGraph:
    def __init__(self, modules, h_l, h_i, height, width, feats, feat_coords, feat_grid):
        dev = h_l.device
        self.modules, self.height, self.width, self.grid = modules, height, width, feat_grid
        self.h_l, self.h_i, self.feats = h_l.clone(), h_i.clone(), feats.clone()
        # made before the capture (host-to-device copies cannot be captured)
        self.coords = None if feat_coords is None else feat_coords.to(dev)
        self.z_coords = latent_coords(height, width, feat_grid, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, kernels) first
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = self._run()

    def _run(self):
        return self.modules.inference_latents(self.h_l, self.h_i, self.height, self.width,
                                              self.feats, self.coords, self.grid,
                                              z_coords=self.z_coords)

    def __call__(self, h_l, h_i, feats):
        self.h_l.copy_(h_l)
        self.h_i.copy_(h_i)
        self.feats.copy_(feats)
        self.graph.replay()
        return self.out


class _KeepFeatures(LatentStep):
    """The prompt forward's injection point: keeps each row's question-image features, their
    merged-grid coordinates and the first image's grid (the frame a latent grid is laid over)."""

    def __init__(self, program: DeepLatentProgram, input_ids, image_grid_thw):
        self.p, self.ids, self.grid = program, input_ids, image_grid_thw

    def inject(self, embeddings, image_features, modules=None):
        p, m = self.p, self.p.merge
        grids = [] if self.grid is None else [(h // m, w // m) for _, h, w in self.grid.tolist()]
        counts = (self.ids == p.image_token_id).sum(1).tolist()
        rows, at, g = [], 0, 0
        for n in counts:
            mine, used = [], 0
            while used < n:
                mine.append(grids[g])
                used += grids[g][0] * grids[g][1]
                g += 1
            feats = (image_features[at:at + n].detach() if n
                     else embeddings.new_zeros(0, embeddings.shape[-1]))
            coords = (torch.cat([grid_coords(h, w) for h, w in mine]) if mine
                      else torch.zeros(0, 2, dtype=torch.long))
            rows.append((feats, coords, mine[0] if mine else None))
            at += n
        p.features = rows
        return embeddings

    def head(self, model, **kw):
        raise NotImplementedError

    def loss(self, output):
        raise NotImplementedError
