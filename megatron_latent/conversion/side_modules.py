"""A latent method's side modules (`model.latent_modules.*`) in HF checkpoint directories.

HF's Qwen2.5-VL has no place for them, so an export writes them to their own file,
`latent_modules.safetensors` (names without the `latent_modules.` prefix: for HyLaR these are its
own names minus `canvas_extractor.`), next to `latent_method.json` (the method and its
hyper-parameters). An import reads that file, or a method's modules embedded in the main weights
of its own checkpoints (`method.hf_side_name`: HyLaR's mid-SFT `canvas_extractor.*`). Side modules
are replicated over TP ranks, so every rank loads them whole."""

from __future__ import annotations

from pathlib import Path

import torch

SIDE_FILE = "latent_modules.safetensors"
PREFIX = "latent_modules."


def side_parameters(model) -> dict[str, torch.Tensor]:
    """Our side-module tensors by their side names (prefix dropped)."""
    return {n[len(PREFIX):]: t for n, t in model.state_dict().items()
            if n.startswith(PREFIX) and not n.endswith("_extra_state")}


def embedded(names, method) -> tuple[dict[str, str], set[str]]:
    """Of an HF checkpoint's tensor names, those that are the method's: ({HF name: side name}
    to load, {HF names to drop}) (e.g. a frozen encoder we reload from its own checkpoint)."""
    load, drop = {}, set()
    if method is None:
        return load, drop
    for name in names:
        side = method.hf_side_name(name)
        if side == "":
            drop.add(name)
        elif side is not None:
            load[name] = side
    return load, drop


def load(model, hf_dir, reader, method) -> int:
    """Copy side-module weights into `model` from `hf_dir`'s side file or the method's embedded
    tensors in `reader`; a model whose side modules find no weights keeps its fresh ones (a
    plain Qwen2.5-VL as the start of a method's SFT). Returns the number of tensors loaded."""
    ours = {n[len(PREFIX):]: p for n, p in model.state_dict(keep_vars=True).items()
            if n.startswith(PREFIX) and not n.endswith("_extra_state")}
    if not ours:
        return 0
    found: dict[str, torch.Tensor] = {}
    side_file = Path(hf_dir) / SIDE_FILE if isinstance(hf_dir, (str, Path)) else None
    if side_file is not None and side_file.is_file():
        from safetensors.torch import load_file

        found = load_file(str(side_file))
        where = side_file
    else:
        load_map, _ = embedded(reader.names(), method)
        found = {side: reader.get(hf) for hf, side in load_map.items()}
        where = hf_dir
    if not found:
        return 0
    if missing := sorted(set(ours) - set(found)):
        raise KeyError(f"{where}: side-module tensors missing: {missing[:5]} ({len(missing)})")
    if unexpected := sorted(set(found) - set(ours)):
        raise KeyError(f"{where}: side-module tensors this method has no place for: "
                       f"{unexpected[:5]} ({len(unexpected)})")
    for name, param in ours.items():
        t = found[name]
        if t.shape != param.shape:
            raise ValueError(f"{where}: side-module tensor {name} has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(t)
    return len(ours)
