"""Generation speed at full 3B size (random weights, built on the GPU), CFG on, a 200-row prompt, 30 s of audio.

    python bench/bench_generate.py [--frames 375] [--modes plain,eager,graph] [--int8]

Rows: `plain` is hmtiny/generate.py's loop (the model's own modules and static KV cache, no fused weights, no
graph); the others are hmtiny.engine's modes, built as sample.py builds them. frames/s is end to end (prefill +
frames + copy back) on the second call; the first call's time (tile timing, graph capture) is reported apart, and
the engines' second call is split (CUDA events) into
"prefill ms" (prompt prefill + first frame) and "loop ms" (per later frame step). Random weights could emit EOS
at any frame: EOS is masked out here so every run makes all its frames. JSON goes to $OUT/bench_generate.json
when OUT is set.
"""
import argparse
import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmtiny.codec.config import FRAME_RATE  # noqa: E402
from hmtiny.config import ModelConfig  # noqa: E402
from hmtiny import generate as plain  # noqa: E402
from hmtiny.engine import Engine  # noqa: E402
from hmtiny.model import build_random  # noqa: E402
from hmtiny.text import prompt_rows  # noqa: E402


def synthetic_prompt(cfg: ModelConfig, rows: int = 200, tag_rows: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, cfg.text_vocab_size - 1000, (rows - 1,), generator=g).tolist()
    return prompt_rows(ids[:tag_rows], ids[tag_rows:])


def copy_bandwidth(nbytes=2 << 30):
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 10
    del a, b
    return 2 * nbytes / dt  # read + write


def bytes_per_frame(model) -> int:
    """Weights a frame must read once: backbone layers, 7 decoder passes, codebook-0 head, 7 audio-head slices,
    projection 8 times (embedding rows are negligible)."""
    size = lambda mods: sum(t.numel() * t.element_size() for m in mods for t in list(m.parameters()) + list(m.buffers())
                            if t.dim() == 2)
    backbone = size(model.backbone.layers)
    decoder = size(model.decoder.layers)
    head = model.codebook0_head.weight
    heads = head.numel() * head.element_size() * 8
    proj = model.projection.weight.numel() * model.projection.weight.element_size() * 8
    return backbone + 7 * decoder + heads + proj


