"""Device benchmark of the int8 weight-only (W8A16) matmuls and of a full-3B LoRA step on an int8 base.

    python3 bench/bench_int8.py matmul [--out DIR]   per-matmul times at HeartMuLa-3B shapes (+ correctness)
    python3 bench/bench_int8.py model  [--out DIR]   3B LoRA train step, bf16 base vs int8 base (random weights)
    python3 bench/bench_int8.py model --pairs N      bf16 then int8, N times in turn, in this one process
    python3 bench/bench_int8.py model --fresh N      bf16 then int8, N times in turn, each in a fresh process
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmtiny.quant import quantize_weight  # noqa: E402
from kernels import gemv  # noqa: E402
from kernels import int8_matmul as K  # noqa: E402

SHAPES = [(3072, 3072), (3072, 1024), (3072, 8192), (8192, 3072), (3072, 1536)]  # K -> N
MS = [1, 2, 16, 575, 2048, 3000, 8192]  # + 575 / 3000: backbone / decoder rows of one 30 s clip
DECODE_REGIMES = ["gemv", "decode", "decode_split", "tiles"]
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
    print(f"ceilings: device copy {out['copy_TBps']:.2f} TB/s (read+write), "
          f"bf16 8192^3 matmul {out['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    return out


def gpu_us(fn_of_set, n_sets) -> float:
    """GPU µs per call with no host overhead: n_sets calls (distinct weights, more bytes than L2) captured in one
    CUDA graph, replayed with the L2 flushed before each replay."""
    from triton.testing import do_bench
    for i in range(n_sets):  # compile, autotune and fill the launch cache before capturing
        fn_of_set(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_sets):
            fn_of_set(i)
    return 1e3 * do_bench(g.replay, warmup=10, rep=60, return_mode="median") / n_sets


def host_us(fn_of_set, n_sets, calls=300) -> float:
    """Host µs per call (launch overhead): calls queued without waiting for the GPU."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for j in range(calls):
        fn_of_set(j % n_sets)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / calls


