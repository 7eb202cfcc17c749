"""Load an HF Qwen2.5-VL safetensors checkpoint into a (TP/PP-sharded) Qwen25VLModel in place.

Each rank reads only the HF tensors its own parameters need, one at a time (safetensors are
memory-mapped), transforms them to the full Megatron layout and keeps its TP slice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors import safe_open
from tqdm import tqdm

from megatron_latent.conversion import side_modules
from megatron_latent.conversion.hf_mapping import NameTable, canonical_hf_name, tp_shard


class HFCheckpointReader:
    """Canonical HF name -> tensor, over one or many safetensors files."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors")
                           if p.name != side_modules.SIDE_FILE)
        if not files:
            raise FileNotFoundError(f"{self.dir}: no *.safetensors files")
        self.where: dict[str, tuple[str, str]] = {}
        for f in files:
            with _open(self.dir / f) as h:
                for key in h.keys():
                    self.where[canonical_hf_name(key)] = (f, key)

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of a fresh memory map that is closed right after, so mapped
        pages never pile up in this process's resident memory."""
        if name not in self.where:
            raise KeyError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        f, key = self.where[name]
        with _open(self.dir / f) as h:
            return h.get_tensor(key).clone()


def _open(path: Path):
    """safe_open, naming the file when it is missing, truncated or not safetensors (the
    library's own errors name none)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (named by the checkpoint's index)")
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise ValueError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e}); it "
                         "is damaged or truncated") from None


class StateDictReader:
    """The reader interface over an in-memory HF state dict (e.g. a model built in a benchmark)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], label: str = "<state dict>"):
        self.dir = label
        self.tensors = {canonical_hf_name(k): v for k, v in state_dict.items()}

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"{self.dir}: tensor {name!r} is missing")
        return self.tensors[name]


_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")


def global_parameter_names(model) -> dict[str, str]:
    """Local state-dict name -> name with the global LLM layer index (PP stages number from 0)."""
    layers = model.language_model.decoder.layers
    out = {}
    for name in model.state_dict(keep_vars=True):
        m = _LAYER.match(name)
        if m:
            g = layers[int(m.group(1))].layer_number - 1
            name_g = f"language_model.decoder.layers.{g}." + name[m.end():]
        else:
            name_g = name
        out[name] = name_g
    return out


def load_hf_weights(model, hf_dir, progress: bool = False, latent_method=None) -> None:
    """`hf_dir`: an HF checkpoint directory, or a reader (HFCheckpointReader, StateDictReader).
    The latent method's side modules load from the directory's side file or the method's own
    tensors in it (conversion/side_modules.py); without either they keep their fresh values."""
    cfg = model.cfg
    table = NameTable(cfg)
    reader = hf_dir if hasattr(hf_dir, "get") else HFCheckpointReader(hf_dir)
    hf_dir = reader.dir
    load_map, dropped = side_modules.embedded(reader.names(), latent_method)
    unknown = (reader.names() - table.all_hf_names(cfg.num_layers, cfg.vision_depth)
               - set(load_map) - dropped)
    if unknown:
        raise ValueError(f"{hf_dir}: {len(unknown)} tensors have no place in Qwen2.5-VL, e.g. "
                         f"{sorted(unknown)[:5]}")
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    params = model.state_dict(keep_vars=True)
    names = global_parameter_names(model).items()
    for name, global_name in tqdm(names, desc="hf -> megatron", unit="tensor", disable=not progress):
        if name.endswith("_extra_state") or name.startswith(side_modules.PREFIX):
            continue
        hf_names, transform = table.lookup(global_name)
        full = transform.to_megatron(*(reader.get(h) for h in hf_names))
        param = params[name]
        piece = tp_shard(full, param, name, tp_rank, tp_size)
        if piece.shape != param.shape:
            raise ValueError(f"{hf_dir}: {hf_names} give shape {tuple(piece.shape)} for "
                             f"{global_name}, the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(piece)
    side_modules.load(model, hf_dir, reader, latent_method)
