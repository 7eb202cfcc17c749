"""LVR stage-2 (RL) prompts: LLaVA-style JSON without <image> tokens, the gpt turn holding the
reference ("<answer>X</answer>"). A records file or a meta JSON listing them, as in SFT.
Bad records raise DataError naming the file, record and field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_latent.data.errors import DataError
from megatron_latent.data.llava_records import RESERVED, _read_json, _sources


@dataclass(frozen=True)
class RLPrompt:
    id: str
    images: tuple[str, ...]
    question: str
    reference: str


def _record(raw, file, i: int, folder: Path) -> RLPrompt:
    def fail(field, msg):
        raise DataError(file, i, field, msg)

    if not isinstance(raw, dict):
        fail(None, f"expected an object, got {type(raw).__name__}")
    imgs = raw.get("image", raw.get("images"))
    imgs = [imgs] if isinstance(imgs, str) else imgs
    if not imgs or not all(isinstance(x, str) and x for x in imgs):
        fail("image", "needs an image path or a non-empty list of them")
    paths = []
    for k, name in enumerate(imgs):
        p = folder / name
        if not p.is_file():
            fail(f"image[{k}]" if len(imgs) > 1 else "image", f"file not found: {p}")
        paths.append(str(p))
    conv = raw.get("conversations")
    if (not isinstance(conv, list) or len(conv) < 2
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv)):
        fail("conversations", "needs a human turn and a gpt turn with string values")
    human, gpt = conv[0], conv[1]
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        fail("conversations", "expected turns from 'human' then 'gpt'")
    if "<image>" in human["value"]:
        fail("conversations[0].value", "stage-2 prompts carry no <image> token (images come "
             "first in the user turn)")
    if not human["value"].strip() or not gpt["value"].strip():
        fail("conversations", "empty question or reference")
    for k, turn in enumerate((human, gpt)):  # they would break the chat template
        if bad := [t for t in RESERVED if t in turn["value"]]:
            fail(f"conversations[{k}].value", f"contains reserved special tokens {bad}")
    return RLPrompt(str(raw.get("id", f"{Path(file).name}#{i}")), tuple(paths),
                    human["value"].strip(), gpt["value"].strip())


def load_rl_prompts(data_path, image_folder=None) -> list[RLPrompt]:
    path = Path(data_path).absolute()
    out = []
    for file, folder, obj in _sources(path, _read_json(path), image_folder):
        if not isinstance(obj, list):
            raise DataError(file, None, None, "expected a JSON list of records", "json")
        out += [_record(raw, file, i, Path(folder)) for i, raw in enumerate(obj)]
    if not out:
        raise DataError(path, None, None, "no records", "json")
    return out
