"""Build a tiny, random, complete Hugging Face Qwen2.5-VL checkpoint offline.

The directory looks like a real Qwen2.5-VL hub checkpoint (config, safetensors in the
original key layout, byte-level BPE tokenizer with Qwen's special tokens, chat template,
image-processor config), so loaders and converters can be tested without any download.
"""

import json
import math
import zlib
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from megatron_latent.fsutil import atomic_dir, check_writable

# Both presets make windowed vision attention matter for small images: the window
# (window_size // patch // merge merged tokens a side) is smaller than a 150x100 image's grid.
PRESETS = {
    "tiny-a": dict(  # GQA 4:2, tied embeddings, vision windows of 2x2 merged tokens
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, rope_theta=1e6, mrope_section=[2, 3, 3], rms_norm_eps=1e-6),
        vision=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, window_size=56,
                    fullatt_block_indexes=[1, 3]),
        tie_word_embeddings=True),
    "tiny-b": dict(  # GQA 6:2 (3 q heads per group), untied, vision windows of 3x3 merged tokens
        text=dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=192, rope_theta=1e6, mrope_section=[2, 3, 3], rms_norm_eps=1e-6),
        vision=dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=96, window_size=84,
                    fullatt_block_indexes=[2]),
        tie_word_embeddings=False),
}

# Qwen2.5-VL's added tokens, in Qwen's order (ids follow the BPE vocab consecutively).
# As in the real tokenizer, the tool-call / FIM tokens are added but not "special".
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
_NON_SPECIAL = set(SPECIAL_TOKENS[14:])
BPE_VOCAB_SIZE = 512  # 256 byte symbols + 256 merges
VOCAB_ROUND, MIN_FREE_IDS = 64, 8  # embedding rows = round_up(len(tokenizer) + 8, 64), like 152064 > 151665

# Qwen2's pre-tokenization regex (same as transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX).
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Written for this file, modelled on the chat template shipped with Qwen2.5-VL-*-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small fixed English corpus: the BPE merges learned from it are deterministic.
CORPUS = """\
The picture shows a woman in a white space suit standing in front of a flag. She holds a helmet
in her left hand and smiles at the camera. Behind her there is a model of the space shuttle.
A cup of coffee sits on a small saucer. The coffee is dark brown, and the foam on top is light.
There is a spoon next to the cup, and the table under it is made of old wood.
Describe the image in one sentence. What color is the cup? How many people are in the photo?
Answer the question about the picture. Look at the left side and the right side of the image.
In the morning the city is quiet. People walk to work, buses stop at the corner, and the sun
rises over the river. By noon the streets are full of noise, and the shops are open.
We train small models to check that every part of the system works. The numbers 0, 1, 2, 3,
4, 5, 6, 7, 8, 9 and 10 appear in the text, as do words like "image", "video", "frame" and "box".
A red ball, a green tree, a blue sky and a yellow house: these are simple things to draw.
The model reads the text, looks at the pixels, and writes an answer. It should think step by
step before it answers, and it should say when it does not know.
Q: Where is the dog? A: The dog is under the table, next to the door.
Q: What is the man doing? A: He is reading a book while he waits for the train.
"""


def _build_tokenizer() -> Tokenizer:
    # Same pipeline as Qwen2's tokenizer.json: NFC, regex split, byte-level (no prefix space).
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    for t in SPECIAL_TOKENS:  # one at a time so ids follow SPECIAL_TOKENS order
        tok.add_special_tokens([t])
    return tok


def _tokenizer_config(ids: dict) -> dict:
    decoder = {str(ids[t]): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                 single_word=False, special=t not in _NON_SPECIAL) for t in SPECIAL_TOKENS}
    return dict(add_bos_token=False, add_prefix_space=False, added_tokens_decoder=decoder,
                additional_special_tokens=[t for t in SPECIAL_TOKENS[1:14]], bos_token=None,
                chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, eos_token="<|im_end|>",
                errors="replace", model_max_length=32768, pad_token="<|endoftext|>",
                processor_class="Qwen2_5_VLProcessor", split_special_tokens=False,
                tokenizer_class="Qwen2Tokenizer", unk_token=None)


