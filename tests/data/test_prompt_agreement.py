"""SFT, RL and evaluation prompt the model with the same tokens: an SFT sample's prompt (everything
up to and including the assistant header) equals, token for token, the prompt RL rollouts get
(rl/step_data.PromptBuilder), the one the evaluation tool builds (eval/vqa_data + build_prompt),
and the HF processor's own chat-template rendering of the same messages (how the LVR seed's
evaluation and GRPO build prompts), for one and two images, with and without a system message."""

from __future__ import annotations

import json

import pytest

from megatron_latent.data import LvrSftDataset, add_lvr_tokens, load_hf_processing
from megatron_latent.testing.samples import sample_photo

PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=1024 * 28 * 28)  # keep 28-multiple sizes
QUESTION = "Where is the flag? Look at the left side."
CASES = {  # name: (images, the SFT record's human turn, system message or None)
    "one image": (["a.png"], "<image>\n" + QUESTION, None),
    "one image, system": (["a.png"], "<image>\n" + QUESTION, "Answer in one word."),
    "two images": (["a.png", "c.png"], "<image>\n<image>\n" + QUESTION, None),
    "two images, system": (["a.png", "c.png"], "<image>\n<image>\n" + QUESTION,
                           "Answer in one word."),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoProcessor

    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl

    root = tmp_path_factory.mktemp("prompts")
    ckpt = make_tiny_qwen25vl(root / "ckpt", preset="tiny-a")
    sample_photo("astronaut").resize((224, 168)).save(root / "a.png")  # 6 x 8 merged tokens
    sample_photo("coffee").resize((140, 196)).save(root / "c.png")  # 7 x 5
    tok, ip, vocab = load_hf_processing(ckpt)
    oracle = AutoProcessor.from_pretrained(ckpt)  # the seed's eval: chat template + processor
    oracle.image_processor.size = {"shortest_edge": PIXELS["min_pixels"],
                                   "longest_edge": PIXELS["max_pixels"]}
    add_lvr_tokens(oracle.tokenizer, vocab)
    return dict(root=root, ckpt=str(ckpt), tok=tok, ip=ip, vocab=vocab, oracle=oracle)


def sft_prompt(env, images, human, system):
    """The sample's ids up to its first supervised token, and that token."""
    conv = ([{"from": "system", "value": system}] if system else []) + [
        {"from": "human", "value": human},
        {"from": "gpt", "value": "<lvr>\n<answer>left</answer>"}]
    path = env["root"] / "sft.json"
    path.write_text(json.dumps([{"image": images, "conversations": conv,
                                 "bboxes": [{"image": 0, "bbox": [0.1, 0.2, 0.5, 0.6]}]}]))
    ds = LvrSftDataset(path, tokenizer=env["tok"], image_processor=env["ip"],
                       vocab_size=env["vocab"], seq_length=4096, image_folder=env["root"],
                       **PIXELS)
    s = ds[0]
    first = int(s["loss_mask"].nonzero()[0]) + 1  # loss_mask[i] supervises token i + 1
    ids = s["input_ids"].tolist()
    return ids[:first], ids[first], s, ds.ids


def rl_prompt(env, images, system, answer_prefix=""):
    from megatron_latent.rl.data import RLPrompt
    from megatron_latent.rl.loop import GRPOConfig
    from megatron_latent.rl.step_data import PromptBuilder

    cfg = GRPOConfig(data_path="unused", system_prompt=system, answer_prefix=answer_prefix,
                     **PIXELS)
    builder = PromptBuilder(env["ckpt"], None, cfg)
    add_lvr_tokens(builder.tokenizer, env["vocab"])  # as the latent method does in run_grpo
    rec = RLPrompt("r0", tuple(str(env["root"] / f) for f in images), QUESTION, "left")
    prompts, _, _, skipped = builder.build([rec])
    assert skipped == 0
    return prompts[0]


def eval_prompt(env, images, system, answer_prefix=""):
    """As tools/eval_vqa.py builds it: a VQA JSONL item, format_question, the images opened by
    open_image, build_prompt with the checkpoint's processor (the method's tokens added)."""
    from transformers import AutoProcessor

    from megatron_latent.eval.vqa_data import format_question, read_vqa_jsonl
    from megatron_latent.inference.loading import open_image
    from megatron_latent.inference.prompts import build_prompt

    path = env["root"] / "vqa.jsonl"
    path.write_text(json.dumps({"images": images, "question": QUESTION, "answer": "left"}) + "\n")
    item = read_vqa_jsonl(path)[0]
    processor = AutoProcessor.from_pretrained(env["ckpt"])
    processor.image_processor.size = {"shortest_edge": PIXELS["min_pixels"],
                                      "longest_edge": PIXELS["max_pixels"]}
    add_lvr_tokens(processor.tokenizer, env["vocab"])
    return build_prompt(processor, format_question(item), [open_image(f) for f in item.images],
                        system=system, answer_prefix=answer_prefix)


def template_prompt(env, images, system):
    from megatron_latent.inference.loading import open_image

    proc = env["oracle"]
    msgs = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else [])
    msgs.append({"role": "user", "content": [{"type": "image"} for _ in images]
                 + [{"type": "text", "text": QUESTION}]})
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    enc = proc(text=[text], images=[open_image(env["root"] / f) for f in images],
               return_tensors="pt")
    return enc["input_ids"][0].tolist(), enc


