"""Generate one answer to a text+image prompt, with or without latent reasoning steps.

    python tools/generate.py --ckpt CKPT --image photo.jpg --prompt "Where is the cup?"
    python tools/generate.py --ckpt CKPT --image a.jpg --prompt "..." --latent-method lvr \\
        --answer-prefix '<|lvr_start|>' --latent-steps 8 --json
    torchrun --nproc-per-node 2 tools/generate.py --ckpt CKPT --tp 2 --image a.jpg --prompt "..."

--ckpt is an HF Qwen2.5-VL directory or a megatron_latent checkpoint (any TP/PP). Text output
shows special tokens, and each run of latent positions as "[latent x N]". --json prints one
object: tokens, text, latent_positions, logprobs (0 at latent positions), finish_reason and
latent_norms (L2 norm of each fed-back hidden state). Only the last pipeline stage's TP rank 0
prints. Generation stops at <|im_end|> / <|endoftext|> or after --max-new-tokens.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_latent.platform.quiet import quiet_known_warnings  # noqa: E402
quiet_known_warnings()  # known third-party start-up noise off; --verbose keeps it


def main(argv=None):
    from megatron_latent.inference.loading import add_latent_args, add_model_args, open_image

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the user's text (after the images)")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    add_latent_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    try:
        images = [open_image(f) for f in a.image]
    except ValueError as e:
        p.error(str(e))
    from megatron_latent import parallel
    from megatron_latent.inference.generator import Generator
    from megatron_latent.inference.loading import (is_output_rank, load_for_generation,
                                                   render_completion, stop_ids)
    from megatron_latent.inference.prompts import build_prompt
    from megatron_latent.inference.sampling import SamplingParams

    try:
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_p=a.top_p, top_k=a.top_k, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    parallel.initialize(parallel.ParallelConfig(a.tp, a.pp), seed=a.seed)
    try:
        model, processor, _, method = load_for_generation(
            a.ckpt, tp=a.tp, pp=a.pp, spec=a.spec, dtype=a.dtype, latent_method=a.latent_method)
        tok = processor.tokenizer
        rule = method.decode_program(a.latent_mode, a.latent_steps, a.latent_threshold)
        params.stop_ids = stop_ids(tok)
        prompt = build_prompt(processor, a.prompt, images, system=a.system,
                              answer_prefix=a.answer_prefix,
                              images_first=method.prompt_images_first)
        gen = Generator(model, rule=rule, pad_id=tok.pad_token_id or 0)
        c = gen.generate([prompt], params)[0]
        if is_output_rank():
            text = render_completion(tok, c)
            if a.json:
                print(json.dumps({"tokens": c.tokens, "text": text,
                                  "latent_positions": c.latent_positions, "logprobs": c.logprobs,
                                  "finish_reason": c.finish_reason,
                                  "latent_norms": c.latents.norm(dim=-1).tolist()}))
            else:
                print(text)
    except (ValueError, FileNotFoundError) as e:  # bad --ckpt or method, prompt too long
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
