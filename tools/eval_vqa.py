"""Evaluate a checkpoint on a local VQA JSONL (free-form and multiple choice), greedy by default.

    python tools/eval_vqa.py --ckpt CKPT --data vstar.jsonl --out runs/eval/vstar.jsonl
    python tools/eval_vqa.py --ckpt CKPT --data vstar.jsonl --out runs/eval/vstar.jsonl \\
        --latent-method lvr --answer-prefix '<|lvr_start|>' --latent-steps-sweep 4,8,16
    torchrun --nproc-per-node 2 tools/eval_vqa.py --ckpt CKPT --tp 2 --data D --out O

Data format: megatron_latent/eval/vqa_data.py (image/images, question, choices, answer, id).
The prompt is the question (plus "A. ..." option lines for multiple choice). The scored output is
the generated text with latent positions and special tokens removed; the prediction and its
correctness come from megatron_latent/eval/answers.py (score_prediction).

Writes --out (one JSON row per item: id, question, choices, answer, output, prediction, correct,
latent_steps, n_latent, finish_reason) and summary.json beside it (accuracy per latent-steps
value). With --latent-steps-sweep the whole eval runs once per value and each run writes
OUT with ".steps{K}" before the extension. Prints `accuracy: X/Y = Z%` (and with a sweep, a
table). Bad data: the VqaDataError message and exit code 2.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it


def _steps_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def predictions_path(out: Path, steps: int | None, sweep: bool) -> Path:
    """OUT, or with a sweep OUT with ".steps{K}" before its extension."""
    return out.with_name(f"{out.stem}.steps{steps}{out.suffix}") if sweep else out


def _write_json_atomic(path: Path, obj) -> None:
    from megatron_latent.fsutil import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _accuracy_line(correct: int, total: int) -> str:
    return f"accuracy: {correct}/{total} = {100.0 * correct / total:.2f}%"


def evaluate(gen, processor, items, params, a, steps, progress: bool,
             images_first: bool = True) -> list[dict]:
    """One pass over `items` in batches; one prediction row per item (prompts in the layout of
    the method's SFT data: `images_first`)."""
    from tqdm import tqdm

    from megatron_latent.eval.answers import score_prediction
    from megatron_latent.eval.vqa_data import VqaDataError, format_question
    from megatron_latent.inference.loading import answer_text, open_image
    from megatron_latent.inference.prompts import build_prompt

    rows = []
    bar = tqdm(total=len(items), desc=f"eval (latent steps {steps})" if steps else "eval",
               disable=not progress, file=sys.stderr)
    for i in range(0, len(items), a.batch_size):
        batch = items[i:i + a.batch_size]
        prompts = []
        for item in batch:
            try:
                images = [open_image(f) for f in item.images]
            except ValueError as e:
                raise VqaDataError(a.data, item.line, "image", str(e)) from None
            prompts.append(build_prompt(processor, format_question(item), images,
                                        system=a.system, answer_prefix=a.answer_prefix,
                                        images_first=images_first))
        for item, c in zip(batch, gen.generate(prompts, params)):
            output = answer_text(processor.tokenizer, c)
            prediction, correct = score_prediction(output, item.answer, item.choices)
            rows.append({"id": item.id, "question": item.question, "choices": item.choices,
                         "answer": item.answer, "output": output, "prediction": prediction,
                         "correct": bool(correct), "latent_steps": steps,
                         "n_latent": len(c.latent_positions), "finish_reason": c.finish_reason})
        bar.update(len(batch))
    bar.close()
    return rows


def main(argv=None):
    from megatron_latent.inference.loading import add_latent_args, add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="VQA JSONL (see megatron_latent/eval/vqa_data.py)")
    p.add_argument("--image-root", default=None, help="image paths are relative to this "
                   "(default: the JSONL's folder)")
    p.add_argument("--allow-images-outside-folder", action="store_true",
                   help="accept image paths that leave --image-root (absolute or '..')")
    p.add_argument("--out", required=True, help="predictions JSONL")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    add_latent_args(p)
    p.add_argument("--latent-steps-sweep", type=_steps_list, default=None, metavar="K1,K2,...",
                   help="run the whole eval once per latent-steps value (overrides --latent-steps)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1, got {a.limit}")

    from megatron_latent.eval.vqa_data import (VqaDataError, read_vqa_jsonl,
                                               write_predictions_jsonl)

    if not Path(a.data).is_file():
        print(f"error: --data {a.data}: file not found", file=sys.stderr)
        return 2
    try:
        items = read_vqa_jsonl(a.data, a.image_root,
                               allow_outside_root=a.allow_images_outside_folder)
    except VqaDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    items = items[:a.limit] if a.limit else items
    if not items:
        print(f"error: {a.data}: no records", file=sys.stderr)
        return 2

    from megatron_latent import parallel
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.loading import (is_output_rank, load_for_generation,
                                                   stop_ids)
    from megatron_latent.inference.sampling import SamplingParams

    try:
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_p=a.top_p, top_k=a.top_k, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    sweep = a.latent_steps_sweep is not None
    values = a.latent_steps_sweep or [a.latent_steps]
    out = Path(a.out)
    parallel.initialize(parallel.ParallelConfig(a.tp, a.pp), seed=a.seed)
    try:
        model, processor, _, method = load_for_generation(
            a.ckpt, tp=a.tp, pp=a.pp, spec=a.spec, dtype=a.dtype, latent_method=a.latent_method)
        tok = processor.tokenizer
        params.stop_ids = stop_ids(tok)
        rules = [method.decode_program(a.latent_mode, k, a.latent_threshold)
                 for k in values]  # check all first
        writer = is_output_rank()
        runs = []
        for k, rule in zip(values, rules):
            steps = rule.steps if rule is not None else None
            gen = Generator(model, rule=rule, pad_id=tok.pad_token_id or 0)
            rows = evaluate(gen, processor, items, params, a, steps,
                            progress=writer and sys.stderr.isatty(),
                            images_first=method.prompt_images_first)
            n_ok = sum(r["correct"] for r in rows)
            path = predictions_path(out, steps, sweep)
            if writer:
                write_predictions_jsonl(path, rows)
                label = f"[latent steps {k}] " if sweep else ""
                print(label + _accuracy_line(n_ok, len(rows)), flush=True)
            runs.append({"latent_steps": steps, "correct": n_ok, "total": len(rows),
                         "accuracy": n_ok / len(rows), "predictions": str(path)})
    except (ValueError, FileNotFoundError) as e:  # VqaDataError, bad --ckpt or method
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy()
    if writer:
        summary = {"ckpt": str(a.ckpt), "data": str(a.data), "items": len(items),
                   "latent_method": method.name, "latent_mode": a.latent_mode,
                   "answer_prefix": a.answer_prefix, "max_new_tokens": a.max_new_tokens,
                   "temperature": a.temperature,
                   "accuracy": {str(r["latent_steps"] if r["latent_steps"] is not None else "none"):
                                r["accuracy"] for r in runs},
                   "runs": runs}
        _write_json_atomic(out.parent / "summary.json", summary)
        if sweep:
            print(f"\n{'latent_steps':>12}  {'correct':>9}  accuracy")
            for r in runs:
                print(f"{r['latent_steps']:>12}  {r['correct']:>4}/{r['total']:<4}  "
                      f"{100.0 * r['accuracy']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
