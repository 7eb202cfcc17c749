"""Step logging to stdout (rank 0, with step time and ETA) and to wandb (offline by default)."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.distributed as dist


class RunLogger:
    def __init__(self, total_steps: int, *, project: str = "megatron_latent",
                 run_name: str | None = None, config: dict | None = None,
                 wandb_mode: str | None = None, log_dir: str | None = None, start_step: int = 0):
        self.total, self.start_step = total_steps, start_step
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.t0 = self.t_last = time.time()
        self.wandb = None
        mode = wandb_mode or os.environ.get("WANDB_MODE", "offline")
        if self.rank0 and mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=project, name=run_name, config=config or {},
                                    mode=mode, dir=log_dir, reinit="finish_previous")

    def log(self, step: int, metrics: dict) -> None:
        """`metrics["step_s"]`, when given, is the step's own time (the SFT loop measures it:
        it logs a step one loop pass late); otherwise the time since the last call."""
        now = time.time()
        metrics = dict(metrics)
        step_time, self.t_last = metrics.pop("step_s", now - self.t_last), now
        done = step - self.start_step
        eta = (now - self.t0) / max(done, 1) * (self.total - step)
        if self.rank0:
            parts = [f"step {step}/{self.total}"]
            # losses in full (a resumed run is compared with an uninterrupted one to 1e-6)
            parts += [f"{k} {v:.9g}" if isinstance(v, float) and "loss" in k else
                      f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in metrics.items() if v is not None]
            parts += [f"{step_time:.2f} s/step", f"ETA {timedelta(seconds=int(eta))}"]
            print(" | ".join(parts), flush=True)
            if self.wandb is not None:
                self.wandb.log({**{k: v for k, v in metrics.items() if v is not None},
                                "step_time_s": step_time}, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
