"""tools/generate.py and tools/eval_vqa.py end to end on the tiny checkpoint (as subprocesses, on
CPU), against in-process `Generator` runs built without the loading code under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_latent.conversion.hf_load import load_hf_weights
from megatron_latent.eval.answers import score_prediction
from megatron_latent.inference.generator import Completion, Generator
from megatron_latent.eval.vqa_data import format_question, read_vqa_jsonl
from megatron_latent.inference.loading import (answer_text, load_for_generation, open_image,
                                               render_completion)
from megatron_latent.latent import registry
from megatron_latent.inference.prompts import build_prompt
from megatron_latent.inference.sampling import SamplingParams
from megatron_latent.models.qwen25vl.config import Qwen25VLConfig
from megatron_latent.models.qwen25vl.model import Qwen25VLModel
from megatron_latent.testing.generation import lvr_processor, lvr_rule
from megatron_latent.testing.samples import sample_photo

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Where is the astronaut looking?"
GEN_FLAGS = ["--prompt", PROMPT, "--latent-method", "lvr", "--answer-prefix", "<|lvr_start|>",
             "--latent-steps", "3", "--max-new-tokens", "8", "--json"]


def _cmd(name: str, *args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a world of one, whatever launched pytest
    return dict(args=[sys.executable, str(REPO / "tools" / name), *map(str, args)], env=env,
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tool(name: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(**_cmd(name, *args), timeout=timeout)


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stderr[-4000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    out = {}
    for name, size in (("astronaut", (150, 100)), ("coffee", (90, 130)), ("chelsea", (121, 115))):
        out[name] = root / f"{name}.png"
        sample_photo(name).resize(size).save(out[name])
    return out


@pytest.fixture(scope="module")
def oracle(tiny_ckpts, megatron_single_rank):
    path = tiny_ckpts["tiny-a"]
    model = Qwen25VLModel(Qwen25VLConfig.from_hf(path))
    load_hf_weights(model, path)
    model.eval()
    proc, ids = lvr_processor(path)
    return path, model, proc, ids


@pytest.fixture(scope="module")
def runs(oracle, images, tmp_path_factory):
    """The HF-dir generate run, and the tiny checkpoint converted to a Megatron checkpoint
    (concurrently: both are mostly interpreter start-up)."""
    path = oracle[0]
    ckpt = tmp_path_factory.mktemp("megatron") / "ckpt"
    convert = subprocess.Popen(**_cmd("convert_hf_to_megatron.py", "--hf-dir", path,
                                      "--out", ckpt))
    try:
        hf = json.loads(_ok(_tool("generate.py", "--ckpt", path, "--image",
                                  images["astronaut"], *GEN_FLAGS)))
        out, err = convert.communicate(timeout=300)
    finally:
        if convert.poll() is None:
            convert.kill()
    _ok(subprocess.CompletedProcess(convert.args, convert.returncode, out, err))
    return hf, ckpt


def test_generate_equals_in_process(oracle, images, runs):
    from PIL import Image

    path, model, proc, ids = oracle
    out = runs[0]
    assert set(out) == {"tokens", "text", "latent_positions", "logprobs", "finish_reason",
                        "latent_norms"}
    assert out["latent_positions"] == [0, 1, 2]
    assert len(out["tokens"]) == 8 or out["finish_reason"] == "stop"
    tok = proc.tokenizer
    prompt = build_prompt(proc, PROMPT, [Image.open(images["astronaut"]).convert("RGB")],
                          answer_prefix="<|lvr_start|>")
    stops = tuple(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    ref = Generator(model, rule=lvr_rule(ids, steps=3), pad_id=tok.pad_token_id).generate(
        [prompt], SamplingParams(max_new_tokens=8, stop_ids=stops))[0]
    assert out["tokens"] == ref.tokens
    assert out["latent_positions"] == ref.latent_positions
    assert out["finish_reason"] == ref.finish_reason
    assert out["logprobs"] == pytest.approx(ref.logprobs, abs=1e-4)
    assert out["latent_norms"] == pytest.approx(ref.latents.norm(dim=-1).tolist(), abs=1e-4)
    assert out["text"] == "[latent x 3]" + tok.decode(ref.tokens[3:], skip_special_tokens=False)


def test_generate_megatron_checkpoint_equals_hf(images, runs):
    hf_run, ckpt = runs
    out = json.loads(_ok(_tool("generate.py", "--ckpt", ckpt, "--image", images["astronaut"],
                               *GEN_FLAGS)))
    assert out["tokens"] == hf_run["tokens"]
    assert out["latent_positions"] == hf_run["latent_positions"]
    assert out["logprobs"] == pytest.approx(hf_run["logprobs"], abs=1e-4)


def test_generate_bad_image(oracle, tmp_path):
    res = _tool("generate.py", "--ckpt", oracle[0], "--prompt", "hi",
                "--image", tmp_path / "nope.png")
    assert res.returncode == 2
    assert "nope.png" in res.stderr


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(("" if r is None else json.dumps(r)) + "\n" for r in rows))
    return path


def test_eval_vqa_sweep(oracle, images, tmp_path):
    path = oracle[0]
    # beside the images: absolute paths may not leave the JSONL's folder (the image root)
    data = _write_jsonl(images["astronaut"].parent / "vqa.jsonl", [
        {"id": "mc1", "image": str(images["astronaut"]), "question": "What is the person wearing?",
         "choices": ["a spacesuit", "a dress"], "answer": "A"},
        {"id": "mc2", "image": str(images["chelsea"]), "question": "Which animal is this?",
         "choices": ["dog", "cat", "bird"], "answer": "cat"},
        {"id": "open", "images": [str(images["coffee"]), str(images["astronaut"])],
         "question": "How many cups are there?", "answer": "1"},
    ])
    out = tmp_path / "eval" / "preds.jsonl"
    stdout = _ok(_tool("eval_vqa.py", "--ckpt", path, "--data", data, "--out", out,
                       "--latent-method", "lvr", "--answer-prefix", "<|lvr_start|>",
                       "--latent-steps-sweep", "1,2", "--max-new-tokens", "6",
                       "--batch-size", "2"))
    summary = json.loads((out.parent / "summary.json").read_text())
    assert set(summary["accuracy"]) == {"1", "2"}
    _, model, proc, ids = oracle
    tok = proc.tokenizer
    items = read_vqa_jsonl(data)
    prompts = [build_prompt(proc, format_question(it), [open_image(f) for f in it.images],
                            answer_prefix="<|lvr_start|>") for it in items]
    stops = tuple(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    for k in (1, 2):
        rows = [json.loads(line) for line in
                (out.parent / f"preds.steps{k}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["mc1", "mc2", "open"]
        # the oracle: the same prompts generated in-process, batched as the tool does (2 + 1)
        gen = Generator(model, rule=lvr_rule(ids, steps=k), pad_id=tok.pad_token_id)
        params = SamplingParams(max_new_tokens=6, stop_ids=stops)
        ref = gen.generate(prompts[:2], params) + gen.generate(prompts[2:], params)
        assert [r["output"] for r in rows] == [answer_text(tok, c) for c in ref]
        for r in rows:
            pred, correct = score_prediction(r["output"], r["answer"], r["choices"])
            assert r["correct"] == correct and r["prediction"] == pred
            assert r["latent_steps"] == k and r["n_latent"] == k
            assert "[latent" not in r["output"] and "<|" not in r["output"]
        n_ok = sum(r["correct"] for r in rows)
        assert summary["accuracy"][str(k)] == pytest.approx(n_ok / 3)
        assert f"[latent steps {k}] accuracy: {n_ok}/3 = " in stdout
    assert rows[0]["choices"] == ["a spacesuit", "a dress"] and rows[2]["choices"] is None
    assert not out.exists()  # sweeping: only the .steps{K} files


def test_eval_vqa_bad_data(images, tmp_path):
    data = _write_jsonl(images["astronaut"].parent / "bad.jsonl", [
        {"image": str(images["astronaut"]), "question": "q", "answer": "a"},
        None,  # blank lines still count
        {"image": "missing.png", "question": "q2", "answer": "b"},
    ])
    res = _tool("eval_vqa.py", "--ckpt", tmp_path, "--data", data, "--out", tmp_path / "p.jsonl")
    assert res.returncode == 2
    assert "missing.png" in res.stderr and "bad.jsonl line 3" in res.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_method_decode_programs(oracle):
    tok, ids = oracle[2].tokenizer, oracle[3]
    cfg = Qwen25VLConfig.from_hf(oracle[0])
    assert registry.build("none", tok, cfg).decode_program(None, 4, 0.5) is None
    lvr = registry.build("lvr", tok, cfg)
    assert lvr.decode_program(None, 4, 0.5) == lvr_rule(ids, "steps", 4, 0.5)
    assert lvr.decode_program("threshold", 5, 0.3) == lvr_rule(ids, "threshold", 5, 0.3)
    assert lvr.decode_program().steps == 8
    with pytest.raises(ValueError, match="unknown latent method 'coconut'.*hylar, lvr, none"):
        registry.build("coconut", tok, cfg)


def test_hylar_tokens_and_forced_rule(oracle):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(oracle[0])  # a private copy without LVR's tokens
    n = len(tok)
    hylar = registry.build("hylar", tok, Qwen25VLConfig.from_hf(oracle[0]))
    v = tok.get_vocab()
    # HyLaR's order and specialness: canvas first, non-special (released checkpoints' ids)
    assert [v[t] for t in ("<|canvas|>", "<|canvas_start|>", "<|canvas_end|>")] == [n, n + 1, n + 2]
    assert not any(t.special for t in tok.added_tokens_decoder.values()
                   if t.content.startswith("<|canvas"))
    rule = hylar.decode_program(None, 6)
    assert (rule.mode, rule.steps) == ("forced", 6)
    assert (rule.start_id, rule.latent_id, rule.end_id) == (
        v["<|canvas_start|>"], v["<|canvas|>"], v["<|canvas_end|>"])
    assert hylar.decode_program().steps == 32  # 2 x canvas tokens, HyLaR's cap
    with pytest.raises(ValueError, match="'forced' only"):
        hylar.decode_program("steps", 6)


def test_render_completion(oracle):
    tok, ids = oracle[2].tokenizer, oracle[3]
    lvr, a, b = ids["<|lvr|>"], tok.encode("ab")[0], tok.encode("cd")[0]
    c = Completion(tokens=[a, lvr, lvr, ids["<|lvr_end|>"], lvr, b], logprobs=[0.0] * 6,
                   latent_positions=[1, 2, 4], latents=torch.zeros(3, 4), finish_reason="length")
    assert render_completion(tok, c) == (tok.decode([a]) + "[latent x 2]<|lvr_end|>"
                                         "[latent x 1]" + tok.decode([b]))


def test_load_needs_parallel_state(monkeypatch, oracle):
    from megatron.core import parallel_state as ps

    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="parallel state is not initialised"):
        load_for_generation(oracle[0])
