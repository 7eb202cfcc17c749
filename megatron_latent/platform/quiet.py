"""Hide the known noise of megatron-core and torch at our entry points: about 30 lines of "not
installed, falling back", deprecation and CUDA notices before the first step (and a few more at
checkpoint loads), none of which asks the user to do anything.

Only the messages listed here are hidden, each matched by message regex and by the module (for
`warnings`) or logger (for `logging`) that emits it; anything else still shows. Call
`quiet_known_warnings()` at the top of an entry point, before torch or megatron are imported
(several of these are emitted at import time). `--verbose` on the command line (taken out of
`sys.argv`, so the script's own parser never sees it) or `MEGATRON_LATENT_VERBOSE=1` keeps
everything.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "MEGATRON_LATENT_VERBOSE"
VERBOSE_FLAG = "--verbose"

# (message regex, emitting module regex, category): Python warnings
KNOWN_WARNINGS = (
    # megatron-core without TE/Apex (CPU runs, torch-native spec): optimizer, grad clipping,
    # FSDP mixed precision, norms; the fallbacks are the intended path there
    (r"Transformer Engine and Apex are not installed", r"megatron\.core\.", UserWarning),
    (r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core\.", UserWarning),
    (r"absl\.logging is not installed", r"megatron\.core\.hyper_comm_grid", UserWarning),
    # megatron-core 0.19's own TransformerConfig default (cuda_graph_modules="full") warns
    (r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config",
     UserWarning),
    (r"MimoModelConfig is experimental", r"megatron\.core\.models\.mimo\.", UserWarning),
    # a throughput hint for GPU async all-reduce; launchers set it where it matters
    (r"When using (async grad allreduce|sequence parallelism) it is recommended to set the "
     r"environment variable CUDA_DEVICE_MAX_CONNECTIONS", r"megatron\.core\.tensor_parallel\.",
     UserWarning),
    # megatron-core's dist-checkpoint calls into torch.distributed.checkpoint (single-process
    # loads/saves in the converters, positional arguments, ShardedTensor); attributed to torch's
    # wrappers, or to the CPU shim that forwards the call
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
     r"(load|save) in a single process", r"torch\.distributed\.checkpoint\.", UserWarning),
    (r"The argument order of (load|save) has been changed", r"torch\.distributed\.checkpoint\.",
     UserWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor",
     r"(megatron\.core\.|megatron_latent\.platform\.cpu_shim|torch\.distributed\.)",
     FutureWarning),
)

# logger name -> message regexes (logging records; the logger's other messages still show)
KNOWN_LOG_MESSAGES = {
    # logged when torch.utils.cpp_extension is imported on a machine without CUDA
    "torch.utils.cpp_extension": (r"No CUDA runtime is found",),
    # megatron-core 0.19 deprecates GPTModel for HybridModel; our LLM is built on it on purpose
    "megatron.core.models.gpt.gpt_model": (r"GPTModel IS DEPRECATED",),
    # dist-checkpoint async saves use megatron-core's own writer (NVRx is not a dependency)
    "megatron.core.dist_checkpointing.strategies.torch": (r"MCore's async save is deprecated",),
}


class _DropMessages(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def is_verbose(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return VERBOSE_FLAG in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_known_warnings(verbose: bool | None = None) -> bool:
    """Install the filters above unless verbose; returns whether they were installed.
    `verbose` None: `--verbose` in `sys.argv` (removed from it, and passed on to child
    processes through the environment) or MEGATRON_LATENT_VERBOSE=1."""
    if verbose is None:
        verbose = is_verbose()
        if VERBOSE_FLAG in sys.argv:
            sys.argv[:] = [a for a in sys.argv if a != VERBOSE_FLAG]
            os.environ[VERBOSE_ENV] = "1"
    if verbose:
        return False
    for message, module, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in KNOWN_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
    return True
