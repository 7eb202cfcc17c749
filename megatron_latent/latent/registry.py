"""Latent methods by name: the one place SFT, generation, evaluation, RL and the converters
turn a name (a flag, or a checkpoint's record) into a method.

A checkpoint records `{"name", "hparams"}` (`describe`), so a tool given only `--ckpt` rebuilds
the method the run trained with (`from_record`)."""

from __future__ import annotations

import importlib

from megatron_latent.latent.base import LatentMethod, PlainLM

_METHODS: dict[str, type[LatentMethod]] = {}
# an HF export's record of its method, beside config.json (conversion writes it)
HF_METHOD_FILE = "latent_method.json"
# modules that register the built-in methods when imported (imported on first lookup)
_BUILTIN = ("megatron_latent.latent.lvr", "megatron_latent.latent.hylar",
            "megatron_latent.latent.deeplatent")


def register(cls: type[LatentMethod]) -> type[LatentMethod]:
    """Class decorator: make a method available by its `name`."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"latent method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


register(PlainLM)


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_METHODS))


def method_class(name: str) -> type[LatentMethod]:
    _load_builtin()
    if name not in _METHODS:
        raise ValueError(f"unknown latent method {name!r}; registered: {', '.join(names())}")
    return _METHODS[name]


def build(name: str, tokenizer, model_cfg, hparams: dict | None = None) -> LatentMethod:
    """The method `name` for this model: its tokens added to `tokenizer` (in place), its
    hyper-parameters from `hparams` (defaults for the rest)."""
    cls = method_class(name)
    ids = cls.add_tokens(tokenizer, model_cfg.vocab_size)
    return cls.create(ids, model_cfg, **(hparams or {}))


def describe(method: LatentMethod) -> dict:
    return {"name": method.name, "hparams": method.hparams()}


def checkpoint_record(meta: dict) -> dict:
    """The method record in a checkpoint's metadata; checkpoints written before methods were
    recorded hold LVR (the only method then)."""
    return meta.get("latent_method") or {"name": "lvr", "hparams": {}}


def record_for(path) -> dict | None:
    """{"name", "hparams"} of the method a checkpoint dir was trained with: a megatron_latent
    checkpoint's metadata; an HF dir's `latent_method.json` (our export) or a method's own
    config keys (`detect_hf`); None when an HF dir says nothing."""
    import json
    from pathlib import Path

    from megatron_latent import checkpointing

    path = Path(path)
    if checkpointing.is_checkpoint(path):
        return checkpoint_record(checkpointing.read_metadata(path))
    if (path / HF_METHOD_FILE).is_file():
        return json.loads((path / HF_METHOD_FILE).read_text())
    config = path / "config.json"
    return detect_hf(json.loads(config.read_text())) if config.is_file() else None


def from_record(record: dict, tokenizer, model_cfg, **override) -> LatentMethod:
    """The method a checkpoint recorded (`describe`); `override`: hyper-parameters that win."""
    return build(record["name"], tokenizer, model_cfg, {**record.get("hparams", {}), **override})


def detect_hf(hf_config: dict) -> dict | None:
    """The record of the method an HF config was released with (its own config keys), or None."""
    for name in names():
        found = _METHODS[name].detect_hf(hf_config)
        if found is not None:
            return found
    return None


def add_args(parser, default: str | None = "lvr") -> None:
    """--latent-method and every registered method's own flags."""
    parser.add_argument("--latent-method", choices=names(), default=default,
                        help="the latent method (default: the checkpoint's when resuming or "
                             "starting from a megatron_latent checkpoint)")
    for name in names():
        _METHODS[name].add_args(parser)


def hparams_from_args(name: str, args) -> dict:
    return method_class(name).hparams_from_args(args)


def hparam_names(name: str) -> set[str]:
    """The hyper-parameters `create` takes for method `name` (its dataclass fields)."""
    import dataclasses
    import inspect

    cls = method_class(name)
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    params = inspect.signature(cls.create).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY or (
        p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("token_ids", "model_cfg"))}


def flagged_hparams(args, name: str | None = None) -> dict:
    """The hyper-parameters given by method flags: of method `name`, or, when the method comes
    from a checkpoint (None), of the one method whose flags were given (two: an error)."""
    if name is not None:
        return hparams_from_args(name, args)
    given = {n: h for n in names() if (h := hparams_from_args(n, args))}
    if len(given) > 1:
        raise ValueError(f"flags of several latent methods given: {sorted(given)}")
    return next(iter(given.values()), {})