def gemv_table(res, dev="cuda"):
    """Each decode shape (2 rows, CFG): cuBLAS F.linear vs kernels.gemv's tuned tile, timed inside a CUDA graph
    over weights that miss L2 (as in a frame), and the kernel's relative error against float64 on random data."""
    from kernels import gemv
    shapes = [("backbone qkv", 5120, 3072), ("o_proj/projection", 3072, 3072), ("w1|w3", 16384, 3072),
              ("w2", 3072, 8192), ("decoder qkv", 6144, 3072), ("head (padded)", 8256, 3072)]
    rows = []
    for name, n, k in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        x = torch.randn(2, k, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ w.double().T
        t0 = time.perf_counter()
        y = gemv.linear(x, w)  # tunes this shape
        tune_s = time.perf_counter() - t0
        err = float((y.double() - ref).norm() / ref.norm())
        t_cublas = gemv.time_in_graph(lambda wi: torch.nn.functional.linear(x, wi), w) * 1e6
        t_gemv = gemv.time_in_graph(lambda wi: gemv.linear(x, wi), w) * 1e6
        nbytes = n * k * 2
        rows.append({"shape": name, "N": n, "K": k, "cublas_us": t_cublas, "gemv_us": t_gemv,
                     "cublas_TBps": nbytes / t_cublas / 1e6, "gemv_TBps": nbytes / t_gemv / 1e6, "rel_err": err,
                     "tile": list(gemv._pick(x, w) or []), "tune_s": tune_s})
        print(json.dumps(rows[-1]), flush=True)
        del w
    res["gemv"] = rows


def tile_table(res, dev="cuda"):
    """The GEMV tile each decode matmul shape got in the engines (kernels.gemv._best, keyed by N, K, weight dtype,
    input dtype, partial = K slices summed by the consumer, glu = gate/up ending in SwiGLU's product, PDL), timed
    again inside a CUDA graph over weights that miss L2, with the same PDL setting."""
    import contextlib
    from kernels import gemv, switches
    rows = []
    for key, tile in list(gemv._best.items()):
        n, k, wdtype, xdtype, partial, glu, with_pdl = key
        if tile is None:
            continue
        int8 = wdtype == torch.int8
        w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) if int8 else \
            torch.randn(n, k, device=dev, dtype=wdtype)
        scale = torch.rand(n, device=dev) / 100 if int8 else None
        x = torch.randn(2, k, device=dev, dtype=xdtype)
        with contextlib.nullcontext() if with_pdl else switches.overridden(HMTINY_PDL="0"):
            if partial:
                t = gemv.time_in_graph(lambda wi: gemv.partials_op(x, wi, scale, *tile), w) * 1e6
            else:  # one whole output: K slices added inside the kernel
                t = gemv.time_in_graph(lambda wi: gemv.tiled_op(x, wi, scale, *tile, glu), w) * 1e6
        wb = w.to(torch.bfloat16) if int8 else w
        t_cublas = gemv.time_in_graph(lambda wi: torch.nn.functional.linear(x, wi), wb) * 1e6
        rows.append({"N": n, "K": k, "dtype": str(wdtype), "partial": partial, "glu": glu, "pdl": with_pdl,
                     "tile": list(tile), "us": t, "TBps": n * k * w.element_size() / t / 1e6,
                     "cublas_bf16_us": t_cublas})
        print(json.dumps(rows[-1]), flush=True)
        del w
    res["tiles"] = rows


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main():
    # `timeout` sends SIGTERM: print every thread's stack first, so a run cut short shows where it was
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=375)
    ap.add_argument("--plain-frames", type=int, default=40)
    ap.add_argument("--modes", default="plain,eager,graph")
    ap.add_argument("--int8", action="store_true", help="then quantise the stacks and time the int8 engine too")
    ap.add_argument("--int8-modes", default="graph")
    ap.add_argument("--gemv", action="store_true", help="first time each decode matmul shape: cuBLAS vs kernels.gemv")
    ap.add_argument("--prefetch-mb", default="",
                    help="comma list: each graph row again with HMTINY_L2_PREFETCH_MB set to each (0 = no prefetch)")
    ap.add_argument("--no-tiles", action="store_true", help="skip the per-shape tile table after the loops")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--topk", type=int, default=50)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    dev = "cuda"
    cfg = ModelConfig.official_3b()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "frames": args.frames,
           "cfg": args.cfg, "topk": args.topk, "rows": []}

    def save():
        (out_dir / "bench_generate.json").write_text(json.dumps(res, indent=2))

    res["copy_TBps"] = copy_bandwidth() / 1e12
    if args.gemv:
        try:
            gemv_table(res)
        except Exception as e:
            res["gemv_error"] = f"{type(e).__name__}: {e}"[:2000]
            print("gemv table FAILED", res["gemv_error"], flush=True)
        save()
    model = build_random(cfg, device=dev, dtype=torch.bfloat16)
    prompt = synthetic_prompt(cfg)
    res["prompt_rows"] = int(prompt[0].shape[0])

    def run_engine(label, mode, frames):
        if mode == "graph" and args.prefetch_mb:  # one row per L2 prefetch cap (kernels/prefetch.py)
            from kernels import switches
            for mb in args.prefetch_mb.split(","):
                with switches.overridden(HMTINY_L2_PREFETCH_MB=mb):
                    last = run_one(f"{label} pf={mb}MB", mode, frames)
            return last
        return run_one(label, mode, frames)

    def run_one(label, mode, frames):
        eng = Engine(model, mode, share=True)  # as sample.py runs it: no second copy of the fused weights
        call = lambda seed: eng.generate([prompt], frames, cfg_scale=args.cfg, topk=args.topk,
                                         generator=torch.Generator(dev).manual_seed(seed), eos_check_every=64,
                                         stop_on_eos=False)  # random weights: never stop early
        torch.cuda.reset_peak_memory_stats()
        first, _ = timed(lambda: call(0))
        t, frames_out = timed(lambda: call(1))
        n = frames_out[0].shape[0]
        row = {"label": label, "mode": mode, "frames": n, "first_call_s": first, "s": t, "frames_per_s": n / t,
               "ms_per_frame": 1e3 * t / n, "realtime_x": n / t / FRAME_RATE,
               "peak_GiB": torch.cuda.max_memory_allocated() / 2**30, **(eng.last_timing or {})}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
        return frames_out[0]

    res["bytes_per_frame_GB"] = bytes_per_frame(model) / 1e9
    # the copy's read+write traffic is what the memory moves per second; a frame only reads
    res["floor_ms"] = 1e3 * bytes_per_frame(model) / (res["copy_TBps"] * 1e12)
    print(f"weights read per frame {res['bytes_per_frame_GB']:.2f} GB; copy bandwidth {res['copy_TBps']:.2f} TB/s "
          f"(read+write) -> floor ~{res['floor_ms']:.2f} ms/frame", flush=True)
    save()

    modes = args.modes.split(",")
    if "plain" in modes:
        n = args.plain_frames
        call = lambda frames, seed: plain.generate(model, [prompt], frames, args.cfg, args.topk, 1.0,
                                                   torch.Generator(dev).manual_seed(seed), stop_on_eos=False)[0]
        call(4, 0)  # warm-up
        t, fr = timed(lambda: call(n, 1))
        row = {"label": "plain loop (hmtiny/generate.py)", "mode": "plain", "frames": fr.shape[0],
               "s": t, "frames_per_s": fr.shape[0] / t, "ms_per_frame": 1e3 * t / fr.shape[0],
               "realtime_x": fr.shape[0] / t / FRAME_RATE}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    sampled = {}
    for mode in [m for m in modes if m != "plain"]:
        frames = args.frames if mode != "eager" else min(args.frames, 48)
        try:
            sampled[mode] = run_engine(f"engine {mode} bf16", mode, frames)
        except Exception as e:  # keep the other rows
            import traceback
            res["rows"].append({"label": f"engine {mode} bf16", "error": f"{type(e).__name__}: {e}"[:2000],
                                "traceback": traceback.format_exc()[-4000:]})
            print("FAILED", mode, e, flush=True)
            save()
    if "eager" in sampled:
        # same seed, same frames? bf16 rounding differs between eager and the graph's kernels, so a near-tie
        # can flip one draw and the songs diverge from there: report the length of the common prefix
        ref = sampled["eager"]
        res["same_seed_common_prefix_vs_eager"] = {}
        for m, f in sampled.items():
            n = min(len(f), len(ref))
            diff = (f[:n] != ref[:n]).any(-1).nonzero()
            res["same_seed_common_prefix_vs_eager"][m] = int(diff[0]) if len(diff) else n

    if args.int8:
        try:
            from hmtiny.quant import quantize_model
            quantize_model(model)
            torch.cuda.empty_cache()
            res["bytes_per_frame_GB_int8"] = bytes_per_frame(model) / 1e9
            for mode in args.int8_modes.split(","):
                try:
                    run_engine(f"engine {mode} int8", mode, args.frames if mode != "eager" else 96)
                except Exception as e:
                    import traceback
                    res["rows"].append({"label": f"engine {mode} int8", "error": f"{type(e).__name__}: {e}"[:2000],
                                        "traceback": traceback.format_exc()[-4000:]})
                    print("FAILED int8", mode, e, traceback.format_exc()[-1500:], flush=True)
        except Exception as e:
            res["int8_error"] = f"{type(e).__name__}: {e}"[:2000]
        save()
    if not args.no_tiles and any(r.get("mode") == "graph" and "error" not in r for r in res["rows"]):
        tile_table(res)  # every shape the graph engines planned, bf16 and (with --int8) int8
        save()
        from kernels import gemv  # this card's picks (bf16 and int8), in the format of gemv.SHIPPED
        (out_dir / "gemv_tiles.json").write_text(json.dumps(gemv.export_picks(), indent=0, sort_keys=True))

    print(f"\n{res['device']}, torch {res['torch']}, prompt {res['prompt_rows']} rows, cfg {args.cfg}, "
          f"top-k {args.topk}; floor ~{res['floor_ms']:.2f} ms/frame")
    print(f"{'what':44s} {'frames':>6s} {'frames/s':>9s} {'ms/frame':>9s} {'x real':>7s} {'1st call s':>10s} "
          f"{'GiB':>6s} {'prefill ms':>10s} {'loop ms':>8s}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['label']:44s} ERROR {r['error'][:200]}")
            continue
        nan = float("nan")
        print(f"{r['label']:44s} {r['frames']:6d} {r['frames_per_s']:9.1f} {r['ms_per_frame']:9.2f} "
              f"{r['realtime_x']:7.1f} {r.get('first_call_s', nan):10.1f} {r.get('peak_GiB', nan):6.1f} "
              f"{r.get('prefill_and_first_frame_ms', nan):10.1f} {r.get('ms_per_frame_step', nan):8.3f}")
    if "gemv" in res:
        print(f"\n{'matmul (2 rows)':16s} {'N':>6s} {'K':>5s} {'cuBLAS us':>9s} {'TB/s':>5s} {'gemv us':>8s} "
              f"{'TB/s':>5s} {'rel err':>8s} tile")
        for g in res["gemv"]:
            print(f"{g['shape']:16s} {g['N']:6d} {g['K']:5d} {g['cublas_us']:9.1f} {g['cublas_TBps']:5.2f} "
                  f"{g['gemv_us']:8.1f} {g['gemv_TBps']:5.2f} {g['rel_err']:8.1e} {g['tile']}")
    if "same_seed_common_prefix_vs_eager" in res:
        print("same seed: frames equal to the eager engine's before the first difference:",
              res["same_seed_common_prefix_vs_eager"])
    save()


if __name__ == "__main__":
    main()