def matmul_table(ms=MS, shapes=SHAPES):
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, n in shapes:
        n_sets = min(48, max(ROTATE, -(-150_000_000 // (n * k))))  # >= 150 MB of int8 weights per graph replay
        sets = []
        for _ in range(n_sets):
            w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
            wq, s = (t.contiguous() for t in quantize_weight(w))
            sets.append((wq, s, s.to(torch.bfloat16), K.dequantize_ref(wq, s, torch.bfloat16)))
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(n_sets)]
            wq, s, _, wd = sets[0]
            ref = xs[0].float() @ wd.float().T
            row = {"K": k, "N": n, "M": m, "regime": K._regime(m), "sets": n_sets}
            mm = lambda regime: (lambda i: K.int8_matmul(xs[i], sets[i][0], sets[i][1], regime=regime))
            row["bf16_us"] = gpu_us(lambda i: xs[i] @ sets[i][3].T, n_sets)
            row["bf16_eager_us"] = bench(lambda i: xs[i] @ sets[i][3].T, n_sets)
            deq_mm = lambda i: xs[i] @ (sets[i][0].to(torch.bfloat16) * sets[i][2][:, None]).T
            row["deq_mm_eager_us"] = bench(deq_mm, n_sets)
            # the default dispatch's decode candidates (with kernels.gemv's "tiles" where they divide the shape)
            regimes = K._decode_candidates(xs[0], wq, s) if m <= K.DECODE_MAX_M else ["train", "dequant"]
            for regime in regimes:
                row[f"err_{regime}"] = rel_err(mm(regime)(0), ref)
                row[f"{regime}_us"] = gpu_us(mm(regime), n_sets)
            row["int8_eager_us"] = bench(mm(None), n_sets)  # the default dispatch, launched from Python
            if m <= K.DECODE_MAX_M:
                row["choice"] = K._decode_regime(xs[0], wq, s)  # what the default dispatch timed fastest
                if "tiles" in regimes:
                    row["tiles_cfg"] = list(gemv.plan(xs[0], wq, split=False, scale=s))
                row["host_us_bf16"] = host_us(lambda i: xs[i] @ sets[i][3].T, n_sets)
                row["host_us_int8"] = host_us(mm(None), n_sets)
                with K.switches.overridden(HMTINY_INT8_FAST_LAUNCH="0"):
                    row["host_us_int8_triton_launch"] = host_us(mm(None), n_sets)
            else:  # backward to the input at training sizes: dx = dy @ W
                dys = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(n_sets)]
                ref_dx = dys[0].float() @ wd.float()
                row["bf16_dx_us"] = gpu_us(lambda i: dys[i] @ sets[i][3], n_sets)
                for regime in regimes:
                    dx = lambda i: K.int8_matmul_dx(dys[i], sets[i][0], sets[i][1], regime=regime)
                    row[f"err_dx_{regime}"] = rel_err(dx(0), ref_dx)
                    row[f"dx_{regime}_us"] = gpu_us(dx, n_sets)
                del dys
            rows.append(row)
            print(json.dumps(row), flush=True)
            xs = None  # freed before the next shape's
        sets = None
        torch.cuda.empty_cache()
    return rows


def print_table(rows):
    print("\nGPU µs per call (CUDA graph, weights rotated through > L2, L2 flushed per replay); eager = launched "
          "from Python (do_bench, the default dispatch for int8)")
    dec = [r for r in rows if r["M"] <= K.DECODE_MAX_M]
    if dec:
        print("| K->N | M | bf16 | int8 gemv | int8 tensor-core | int8 split-K | int8 tiles (kernels.gemv) | "
              "best vs bf16 | int8 GB/s | default picks | eager bf16 | eager int8 | eager deq+mm (quanto-like) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in dec:
            best = min(r[f"{g}_us"] for g in DECODE_REGIMES if f"{g}_us" in r)
            gb = (r["N"] * r["K"] + 2 * r["M"] * (r["K"] + r["N"])) / best / 1e3
            cols = " | ".join(f"{r[f'{g}_us']:.1f}" if f"{g}_us" in r else "-" for g in DECODE_REGIMES)
            print(f"| {r['K']}->{r['N']} | {r['M']} | {r['bf16_us']:.1f} | {cols} | {r['bf16_us'] / best:.2f}x | "
                  f"{gb:.0f} | {r['choice']} | {r['bf16_eager_us']:.1f} | {r['int8_eager_us']:.1f} | "
                  f"{r['deq_mm_eager_us']:.1f} |")
        print("host µs per call: bf16 %.1f, int8 cached launch %.1f, int8 through Triton's launcher %.1f" % (
            statistics.median(r["host_us_bf16"] for r in dec), statistics.median(r["host_us_int8"] for r in dec),
            statistics.median(r["host_us_int8_triton_launch"] for r in dec)))
    big = [r for r in rows if r["M"] > K.DECODE_MAX_M]
    if big:
        print("| K->N | M | bf16 | int8 fused | int8 deq+cuBLAS | best vs bf16 | TFLOP/s | eager bf16 | eager int8 | "
              "eager deq+mm (quanto-like) | dx bf16 | dx fused | dx deq+cuBLAS | dx best vs bf16 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in big:
            best, bdx = min(r["train_us"], r["dequant_us"]), min(r["dx_train_us"], r["dx_dequant_us"])
            print(f"| {r['K']}->{r['N']} | {r['M']} | {r['bf16_us']:.1f} | {r['train_us']:.1f} | "
                  f"{r['dequant_us']:.1f} | "
                  f"{r['bf16_us'] / best:.2f}x | {2 * r['M'] * r['N'] * r['K'] / best / 1e6:.0f} | "
                  f"{r['bf16_eager_us']:.1f} | {r['int8_eager_us']:.1f} | {r['deq_mm_eager_us']:.1f} | "
                  f"{r['bf16_dx_us']:.1f} | {r['dx_train_us']:.1f} | {r['dx_dequant_us']:.1f} | "
                  f"{r['bf16_dx_us'] / bdx:.2f}x |")


def tuned_configs():
    out = {}
    for regime, tuner in K._tuned.items():
        for key, cfg in tuner.cache.items():
            out[f"{regime} {key[:5]}"] = str(cfg)
    for key, cfg in K._gemv_tuned.cache.items():
        out[f"gemv {key[:3]}"] = str(cfg)
    out.update({f"decode choice {key[2:5]}": v for key, v in K.CACHE.decode_choice.items()})
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


def gpu_busy_ms(step) -> tuple[float, dict]:
    """Sum of the kernel times of one step (torch.profiler): far below the step's wall time = host-bound; and the
    ten kernels that took longest in total, {name: [ms, calls]} (where an int8 step's extra time goes)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict = {}
    for e in kernels:
        t = by_name.setdefault(e.name[:90], [0.0, 0])
        t[0] += e.device_time_total / 1e3
        t[1] += 1
    top = dict(sorted(by_name.items(), key=lambda kv: -kv[1][0])[:10])
    return sum(e.device_time_total for e in kernels) / 1e3, top


def model_step(int8: bool, steps=8, warmup=3, rank=16, dequant_min_m=None, autocast=False):
    """autocast: bf16 autocast around the loss, as train.py runs it (the LoRA adapters then multiply in bf16)."""
    from hmtiny.lora import inject_lora
    default_min_m = K.DEQUANT_MIN_M
    if dequant_min_m is not None:
        K.DEQUANT_MIN_M = dequant_min_m
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

    def one_step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = model.loss(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, losses = [], []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = one_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    busy_ms, top_kernels = gpu_busy_ms(one_step)
    K.DEQUANT_MIN_M = default_min_m
    out = {"base": "int8" if int8 else "bf16", "autocast": autocast,
           "dequant_min_m": dequant_min_m or K.DEQUANT_MIN_M, "step_ms": 1e3 * statistics.median(times[warmup:]),
           "step_ms_all": [1e3 * t for t in times], "gpu_busy_ms": busy_ms, "top_kernels": top_kernels,
           "tuned": tuned_configs() if int8 else {},
           "peak_GiB": torch.cuda.max_memory_allocated() / 2 ** 30, "weights_GiB": weights_gib,
           "reserved_GiB": torch.cuda.max_memory_reserved() / 2 ** 30, "losses": losses,
           "audio_frames_per_s": 375 / statistics.median(times[warmup:])}
    print(json.dumps(out), flush=True)
    return out


def fresh_pairs(pairs: int, autocast: bool = False) -> list[dict]:
    """bf16, int8, bf16, int8, ...: each LoRA step measurement in a fresh process of this script (as train.py runs),
    so that state one model leaves in a process (allocator, launch caches, autotuning) cannot slow the next."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2 * pairs):
            base = ("bf16", "int8")[i % 2]
            path = Path(tmp) / f"{i}_{base}.json"
            cmd = [sys.executable, __file__, "model", "--only", base, "--json", str(path)]
            cmd += ["--autocast"] if autocast else []
            print(f"[{i // 2 + 1}/{pairs}] {base}: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd)
            if proc.returncode != 0 or not path.exists():
                sys.exit(f"the {base} run of pair {i // 2 + 1} failed (exit code {proc.returncode}): see above")
            runs.append(json.loads(path.read_text()))
    return runs


def print_pairs(runs: list[dict], how: str):
    cast = ", bf16 autocast (as train.py)" if runs and runs[0].get("autocast") else ", no autocast (fp32 adapters)"
    print(f"\n3B LoRA r16 step, 575 rows, grad checkpointing{cast}; bf16 and int8 base in turn, {how}:")
    print("| pair | bf16 ms | bf16 GPU-busy ms | bf16 peak GiB | int8 ms | int8 GPU-busy ms | int8 peak GiB | "
          "int8 / bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    busy = lambda r: f"{r['gpu_busy_ms']:.1f}" if "gpu_busy_ms" in r else "-"
    for i, (b, q) in enumerate(zip(runs[::2], runs[1::2])):
        ratios.append(q["step_ms"] / b["step_ms"])
        print(f"| {i + 1} | {b['step_ms']:.1f} | {busy(b)} | {b['peak_GiB']:.2f} | {q['step_ms']:.1f} | {busy(q)} | "
              f"{q['peak_GiB']:.2f} | {ratios[-1]:.2f}x |")
    print(f"median int8 / bf16 over {len(ratios)} pairs: {statistics.median(ratios):.2f}x")
    return statistics.median(ratios)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["matmul", "model", "ceilings"])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ms", default=None, help="comma-separated M values (default 1,2,16,2048,8192)")
    ap.add_argument("--pairs", type=int, default=0,
                    help="model: instead of the dispatch variants, time bf16 then int8 (default dispatch) this many "
                         "times in turn, so host-load drift shows up in both")
    ap.add_argument("--fresh", type=int, default=0,
                    help="model: as --pairs, but every measurement in a fresh process of this script")
    ap.add_argument("--autocast", action="store_true", help="model: bf16 autocast around the loss, as train.py")
    ap.add_argument("--only", choices=["bf16", "int8"], help=argparse.SUPPRESS)  # one run of --fresh
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)  # where that run writes its result
    args = ap.parse_args()
    if args.what != "model" and (args.pairs or args.fresh or args.only):
        ap.error("--pairs / --fresh belong to the model mode")
    if sum(map(bool, (args.pairs, args.fresh, args.only))) > 1:
        ap.error("choose one of --pairs, --fresh")
    if not torch.cuda.is_available():
        sys.exit("bench_int8.py needs a CUDA device: torch.cuda.is_available() is False here "
                 f"(torch {torch.__version__})")
    if K.triton is None:
        sys.exit("bench_int8.py needs triton (not installed)")
    print(torch.cuda.get_device_name(), torch.__version__, __import__("triton").__version__)
    result = {"device": torch.cuda.get_device_name()}
    if args.what == "ceilings":
        result["ceilings"] = ceilings()
    elif args.what == "matmul":
        ms = [int(x) for x in args.ms.split(",")] if args.ms else MS
        # decode only: also the fused projections of the generation engine (q|k|v, w1|w3)
        shapes = SHAPES + [(3072, 5120), (3072, 16384)] if max(ms) <= K.DECODE_MAX_M else SHAPES
        rows = matmul_table(ms, shapes)
        result.update(rows=rows, configs=tuned_configs())
        print_table(rows)
        bad = [r for r in rows if max(v for key, v in r.items() if key.startswith("err")) > 1e-2]
        print("correctness:", "all within 1e-2 of the fp32 reference" if not bad else f"FAILED {bad}")
    elif args.only:  # one measurement for --fresh, in this (fresh) process
        r = dict(model_step(args.only == "int8", autocast=args.autocast), device=result["device"], pid=os.getpid())
        if args.json:
            Path(args.json).write_text(json.dumps(r))
        return
    elif args.fresh:
        result["model"] = fresh_pairs(args.fresh, args.autocast)
        result["fresh"] = True
        result["median_ratio"] = print_pairs(result["model"], "each in a fresh process")
    elif args.pairs:
        result["model"] = [model_step(int8, autocast=args.autocast)
                           for _ in range(args.pairs) for int8 in (False, True)]
        result["median_ratio"] = print_pairs(result["model"], "all in one process")
    else:
        result["model"] = [model_step(False), model_step(True), model_step(True, dequant_min_m=17),
                           model_step(True, dequant_min_m=1 << 30)]
        b, q = result["model"][:2]
        for r in result["model"][2:]:
            print(f"int8 base, dequant+cuBLAS from M >= {r['dequant_min_m']}: {r['step_ms']:.1f} ms, "
                  f"{r['peak_GiB']:.2f} GiB")
        print(f"\n3B LoRA r16 step, 575 rows (200 prompt + 375 audio), grad checkpointing: "
              f"bf16 base {b['step_ms']:.1f} ms {b['peak_GiB']:.2f} GiB peak | int8 base {q['step_ms']:.1f} ms "
              f"{q['peak_GiB']:.2f} GiB peak ({q['step_ms'] / b['step_ms']:.2f}x time)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"bench_int8_{args.what}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
