"""Profile HyLaR's canvas path alone on the GPU (one step's reasoning images, one per
micro-batch): the frozen SigLIP forward and the compressor + projector forward + backward.
    python benchmarks/profile_canvas.py SIGLIP_DIR [--images 8] [--hidden 3584]"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from profiling import profile_call  # noqa: E402
from megatron_latent.latent.canvas import CanvasEncoder, load_siglip  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("siglip")
ap.add_argument("--images", type=int, default=8)
ap.add_argument("--hidden", type=int, default=3584)
a = ap.parse_args()
siglip, _ = load_siglip(a.siglip)
enc = CanvasEncoder(siglip.config.hidden_size, a.hidden, siglip, n_queries=16).cuda()
S = siglip.config.image_size
pix = [torch.rand(1, 3, S, S, device="cuda") for _ in range(a.images)]
params = [p for p in enc.parameters()]
patches = [enc.encode_patches(p) for p in pix]


def sig():
    for p in pix:
        enc.encode_patches(p)


def comp():
    for x in patches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = enc.canvas_proj(enc.compressor(x))
        torch.autograd.grad(out.float().square().sum(), params, allow_unused=True)


for name, fn in (("siglip_fwd", sig), ("compressor_fwd_bwd", comp)):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter(); fn(); host = time.perf_counter() - t
    torch.cuda.synchronize(); wall = time.perf_counter() - t
    print(f"# {name}: host launch {1e3 * host:.1f} ms, wall {1e3 * wall:.1f} ms")
    profile_call(name, fn, rows=15)
