"""Check a dist-checkpoint iteration before megatron-core reads it.

torch's distributed-checkpoint format stores its index (`.metadata`) and every non-tensor object
(ShardedObjects: RNG states, the common state) as pickles, which torch unpickles without
restriction: a crafted checkpoint runs code. Checkpoints are code and must come from sources
you trust (README, docs/reliability.md); this check narrows what a checkpoint can do: the
index is read through an allow-list of the classes the format uses, every pickled object must
load with `torch.load(weights_only=True)` (plus numpy arrays, for the numpy RNG state), and
every file the index names must exist and be long enough, so a damaged iteration is reported
by file instead of by a bare EOFError deep inside the loader.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("collections", "OrderedDict"),
            *((_DCP_META, n) for n in ("Metadata", "MetadataIndex", "StorageMeta",
                                       "TensorProperties", "TensorStorageMetadata",
                                       "ChunkStorageMetadata", "BytesStorageMetadata",
                                       "_MEM_FORMAT_ENCODING"))}
# numpy arrays (np.random.get_state() in the RNG ShardedObject), as torch's docs allow-list them
_NUMPY = [np.ndarray, np.dtype, np._core.multiarray._reconstruct,
          *(type(np.dtype(t)) for t in ("uint32", "int64", "float64"))]


class CheckpointLoadError(RuntimeError):
    """A checkpoint iteration that cannot be loaded; the message names it."""


class UnsafeCheckpointError(CheckpointLoadError):
    """A checkpoint holding pickled objects outside the allow-list."""


class DamagedCheckpointError(CheckpointLoadError):
    """A checkpoint file that is missing, truncated or unreadable."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "torch" and
                                          isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refers to {module}.{name}")


def read_index(path: Path):
    """The iteration's `.metadata`, unpickled through the allow-list."""
    f = Path(path) / ".metadata"
    try:
        with open(f, "rb") as h:
            return _IndexUnpickler(h).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{f}: {e}, which a checkpoint index has no reason to hold; "
                                    "refusing to load it (checkpoints are code: load only those "
                                    "from sources you trust)") from None
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{f} is missing: the iteration is incomplete") from None
    except Exception as e:  # EOFError, UnpicklingError, ...
        raise DamagedCheckpointError(f"{f}: unreadable ({type(e).__name__}: {e}); the file is "
                                     "damaged or truncated") from None


def verify_iteration(path) -> None:
    """Raise DamagedCheckpointError / UnsafeCheckpointError naming the file; else return."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    index = read_index(path)
    sizes: dict[str, int] = {}
    for key, info in index.storage_data.items():
        f = path / info.relative_path
        if info.relative_path not in sizes:
            if not f.is_file():
                raise DamagedCheckpointError(f"{f} is missing (named by {path / '.metadata'})")
            sizes[info.relative_path] = f.stat().st_size
        end = info.offset + info.length
        if end > sizes[info.relative_path]:
            raise DamagedCheckpointError(
                f"{f} is truncated: {sizes[info.relative_path]} bytes, but {key.fqn} is stored "
                f"up to byte {end}")
        if not isinstance(index.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{f}: {key.fqn} is stored through transforms "
                                        f"{info.transform_descriptors} that cannot be checked")
        with open(f, "rb") as h:
            h.seek(info.offset)
            blob = io.BytesIO(h.read(info.length))
        try:
            with torch.serialization.safe_globals(_NUMPY):
                torch.load(blob, weights_only=True)
        except pickle.UnpicklingError as e:
            why = [ln for ln in str(e).splitlines() if "GLOBAL" in ln] or [str(e)[:200]]
            raise UnsafeCheckpointError(
                f"{f}: the object {key.fqn} does not load with torch.load(weights_only=True) "
                f"({why[0]}); refusing to load it (checkpoints are code: load only those from "
                "sources you trust)") from None
        except Exception as e:
            raise DamagedCheckpointError(f"{f}: {key.fqn} is unreadable ({type(e).__name__}: "
                                         f"{e}); the file is damaged") from None
