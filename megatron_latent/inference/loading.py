"""Load a model, its processor and its latent method for generation.

`load_for_generation` takes either checkpoint kind:
- an HF Qwen2.5-VL directory (config.json + safetensors + processor files), or
- a megatron_latent checkpoint (megatron_latent.json, hf/ processor files, iter_NNNNNNN/),
  recognised by `checkpointing.is_checkpoint`; it loads at any TP/PP.
The latent method is the one the checkpoint recorded (`registry.record_for`), unless the caller
names one; it adds its tokens to the processor's tokenizer and gives the decode program.
The caller initialises the process groups first (`megatron_latent.parallel.initialize`) at the
same TP/PP, and every rank of the model-parallel group calls this.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_latent import checkpointing
from megatron_latent.latent import registry
from megatron_latent.latent.decoding import MODES



def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in checkpointing.DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(checkpointing.DTYPES)}")
    return checkpointing.DTYPES[str(dtype)]


def _hf_dtype(hf_dir: Path) -> torch.dtype:
    return checkpointing.hf_dtype(json.loads((hf_dir / "config.json").read_text()))


def _check_parallel(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("load_for_generation: megatron parallel state is not initialised; call "
                           "megatron_latent.parallel.initialize(ParallelConfig(tp, pp)) first")
    got = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    if got != (tp, pp):
        raise RuntimeError(f"load_for_generation(tp={tp}, pp={pp}), but the parallel state was "
                           f"initialised with tp={got[0]}, pp={got[1]}")


def load_for_generation(path, *, tp: int = 1, pp: int = 1, spec: str = "local", dtype=None,
                        latent_method: str | None = None):
    """(model, processor, cfg, method) on this rank: the model in eval mode on cuda (else cpu),
    with sequence parallelism off and the method's side modules; the processor's tokenizer
    has the method's tokens added. `latent_method`: a registered name to use instead of the
    checkpoint's own. `dtype` (torch.dtype or its name) defaults to the checkpoint's own."""
    from transformers import AutoProcessor

    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
    from megatron_latent.models.qwen25vl.model import Qwen25VLModel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    _check_parallel(tp, pp)
    dtype = _as_dtype(dtype)
    layout = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  sequence_parallel=False, spec=spec)
    megatron = checkpointing.is_checkpoint(path)
    if megatron:
        cfg = checkpointing.config_from_checkpoint(
            path, **layout, **({"params_dtype": dtype} if dtype is not None else {}))
        proc_dir = path / "hf"
        if not (proc_dir / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{path}: the checkpoint has no processor files in hf/ "
                                    "(tokenizer, preprocessor_config.json)")
    elif (path / checkpointing.META).is_file():
        raise FileNotFoundError(f"{path}: a megatron_latent checkpoint without a complete "
                                f"iteration ({checkpointing.LATEST} is missing)")
    else:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: neither a megatron_latent checkpoint (no "
                                    f"{checkpointing.META}) nor an HF checkpoint (no config.json)")
        cfg = Qwen25VLConfig.from_hf(path, **layout, params_dtype=dtype or _hf_dtype(path))
        proc_dir = path
    processor = AutoProcessor.from_pretrained(proc_dir)
    record = registry.record_for(path) or {"name": "none", "hparams": {}}
    if latent_method is not None and latent_method != record["name"]:
        record = {"name": latent_method, "hparams": {}}
    method = registry.from_record(record, processor.tokenizer, cfg)

    from megatron_latent.parallel import device
    from megatron.core import parallel_state as ps

    modules = method.build_modules(cfg, pre_process=ps.is_pipeline_first_stage(),
                                   post_process=ps.is_pipeline_last_stage())
    model = Qwen25VLModel(cfg, latent_modules=modules).to(device())
    if megatron:
        checkpointing.load_model(path, model)
    else:
        from megatron_latent.conversion.hf_load import load_hf_weights

        load_hf_weights(model, path, latent_method=method)
    model.eval()
    return model, processor, cfg, method


def is_output_rank() -> bool:
    """The one rank that prints / writes results: last pipeline stage, TP rank 0, DP rank 0
    (True without process groups)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def stop_ids(tokenizer) -> tuple[int, ...]:
    """`<|im_end|>` and `<|endoftext|>`, those the tokenizer has."""
    vocab = tokenizer.get_vocab()
    return tuple(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab)


def latent_runs(latent_positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> [(start, length)] of consecutive runs."""
    runs: list[list[int]] = []
    for j in latent_positions:
        if runs and j == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([j, 1])
    return [(s, n) for s, n in runs]


def render_completion(tokenizer, completion) -> str:
    """The completion's text with special tokens visible and each run of latent positions shown
    as `[latent x N]`."""
    pieces, j = [], 0
    for start, n in latent_runs(completion.latent_positions):
        if start > j:
            pieces.append(tokenizer.decode(completion.tokens[j:start], skip_special_tokens=False))
        pieces.append(f"[latent x {n}]")
        j = start + n
    if j < len(completion.tokens):
        pieces.append(tokenizer.decode(completion.tokens[j:], skip_special_tokens=False))
    return "".join(pieces)


def answer_text(tokenizer, completion) -> str:
    """The completion's text for scoring: latent positions dropped, special tokens skipped."""
    latent = set(completion.latent_positions)
    kept = [t for j, t in enumerate(completion.tokens) if j not in latent]
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------- CLI helpers (tools/)
def add_model_args(p) -> None:
    """--ckpt, --tp, --pp, --spec, --dtype on an argparse parser."""
    p.add_argument("--ckpt", required=True, help="HF Qwen2.5-VL dir or megatron_latent checkpoint")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--spec", choices=["local", "te"], default="local", help="layer spec")
    p.add_argument("--dtype", choices=sorted(checkpointing.DTYPES), default=None,
                   help="parameter dtype (default: the checkpoint's)")


def add_latent_args(p) -> None:
    """Prompt and latent-decoding flags shared by tools/generate.py and tools/eval_vqa.py."""
    p.add_argument("--system", default=None, help="system message (default: the template's)")
    p.add_argument("--answer-prefix", default="",
                   help="text appended after the assistant header, e.g. a span's start token")
    p.add_argument("--latent-method", choices=registry.names(), default=None,
                   help="default: the checkpoint's own (recorded at training or export)")
    p.add_argument("--latent-mode", choices=MODES, default=None,
                   help="default: the method's own decode mode")
    p.add_argument("--latent-steps", type=int, default=None,
                   help="latent steps (mode 'steps') or their cap (other modes); default: the "
                        "method's")
    p.add_argument("--latent-threshold", type=float, default=0.5,
                   help="p(end) threshold of mode 'threshold'")


def open_image(path):
    """An RGB PIL image, converted as training converts it (data/images.py: regular files only,
    16-bit and alpha handled, unknown pixel modes refused); ValueError naming the path."""
    from megatron_latent.data.images import open_image as open_rgb

    return open_rgb(path)
