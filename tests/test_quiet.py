"""platform/quiet.py in a fresh interpreter, as an entry point uses it: the known megatron-core /
torch start-up messages are gone by default and all back with `--verbose` or
MEGATRON_LATENT_VERBOSE=1; a message it does not know (or a known text from another module or
logger) still shows."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# what an entry point runs: the call first, then the imports that warn (megatron-core's own
# default TransformerConfig warns too); the two logger messages are emitted through the loggers
# megatron uses for them (building a GPTModel or saving asynchronously would take a process group)
SCRIPT = r"""
import logging, sys, warnings
sys.path.insert(0, sys.argv.pop(1))
from megatron_latent.platform.quiet import quiet_known_warnings
quiet_known_warnings()
print("argv after:", sys.argv[1:])
import torch.utils.cpp_extension
import megatron.core.optimizer, megatron.core.hyper_comm_grid, megatron.core.models.backends
import megatron.core.models.mimo
from megatron.core.transformer import TransformerConfig
TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
logging.basicConfig()
logging.getLogger("megatron.core.models.gpt.gpt_model").warning(
    "GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning(
    "MCore's async save is deprecated and will be removed in the future releases.")
# not ours to hide: a known text from another module, another message of a quieted logger
warnings.warn("Transformer Engine and Apex are not installed (from our own code)", UserWarning)
logging.getLogger("torch.utils.cpp_extension").warning("some other cpp_extension message")
logging.getLogger("megatron.core.models.gpt.gpt_model").warning("another GPTModel message")
print("done")
"""


def _known() -> list[str]:
    """The known messages this machine emits (they depend on what is installed)."""
    import torch

    msgs = ["full scope is deprecated", "MimoModelConfig is experimental",
            "GPTModel IS DEPRECATED", "MCore's async save is deprecated"]
    no = [m for m in ("transformer_engine", "apex", "absl") if importlib.util.find_spec(m) is None]
    if "transformer_engine" in no and "apex" in no:
        msgs.append("UserWarning: Transformer Engine and Apex are not installed. Falling back")
    if "apex" in no:
        msgs.append("Apex is not installed. Falling back to Torch Norm")
    if "absl" in no:
        msgs.append("absl.logging is not installed")
    if not torch.cuda.is_available():
        msgs.append("No CUDA runtime is found")
    return msgs


def test_known_warnings_hidden_by_default_and_shown_with_verbose():
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_LATENT_VERBOSE"}
    cmd = [sys.executable, "-c", SCRIPT, str(REPO)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    runs = {"default": subprocess.Popen(cmd + ["--x"], **pipes),  # the two at once
            "verbose": subprocess.Popen(cmd + ["--verbose", "--x"], **pipes)}
    out = {}
    for name, proc in runs.items():
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "done" in text, text
        out[name] = text
    known = _known()
    for msg in known:
        assert msg not in out["default"], (msg, out["default"])
        assert msg in out["verbose"], (msg, out["verbose"])
    for text in out.values():  # never hidden
        assert "from our own code" in text and "some other cpp_extension message" in text
        assert "another GPTModel message" in text
    assert "argv after: ['--x']" in out["verbose"]  # the script's own parser never sees it


def test_verbose_switches(monkeypatch):
    from megatron_latent.platform.quiet import VERBOSE_ENV, is_verbose

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert not is_verbose(["train.py", "--lr", "1"])
    assert is_verbose(["train.py", "--verbose"])
    for value, verbose in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(VERBOSE_ENV, value)
        assert is_verbose(["train.py"]) is verbose
