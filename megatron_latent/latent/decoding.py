"""A latent method's decode program: what generation does at latent events.

After each forward the generator has, per row, the input it just consumed, the sampled token and
the last final-norm hidden state. A program (a method's `decode_program`) decides, on device and
for the whole batch and without host syncs (a decode iteration replays as one CUDA graph):
- `step`: what is appended to the sequence (the sampled token, or a forced one) and whether the
  next input is that token's embedding or a vector (a latent step);
- `feed_vectors`: the vector fed at a latent step and the log-probability of it as a sampled
  action (0 for a deterministic one). `LatentRule` feeds the hidden state back unchanged; a
  method with a stochastic latent policy (a Gaussian around the hidden state) overrides it,
  drawing from the loop's generator, and RL's importance ratio then needs the recorded log-prob.
- `position_offsets` (programs with `uses_position_offsets`): a per-row [3, b] offset added to
  the mRoPE position of the token appended at this step (e.g. image-like positions for a grid
  of latents fed one by one from a queue in the program's state), recorded per token so the
  training forward uses the same positions.
Latent positions are appended as `latent_id`, so a finished sequence is in the training format
(start, latent x n, end) and RL can replay it in one parallel forward with the recorded vectors
injected at those positions.

Chunk appends (programs with `uses_chunks`; eager and PP = 1): after the prefill and after every
decode iteration the generator calls `chunk(state, out)` with that forward's outputs (a
`ChunkOutput`). A program that wants a block appended at once (e.g. forced placeholders whose
hidden states decide what comes next, then a grid of vectors) returns a `Chunk`: per row k_i
inputs (ids, and vectors where `feed`) at given mRoPE offsets, all appended at the rows' next
positions by ONE forward of max k_i tokens (shorter rows' slots are masked in the KV cache: no
later query sees them, and they are dropped from the records). The generator then calls
`chunk` again with that forward's outputs (`out.index` counts the chunks of this event), until
it returns None; one-token decoding then resumes for all rows, sampling from each row's last
logits. Chunk tokens are recorded as forced (not sampled; vectors at `latent_id` positions), so
the finished sequence stays in the training format. Offsets are relative to the row's plain
(compact) text positions, like `position_offsets`; a program whose block shifts the positions
of the text after it (an image-like grid: the text continues at the block's max position)
returns that shift from `position_offsets` (so `uses_position_offsets`) for later tokens.

Modes (seed-methods.md 2.6 and 3.6). Entry is always on the forward whose input was `start_id`,
and its hidden state is the first latent input:
- "steps":       exactly `steps` latent inputs, then the token sampled after the last one (LVR).
- "sampled_end": latent inputs until the LM head samples `end_id` (appended as sampled), or the
                 cap `steps` (then `end_id` is forced).
- "threshold":   latent inputs until p(end_id) >= `threshold` under the untempered head, or the
                 cap; `end_id` is appended. (The seed's variant compares the hidden state with a
                 learned latent-end vector; we have no such vector, so the head's own end
                 probability is the criterion.)
- "forced":      HyLaR: like "sampled_end", but the exit token is always forced to `end_id`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MODES = ("steps", "sampled_end", "threshold", "forced")


@dataclass
class Chunk:
    """A decode program's request: per row, `lengths[i]` inputs appended in one forward (0: the
    row appends nothing). ids [b, k] (recorded; embedded where not `feed`); feed [b, k] bool:
    the input is `vectors` [b, k, h] instead (record `ids` as the latent id there);
    offsets [b, k, 3]: mRoPE offsets of each input over its plain text position (None: 0);
    vector_logprobs [b, k]: log-prob of each fed vector as a sampled action (None: 0)."""
    ids: torch.Tensor
    lengths: torch.Tensor
    feed: torch.Tensor | None = None
    vectors: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    vector_logprobs: torch.Tensor | None = None


@dataclass
class ChunkOutput:
    """What a forward did, as a program's `chunk` sees it. index: 0 after a prefill or a
    one-token decode step, n after the n-th chunk of the current event. ids [b, k]: the inputs
    consumed (the latent id where a vector was fed); lengths [b]: real inputs per row (0: the
    row appended nothing, or it has finished); hidden [b, k, h]: final-norm hidden states;
    logits [b, vocab] (fp32): each row's last logits, what it samples from next;
    logits_of(hidden [..., h]) -> [..., vocab]: the LM head, for logits anywhere else;
    generator: the loop's sampling stream (seeded alike on every tensor-parallel rank), for a
    program that samples actions of its own; graphed: the generator replays CUDA graphs of its
    decode steps and chunk forwards here (a program may replay its own: fixed weights)."""
    index: int
    ids: torch.Tensor
    lengths: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor
    logits_of: Callable[[torch.Tensor], torch.Tensor]
    generator: torch.Generator | None = None
    graphed: bool = False


@dataclass
class LatentRule:
    start_id: int
    latent_id: int
    end_id: int
    mode: str = "steps"
    steps: int = 8  # the quota for "steps", the cap for the other modes
    threshold: float = 0.5

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown latent mode {self.mode!r}; expected one of {MODES}")
        if self.steps < 0 or (self.mode != "steps" and self.steps < 1):
            raise ValueError(f"latent steps/cap must be >= 1 for mode {self.mode!r}, "
                             f"got {self.steps}")
        if self.mode == "threshold" and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"latent-end threshold must be in (0, 1], got {self.threshold}")

    uses_position_offsets = False
    uses_chunks = False  # `chunk` is called after every forward (eager, PP = 1)
    # (not dataclass fields) spare cache slots the generator reserves, by default, for the
    # empty slots chunk appends leave in shorter rows; ids the head never draws (e.g. the
    # placeholders a program forces)
    chunk_slots = 0
    never_sample = ()

    @property
    def needs_end_prob(self) -> bool:
        return self.mode == "threshold"

    def init_state(self, batch: int, device) -> dict:
        return {"active": torch.zeros(batch, dtype=torch.bool, device=device),
                "fed": torch.zeros(batch, dtype=torch.long, device=device)}

    def step(self, state: dict, consumed: torch.Tensor, sampled: torch.Tensor,
             end_prob: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """consumed/sampled [b] ids -> (appended ids [b], feed_latent [b] bool); updates state."""
        enter = ~state["active"] & (consumed == self.start_id)
        active = state["active"] | enter
        fed = torch.where(enter, torch.zeros_like(state["fed"]), state["fed"])
        capped = fed >= self.steps
        if self.mode == "steps":
            leave = active & capped
        else:
            if self.mode == "threshold":
                signal = end_prob >= self.threshold
            else:
                signal = sampled == self.end_id
            leave = active & ~enter & (signal | capped)
        feed = active & ~leave
        exit_id = sampled if self.mode == "steps" else torch.full_like(sampled, self.end_id)
        appended = torch.where(feed, torch.full_like(sampled, self.latent_id),
                               torch.where(leave, exit_id, sampled))
        # in place: a CUDA graph of the decode iteration replays on these very tensors
        state["active"].copy_(feed)
        state["fed"].copy_(torch.where(feed, fed + 1, fed))
        return appended, feed

    def feed_vectors(self, state: dict, hidden: torch.Tensor, feed: torch.Tensor,
                     generator: torch.Generator | None = None):
        """(vectors [b, h] fed where `feed`, log-prob [b] of each as a sampled action): the
        hidden state itself, a deterministic action."""
        return hidden, torch.zeros(hidden.shape[0], device=hidden.device)

    def position_offsets(self, state: dict) -> torch.Tensor | None:
        """[3, b] mRoPE offsets of the tokens appended at this step (`uses_position_offsets`)."""
        return None

    def chunk(self, state: dict, out: ChunkOutput) -> Chunk | None:
        """(`uses_chunks`) the block to append after the forward `out` describes, or None."""
        return None

    def bind(self, model) -> None:
        """Called by the generator with the model it drives (a program may use the model's
        side modules, `model.latent_modules`)."""

    def prefill_step(self, input_ids: torch.Tensor, image_grid_thw):
        """A latent step for the prompt's forward (its `inject` sees the prompt's image
        features, e.g. to keep them for the program's events), or None."""
        return None

    def event_records(self) -> list[list] | None:
        """After a generate call: per row, the program's records of its latent events (e.g. a
        stochastic block's sampled actions, for RL), attached to the completions; None: none."""
        return None
