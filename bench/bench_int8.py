"""Device benchmark of the int8 weight-only (W8A16) matmuls and of a full-3B LoRA step on an int8 base.

    python3 bench/bench_int8.py matmul [--out DIR]   per-matmul times at HeartMuLa-3B shapes (+ correctness)
    python3 bench/bench_int8.py model  [--out DIR]   3B LoRA train step, bf16 base vs int8 base (random weights)
    python3 bench/bench_int8.py ceilings             copy bandwidth and dense bf16 TFLOP/s of this card

Times are medians of triton.testing.do_bench (CUDA events, L2 flushed before every call) over several input sets
used in turn, so that the weights come from device memory as they do in a real model.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmtiny.quant import quantize_weight  # noqa: E402
from kernels import int8_matmul as K  # noqa: E402

SHAPES = [(3072, 3072), (3072, 1024), (3072, 8192), (8192, 3072), (3072, 1536)]  # K -> N
MS = [1, 2, 16, 2048, 8192]
ROTATE = 4


def bench(fn_of_set, n_sets=ROTATE) -> float:
    """Median µs of fn_of_set(i), i cycling over the input sets."""
    from triton.testing import do_bench
    it = itertools.cycle(range(n_sets))
    return 1e3 * do_bench(lambda: fn_of_set(next(it)), warmup=25, rep=100, return_mode="median")


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def ceilings():
    n = 1 << 28  # 512 MiB of bf16, copied: 1 GiB moved
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = bench(lambda i: b.copy_(a), 1)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tm = bench(lambda i: x @ y, 1)
    out = {"copy_TBps": 2 * a.numel() * 2 / t / 1e6, "bf16_mm_TFLOPs": 2 * 8192 ** 3 / tm / 1e6}
    print(f"ceilings: device copy {out['copy_TBps']:.2f} TB/s (read+write), bf16 8192^3 matmul {out['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    return out


def matmul_table(ms=MS, shapes=SHAPES):
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, n in shapes:
        sets = []
        for _ in range(ROTATE):
            w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
            wq, s = (t.contiguous() for t in quantize_weight(w))
            sets.append((wq, s, s.to(torch.bfloat16), K.dequantize_ref(wq, s, torch.bfloat16)))
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(ROTATE)]
            wq, s, _, wd = sets[0]
            ref = (xs[0].float() @ wd.float().T)
            row = {"K": k, "N": n, "M": m, "err": rel_err(K.int8_matmul(xs[0], wq, s), ref)}
            row["bf16_us"] = bench(lambda i: xs[i] @ sets[i][3].T)
            row["deq_mm_us"] = bench(lambda i: xs[i] @ (sets[i][0].to(torch.bfloat16) * sets[i][2][:, None]).T)
            row["int8_us"] = bench(lambda i: K.int8_matmul(xs[i], sets[i][0], sets[i][1]))
            if m <= K.DECODE_MAX_M:
                row["err_split"] = rel_err(K.int8_matmul(xs[0], wq, s, regime="decode_split"), ref)
                row["int8_split_us"] = bench(lambda i: K.int8_matmul(xs[i], sets[i][0], sets[i][1], regime="decode_split"))
            else:  # backward to the input at training sizes: dx = dy @ W
                dys = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(ROTATE)]
                row["err_dx"] = rel_err(K.int8_matmul_dx(dys[0], wq, s), dys[0].float() @ wd.float())
                row["bf16_dx_us"] = bench(lambda i: dys[i] @ sets[i][3])
                row["int8_dx_us"] = bench(lambda i: K.int8_matmul_dx(dys[i], sets[i][0], sets[i][1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_table(rows):
    print("\n| K->N | M | bf16 µs | deq+mm µs | int8 µs | int8 split µs | best vs bf16 | int8 GB/s or TFLOP/s | err |"
          " dx bf16 µs | dx int8 µs | dx vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        best = min(r["int8_us"], r.get("int8_split_us", 1e9))
        if r["M"] <= K.DECODE_MAX_M:
            rate = f"{(r['N'] * r['K'] + 2 * r['M'] * (r['K'] + r['N'])) / best / 1e3:.0f} GB/s"
        else:
            rate = f"{2 * r['M'] * r['N'] * r['K'] / best / 1e6:.0f} TFLOP/s"
        split = f"{r['int8_split_us']:.1f}" if "int8_split_us" in r else "-"
        dx = (f"{r['bf16_dx_us']:.1f} | {r['int8_dx_us']:.1f} | {r['bf16_dx_us'] / r['int8_dx_us']:.2f}x"
              if "int8_dx_us" in r else "- | - | -")
        err = max(r["err"], r.get("err_split", 0), r.get("err_dx", 0))
        print(f"| {r['K']}->{r['N']} | {r['M']} | {r['bf16_us']:.1f} | {r['deq_mm_us']:.1f} | {r['int8_us']:.1f} | "
              f"{split} | {r['bf16_us'] / best:.2f}x | {rate} | {err:.1e} | {dx} |")


def tuned_configs():
    out = {}
    for regime, tuner in K._tuned.items():
        for key, cfg in tuner.cache.items():
            out[f"{regime} {key[:5]}"] = str(cfg)
    return out


# ----------------------------------------------------------------------------- full 3B LoRA step
def build_3b(int8: bool):
    from hmtiny.config import ModelConfig
    from hmtiny.model import HeartMuLa
    from hmtiny.quant import quantize_model
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = HeartMuLa(ModelConfig.official_3b())
    torch.set_default_dtype(torch.float32)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.scale") else p.normal_(0, 0.02)
    model.init_buffers("cuda")
    if int8:
        quantize_model(model)
    return model


def batch_575(device="cuda", prompt=200, audio=375, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = prompt + audio
    tokens = torch.zeros(1, s, 9, dtype=torch.long)
    tokens[0, :prompt, 8] = torch.randint(0, 128256, (prompt,), generator=g)
    tokens[0, prompt:, :8] = torch.randint(0, 8192, (audio, 8), generator=g)
    mask = torch.zeros(1, s, 9, dtype=torch.bool)
    mask[0, :prompt, 8] = True
    mask[0, prompt:, :8] = True
    frames = torch.zeros(1, s, dtype=torch.bool)
    frames[0, prompt:] = True
    return tokens.to(device), mask.to(device), frames.to(device), torch.tensor([10], device=device)


def model_step(int8: bool, steps=8, warmup=3, rank=16):
    from hmtiny.lora import inject_lora
    torch.cuda.empty_cache()
    model = build_3b(int8)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, rank=rank)
    model.backbone.gradient_checkpointing = True
    model.decoder.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = batch_575()
    torch.cuda.synchronize()
    weights_gib = torch.cuda.memory_allocated() / 2 ** 30
    times, losses = [], []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = model.loss(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    out = {"base": "int8" if int8 else "bf16", "step_ms": 1e3 * statistics.median(times[warmup:]),
           "peak_GiB": torch.cuda.max_memory_allocated() / 2 ** 30, "weights_GiB": weights_gib,
           "reserved_GiB": torch.cuda.max_memory_reserved() / 2 ** 30, "losses": losses,
           "audio_frames_per_s": 375 / statistics.median(times[warmup:])}
    print(json.dumps(out), flush=True)
    del model, opt, params
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["matmul", "model", "ceilings"])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ms", default=None, help="comma-separated M values (default 1,2,16,2048,8192)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, __import__("triton").__version__)
    result = {"device": torch.cuda.get_device_name()}
    if args.what == "ceilings":
        result["ceilings"] = ceilings()
    elif args.what == "matmul":
        ms = [int(x) for x in args.ms.split(",")] if args.ms else MS
        rows = matmul_table(ms)
        result.update(rows=rows, configs=tuned_configs())
        print_table(rows)
        bad = [r for r in rows if max(r["err"], r.get("err_split", 0), r.get("err_dx", 0)) > 1e-2]
        print("correctness:", "all within 1e-2 of the fp32 reference" if not bad else f"FAILED {bad}")
    else:
        result["model"] = [model_step(False), model_step(True)]
        b, q = result["model"]
        print(f"\n3B LoRA r16 step, 575 rows (200 prompt + 375 audio), grad checkpointing: "
              f"bf16 base {b['step_ms']:.1f} ms {b['peak_GiB']:.2f} GiB peak | int8 base {q['step_ms']:.1f} ms "
              f"{q['peak_GiB']:.2f} GiB peak ({q['step_ms'] / b['step_ms']:.2f}x time)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"bench_int8_{args.what}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