@pytest.mark.parametrize("case", list(CASES))
def test_sft_rl_eval_prompts_agree(env, case):
    images, human, system = CASES[case]
    sft, first, sample, ids = sft_prompt(env, images, human, system)
    rl, ev = rl_prompt(env, images, system), eval_prompt(env, images, system)
    oracle, enc = template_prompt(env, images, system)
    tok = env["tok"]
    assert oracle == sft, (tok.decode(oracle), tok.decode(sft))
    assert rl.input_ids == sft, (tok.decode(rl.input_ids), tok.decode(sft))
    assert ev.input_ids == sft, (tok.decode(ev.input_ids), tok.decode(sft))
    header = [ids.im_start, *tok.encode("assistant\n", add_special_tokens=False)]
    assert sft[-len(header):] == header
    assert first == ids.lvr_start  # the answer opens with the latent span
    # the same pixels and grids too (the same resize rule at equal pixel budgets)
    for p in (rl, ev):
        assert p.image_grid_thw.tolist() == sample["image_grid_thw"].tolist()
        assert p.pixel_values.equal(sample["pixel_values"])
    assert enc["pixel_values"].equal(sample["pixel_values"])


def test_answer_prefix_continues_the_sft_prompt(env):
    """`--answer-prefix '<|lvr_start|>'` gives SFT's prompt and its first answer token."""
    images, human, system = CASES["two images, system"]
    sft, first, _, ids = sft_prompt(env, images, human, system)
    assert first == ids.lvr_start
    assert rl_prompt(env, images, system, "<|lvr_start|>").input_ids == sft + [first]
    assert eval_prompt(env, images, system, "<|lvr_start|>").input_ids == sft + [first]


def test_hylar_sft_prompt_is_generations(env, tmp_path):
    """HyLaR's SFT data puts the question before its images; generation, evaluation and RL
    follow the method's layout (`prompt_images_first`), so their prompt is the SFT prefix."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import AutoTokenizer, SiglipImageProcessor

    from megatron_latent.data.interleaved import ZebraCotDataset
    from megatron_latent.data.synthetic_interleaved import make_synthetic_interleaved
    from megatron_latent.inference.prompts import build_prompt
    from megatron_latent.latent import registry
    from megatron_latent.models.qwen25vl.config import Qwen25VLConfig

    data = make_synthetic_interleaved(tmp_path / "d", num=2, val_num=0, min_side=112,
                                      max_side=224, progress=False)
    tok = AutoTokenizer.from_pretrained(env["ckpt"])
    method = registry.build("hylar", tok, Qwen25VLConfig.from_hf(env["ckpt"]), {})
    ds = ZebraCotDataset(data / "train", tokenizer=tok, image_processor=env["ip"],
                         canvas_processor=SiglipImageProcessor(size={"height": 56, "width": 56}),
                         vocab_size=env["vocab"], seq_length=4096, **PIXELS)
    s = ds[0]
    first = int(s["loss_mask"].nonzero()[0]) + 1
    row = pq.read_table(next((data / "train").rglob("*.parquet"))).slice(0, 1).to_pylist()[0]
    question = row["Question"].replace("<image_start>[problem_image_1]<image_end>", "").strip()
    photo = Image.open(io.BytesIO(row["problem_image_1"]["bytes"]))
    assert not method.prompt_images_first
    prompt = build_prompt(env["oracle"], question, [photo],
                          images_first=method.prompt_images_first)
    assert tok.decode(prompt.input_ids) == tok.decode(s["input_ids"][:first].tolist())
    assert prompt.input_ids == s["input_ids"][:first].tolist()
    lvr_layout = build_prompt(env["oracle"], question, [photo])
    assert lvr_layout.input_ids != prompt.input_ids  # the layouts do differ