PREPROCESSOR_CONFIG = dict(
    image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
    do_convert_rgb=True, do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],  # OpenAI CLIP
    image_std=[0.26862954, 0.26130258, 0.27577711], patch_size=14, temporal_patch_size=2, merge_size=2,
    # An explicit "size" matters: without it 5.17's Qwen2VLImageProcessor writes min/max_pixels into
    # its class-level default dict. max_pixels is small so test images stay tiny.
    min_pixels=3136, max_pixels=200704, size=dict(shortest_edge=3136, longest_edge=200704))


def _build_config(preset: str, ids: dict, vocab_size: int, tie, vision_overrides, overrides):
    from transformers import Qwen2_5_VLConfig
    p = PRESETS[preset]
    text = {**p["text"], **overrides}
    vision = {**p["vision"], **(vision_overrides or {})}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # 5.17 reads M-RoPE from text_config.rope_parameters with rope_type "default" ("mrope" is
    # mapped to it); mrope_section splits head_dim/2 rotary frequencies into (t, h, w).
    if sum(text["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"sum(mrope_section) must be head_dim/2 = {head_dim // 2}")
    if text["num_attention_heads"] % text["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    rope = dict(rope_type="default", mrope_section=text.pop("mrope_section"), rope_theta=text.pop("rope_theta"))
    text_config = dict(vocab_size=vocab_size, hidden_act="silu", max_position_embeddings=4096,
                       max_window_layers=text["num_hidden_layers"], rope_parameters=rope,
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"], **text)
    vision_config = dict(hidden_act="silu", in_channels=3, patch_size=14, temporal_patch_size=2,
                         spatial_merge_size=2, tokens_per_second=2,
                         out_hidden_size=text["hidden_size"], **vision)
    # tie_word_embeddings lives on the top-level config in 5.x (that is where tying reads it).
    return Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config,
        tie_word_embeddings=p["tie_word_embeddings"] if tie is None else bool(tie),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"])


@torch.no_grad()
def _randomize_(model, seed: int) -> None:
    """Give every parameter seeded random values, so parity tests exercise every tensor.

    Each tensor gets its own generator keyed on (seed, name): values do not depend on the
    order of parameters or on unrelated config changes (e.g. adding a layer).
    """
    for name, p in model.named_parameters():  # tied lm_head is yielded once (as embed_tokens)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith(".bias"):
            value = 0.02 * noise  # non-zero biases
        elif p.ndim == 1:
            value = 1.0 + 0.1 * noise  # RMSNorm weights around 1
        elif "embed_tokens" in name:
            value = 0.05 * noise
        else:  # linear / conv weights: std 1/sqrt(fan_in) keeps activations O(1)
            value = noise / math.sqrt(p[0].numel())
        p.copy_(value)


def make_tiny_qwen25vl(out_dir, preset: str = "tiny-a", seed: int = 0, tie_word_embeddings=None, *,
                       vision_overrides: dict | None = None, overwrite: bool = False, **overrides) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint to `out_dir` and return its path.

    `overrides` change text fields of the preset (e.g. num_hidden_layers=3, mrope_section=...),
    `vision_overrides` vision fields. Output is byte-identical for equal arguments. The directory
    is built beside `out_dir` and renamed into place; an existing non-empty `out_dir` is only
    replaced when `overwrite=True`.
    """
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out_dir = Path(out_dir).absolute()
    check_writable(out_dir, overwrite)

    tok = _build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = -(-(n_tok + MIN_FREE_IDS) // VOCAB_ROUND) * VOCAB_ROUND
    config = _build_config(preset, ids, vocab_size, tie_word_embeddings, vision_overrides, overrides)

    with atomic_dir(out_dir) as tmp:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
        _randomize_(model, seed)
        model.generation_config = GenerationConfig(
            bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
        model.save_pretrained(tmp)  # safetensors, original (hub) key names

        tok.save(str(tmp / "tokenizer.json"))
        files = {"tokenizer_config.json": _tokenizer_config(ids),
                 "preprocessor_config.json": PREPROCESSOR_CONFIG,
                 "chat_template.json": {"chat_template": CHAT_TEMPLATE}}  # processor's copy, as on the hub
        for fname, obj in files.items():
            (tmp / fname).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return out_dir
