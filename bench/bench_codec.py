"""HeartCodec decode speed: full-size config (HeartCodecConfig.official()), random weights, random codes.

    python3 bench/bench_codec.py                      # on a CUDA machine: 30 s and 3 min, bf16 and fp32
    python3 bench/bench_codec.py --tiny --seconds 10  # CPU smoke run of this script

Variants (10 Euler steps, CFG 1.25, 29.76 s windows):
  bf16            bf16 weights; float32 norms / ODE state / cross-fade; estimator as a CUDA graph;
                  ScalarModel one window per call (the default)
  bf16 eager      same without the CUDA graph (kernels launched one by one from Python)
  bf16 batch=4    same, ScalarModel 4 windows per call
  bf16 batch=all  same, every window in one ScalarModel call
  bf16 autocast   float32 weights under torch.autocast(bfloat16)
  fp32            float32 weights, torch's default math flags (matmul fp32, cuDNN convs may use TF32)
  fp32 eager      same without the CUDA graph
  reference-like  the reference's way: fp32, eager, weight norm recomputed from (g, v) at every conv
                  call, ScalarModel one window at a time, each window copied to the host
Every variant decodes the same codes with the same seed. Timings: wall clock around decode() (which
returns a host tensor), after one warm-up decode, median of --repeat runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmtiny.codec import HeartCodec, HeartCodecConfig, plan_windows  # noqa: E402
from hmtiny.codec.estimator import mlp_hidden  # noqa: E402
from hmtiny.codec.scalar import decoder_channels  # noqa: E402
from hmtiny.codec.weights import weight_normed_names  # noqa: E402


# ----------------------------------------------------------------------------- FLOP counts
def estimator_flops(cfg: HeartCodecConfig, batch: int, frames: int) -> float:
    """Multiply-adds x2 of one estimator call on [batch, frames]."""
    w, w2 = cfg.width, 2 * cfg.width
    per_token = 0.0
    for width, layers in ((w, cfg.num_layers), (w2, cfg.num_layers_2)):
        per_token += layers * (4 * width * width + 3 * width * mlp_hidden(width) + 2 * frames * width)
    per_token += 3 * cfg.in_channels * w + w * w                       # proj_in
    per_token += 3 * (cfg.in_channels + w) * w2 + w2 * w2             # connection_proj
    per_token += 3 * w2 * cfg.out_channels + cfg.out_channels ** 2    # proj_out
    return 2 * per_token * batch * frames


def scalar_flops(cfg: HeartCodecConfig, sequences: int, frames: int) -> float:
    ch = decoder_channels(cfg)
    macs, rate = cfg.latent_hidden_dim * ch[0] * cfg.delay_kernel_size, 1
    for i, s in enumerate(cfg.upsample_factors):
        macs += rate * ch[i] * ch[i + 1] * 2 * s                      # transposed conv, per input step
        rate *= s
        macs += rate * 5 * (ch[i + 1] ** 2 * cfg.res_kernel_size + ch[i + 1] ** 2)
    rate *= cfg.num_samples
    macs += rate * (ch[-1] ** 2 * cfg.default_kernel_size + ch[-1] * cfg.default_kernel_size)
    return 2 * macs * sequences * frames


def decode_flops(cfg: HeartCodecConfig, num_codes: int, steps: int) -> tuple[float, float]:
    plan = plan_windows(num_codes, 372, cfg.sample_rate)
    n = len(plan.starts)
    return (n * steps * estimator_flops(cfg, 2, plan.latent_frames),
            scalar_flops(cfg, 2 * n, plan.latent_frames))


# ----------------------------------------------------------------------------- the reference's way
class ReferenceLike:
    """Weight norm as parametrizations (recomputed per call), ScalarModel per window, host copy per window."""

    def __init__(self, codec: HeartCodec):
        self.codec = copy.deepcopy(codec)
        self.codec.cuda_graphs = False
        for name in weight_normed_names(self.codec):
            nn.utils.parametrizations.weight_norm(self.codec.get_submodule(name[: -len(".weight")]))

    def decode(self, codes, steps, guidance, seed):
        codec = self.codec
        original = codec.latents_to_windows

        def per_window(latents, plan, decode_batch=None):
            return torch.cat([original(latents[i: i + 1], plan).cpu() for i in range(latents.shape[0])])

        codec.latents_to_windows = per_window
        try:
            return codec.decode(codes, steps=steps, guidance=guidance, seed=seed)
        finally:
            del codec.latents_to_windows


# ----------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, nargs="+", default=[30, 180])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=1.25)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", nargs="+",
                    default=["bf16", "bf16 eager", "bf16 batch=4", "bf16 batch=all", "bf16 autocast",
                             "fp32", "fp32 eager", "reference-like"])
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke test of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_codec.json")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = HeartCodecConfig.tiny() if args.tiny else HeartCodecConfig.official()
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "torch": torch.__version__, "config": "tiny" if args.tiny else "official",
            "steps": args.steps, "guidance": args.guidance, "results": []}
    print(f"# {info['device']}  torch {torch.__version__}  config {info['config']}", flush=True)

    t0 = time.perf_counter()
    fp32 = HeartCodec.from_config(cfg, seed=0, device=device)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16) if "bf16" in " ".join(args.variants) else None
    sync(device)
    params = sum(p.numel() for p in fp32.parameters())
    print(f"# built {params / 1e6:.0f}M params in {time.perf_counter() - t0:.1f}s", flush=True)

    def eager(codec):
        def run(c):
            codec.cuda_graphs = False
            try:
                return codec.decode(c, args.steps, args.guidance, seed=0)
            finally:
                codec.cuda_graphs = True
        return run

    def variant(name):
        if name == "bf16":
            return lambda c: bf16.decode(c, args.steps, args.guidance, seed=0)
        if name == "bf16 eager":
            return eager(bf16)
        if name == "bf16 batch=4":
            return lambda c: bf16.decode(c, args.steps, args.guidance, seed=0, decode_batch=4)
        if name == "bf16 batch=all":
            return lambda c: bf16.decode(c, args.steps, args.guidance, seed=0, decode_batch=1000)
        if name == "bf16 autocast":
            def run(c):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return fp32.decode(c, args.steps, args.guidance, seed=0)
            return run
        if name == "fp32":
            return lambda c: fp32.decode(c, args.steps, args.guidance, seed=0)
        if name == "fp32 eager":
            return eager(fp32)
        if name == "reference-like":
            ref = ReferenceLike(fp32)
            return lambda c: ref.decode(c, args.steps, args.guidance, seed=0)
        raise ValueError(name)

    gen = torch.Generator().manual_seed(1)
    fns = {name: variant(name) for name in args.variants}
    outputs = {}
    for seconds in args.seconds:
        t = round(seconds * 12.5)
        codes = torch.randint(0, cfg.codebook_size, (cfg.num_quantizers, t), generator=gen)
        est, sca = decode_flops(cfg, t, args.steps)
        windows = len(plan_windows(t, 372).starts)
        for name, fn in fns.items():
            try:
                fn(codes)  # warm-up: cuDNN/cuBLAS heuristics, allocator, graph capture
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()  # every variant's weights + captured graphs
                med, times, wav = timed(lambda: fn(codes), device, args.repeat)
                # working memory of one decode, above what was allocated before it
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if device.type == "cuda" else math.nan
            except Exception as e:  # report and go on with the other variants
                print(f"{name:>15} {seconds:6.0f}s audio: FAILED {type(e).__name__}: {e}", flush=True)
                info["results"].append({"variant": name, "seconds": seconds, "error": f"{type(e).__name__}: {e}"})
                continue
            outputs[name, seconds] = wav
            row = {"variant": name, "seconds": seconds, "codes": t, "windows": windows, "median_s": med,
                   "times_s": times, "x_realtime": seconds / med, "peak_gib": peak,
                   "tflops": (est + sca) / med / 1e12, "estimator_tflop": est / 1e12, "scalar_tflop": sca / 1e12,
                   "samples": wav.shape[1]}
            info["results"].append(row)
            print(f"{name:>15} {seconds:6.0f}s audio: {med:7.3f} s  ({seconds / med:6.1f}x real time, "
                  f"{row['tflops']:6.1f} TFLOP/s, +{peak:5.1f} GiB working memory)", flush=True)
    for row in info["results"]:  # same codes and seed: how far each variant lands from fp32
        ref = outputs.get(("fp32", row["seconds"]))
        wav = outputs.get((row["variant"], row["seconds"]))
        if ref is not None and wav is not None:
            row["max_rel_diff_vs_fp32"] = ((wav - ref).abs().max() / ref.abs().max()).item()
            row["rms_rel_diff_vs_fp32"] = ((wav - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()

    # Where the time goes (bf16, longest input): ScalarModel alone on the same latents.
    if bf16 is not None and "bf16" in fns:
        seconds = max(args.seconds)
        t = round(seconds * 12.5)
        codes = torch.randint(0, cfg.codebook_size, (cfg.num_quantizers, t), generator=gen)
        plan = plan_windows(t, 372, cfg.sample_rate)
        with torch.inference_mode():
            torch.manual_seed(0)
            _, latents = bf16.detokenize(codes, steps=args.steps, guidance=args.guidance, return_latents=True)
            lat = torch.cat(latents)
            med, _, _ = timed(lambda: bf16.latents_to_windows(lat, plan), device, args.repeat)
        total = next(r["median_s"] for r in info["results"] if r["variant"] == "bf16" and r["seconds"] == seconds)
        _, sca = decode_flops(cfg, t, args.steps)
        info["breakdown_bf16"] = {"seconds": seconds, "scalar_s": med, "rest_s": total - med,
                                  "scalar_tflops": sca / med / 1e12}
        print(f"# bf16 {seconds:.0f}s: ScalarModel {med:.3f} s ({sca / med / 1e12:.0f} TFLOP/s), "
              f"flow matching + rest {total - med:.3f} s", flush=True)

    out = Path(args.out) / "bench_codec.json"
    out.write_text(json.dumps(info, indent=2))
    print(f"# wrote {out}")
    print("\n| variant | audio | decode s | x real time | TFLOP/s | working GiB | rel diff vs fp32 (max / rms) |")
    print("|---|---|---|---|---|---|---|")
    for r in info["results"]:
        if "error" in r:
            print(f"| {r['variant']} | {r['seconds']:.0f} s | failed: {r['error'][:60]} | | | | |")
        else:
            print(f"| {r['variant']} | {r['seconds']:.0f} s | {r['median_s']:.3f} | {r['x_realtime']:.1f} | "
                  f"{r['tflops']:.0f} | {r['peak_gib']:.1f} | {r.get('max_rel_diff_vs_fp32', math.nan):.1e} / "
                  f"{r.get('rms_rel_diff_vs_fp32', math.nan):.1e} |")


if __name__ == "__main__":
    main()
