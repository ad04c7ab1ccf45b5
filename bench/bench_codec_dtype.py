"""HeartCodec precision choices (--codec-dtype / validation_codec_dtype): each one's error against strict fp32 and
its decode time for 3 minutes of audio. Full-size config (HeartCodecConfig.official()), random weights, random
codes, 10 Euler steps, CFG 1.25, the same codes and noise seed for every choice.

    python3 bench/bench_codec_dtype.py                       # on a CUDA machine (~2-3 min)
    python3 bench/bench_codec_dtype.py --tiny --seconds 10   # CPU smoke run of this script

fp32 here is strict (TF32 off for matmuls and cuDNN convolutions), the reference for the errors. The rule for the
default: the most accurate choice that keeps 3 minutes under 5 s on an H100.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmtiny.codec import CODEC_DTYPES, HeartCodec, HeartCodecConfig  # noqa: E402
from hmtiny.codec.precision import codec_torch_dtype  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke test of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_codec_dtype.json")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = HeartCodecConfig.tiny() if args.tiny else HeartCodecConfig.official()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {name}  torch {torch.__version__}  config {'tiny' if args.tiny else 'official'}  "
          f"{args.seconds:g} s of audio", flush=True)
    base = HeartCodec.from_config(cfg, seed=0, device=device)
    codes = torch.randint(0, cfg.codebook_size, (cfg.num_quantizers, round(args.seconds * 12.5)),
                          generator=torch.Generator().manual_seed(1))
    results, outputs = [], {}
    for choice in CODEC_DTYPES:  # fp32 first: the reference
        codec = copy.deepcopy(base).to(codec_torch_dtype(choice))
        codec.tf32 = {"fp32": False, "tf32": True, "bf16": None}[choice]  # as hmtiny.codec.load_codec sets it
        codec.decode(codes, seed=0)  # warm-up: cuDNN/cuBLAS heuristics, allocator, CUDA graph capture
        times = []
        for _ in range(args.repeat):
            sync(device)
            t0 = time.perf_counter()
            wav = codec.decode(codes, seed=0)  # returns a host tensor: the time includes the copy
            times.append(time.perf_counter() - t0)
        outputs[choice] = wav
        ref = outputs["fp32"]
        row = {"codec_dtype": choice, "median_s": statistics.median(times), "times_s": times,
               "rms_rel_err_vs_fp32": ((wav - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item(),
               "max_abs_err_vs_fp32": (wav - ref).abs().max().item()}
        results.append(row)
        print(f"{choice:>5}: {row['median_s']:7.3f} s  ({args.seconds / row['median_s']:6.1f}x real time)  "
              f"rel RMS error vs fp32 {row['rms_rel_err_vs_fp32']:.2e}, max abs {row['max_abs_err_vs_fp32']:.2e}",
              flush=True)
        del codec
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out) / "bench_codec_dtype.json"
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "seconds": args.seconds,
                               "config": "tiny" if args.tiny else "official", "results": results}, indent=2))
    print(f"# wrote {out}")
    print(f"\n| codec dtype | decode s ({args.seconds:g} s audio) | rel RMS error vs fp32 | max abs error |\n"
          f"|---|---|---|---|")
    for r in results:
        print(f"| {r['codec_dtype']} | {r['median_s']:.2f} | {r['rms_rel_err_vs_fp32']:.1e} | "
              f"{r['max_abs_err_vs_fp32']:.1e} |")
    fast = [r for r in results if r["median_s"] * 180 / args.seconds < 5.0]  # scaled to 3 minutes of audio
    best = min(fast, key=lambda r: r["rms_rel_err_vs_fp32"]) if fast else None
    print(f"\n# the most accurate choice decoding 3 min in under 5 s here: {best['codec_dtype'] if best else 'none'}")


if __name__ == "__main__":
    main()
