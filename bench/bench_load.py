"""Loading HeartMuLa: the host read (safetensors per tensor, cast on the host, pageable copy) against the staged read
(hmtiny.stream_load: threads, pinned buffers, copies on a side stream, casts on the GPU).

    python3 bench/bench_load.py --ckpt /tmp/hmtiny_fullsize/ckpt     # CUDA; the ckpt/ of check_fullsize.py
    python3 bench/bench_load.py --tiny                                # the built-in tiny model on the CPU (smoke)

The weight files are read once first (page-cache warm-up, timed apart: later runs read as a second sample.py run
does). Then each repeat runs each path in a fresh process; a process reports torch's import and CUDA's start apart
from load_heartmula's seconds (synchronised). --check adds a process that loads both ways (staged first: its
seconds are the row's) and compares every tensor bit for bit. On CUDA a run also reports torch's pinned-memory
allocator: its cudaHostAlloc time (the staged read's buffers) and the pinned bytes it keeps cached after the load.
Prints a markdown table and the JSON of every run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(a) -> dict:
    """One load in this process (the parent runs this through --child)."""
    t = time.perf_counter()
    import torch
    sys.path.insert(0, str(REPO))
    from hmtiny import stream_load
    from hmtiny.checkpoint import load_heartmula
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.empty(1, device=device)  # CUDA's context: not part of loading
    r = {"path": a.child, "init_s": round(time.perf_counter() - t, 2)}
    stream_load.THREADS, stream_load.BUFFERS = a.threads, a.buffers
    stream_load.CHUNK_BYTES = a.buffer_mb * 2**20
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]

    def load(staged: bool):
        t = time.perf_counter()
        model = load_heartmula(a.ckpt, dtype=dtype, device=device, quantize=a.int8, staged=staged)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return model, time.perf_counter() - t

    model, seconds = load(a.child in ("staged", "check"))
    r["load_s"] = round(seconds, 3)
    if a.child == "check":
        other, _ = load(False)
        mine, theirs = model.state_dict(), other.state_dict()
        r["equal"] = mine.keys() == theirs.keys() and all(
            mine[k].dtype == theirs[k].dtype and torch.equal(mine[k].reshape(-1).view(torch.uint8),
                                                             theirs[k].reshape(-1).view(torch.uint8)) for k in mine)
    if device.type == "cuda":
        r["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        r["reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        r.update(pinned_stats())
    return r


def pinned_stats() -> dict:
    """torch's pinned-memory allocator after the load: how long its cudaHostAlloc calls took (the staged read's
    buffers, on its critical path) and how many bytes it still keeps cached (freed buffers stay pinned until the
    process ends). Empty where this torch has no host_memory_stats."""
    import torch
    try:
        stats = torch.cuda.memory.host_memory_stats()
        return {"pin_ms": round(stats.get("host_alloc_time.total", 0) / 1e3, 1),
                "pin_blocks": stats.get("num_host_alloc", 0),
                "pinned_cached_mb": round(stats.get("allocated_bytes.current", 0) / 2**20)}
    except Exception:  # an older torch, or its stats named otherwise
        return {}


def warm_page_cache(files: list[Path]) -> float:
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 * 2**20):
                pass
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ckpt", help="model folder or heartlib ckpt/ folder (e.g. WORK/ckpt of bench_sample.py)")
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny model on the CPU")
    ap.add_argument("--device", help="default cuda (--tiny: cpu)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--int8", action="store_true", help="int8 stacks, quantised as they load")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--buffers", type=int, default=3)
    ap.add_argument("--buffer-mb", type=int, default=128)
    ap.add_argument("--check", action="store_true", help="also compare both paths' tensors in one process")
    ap.add_argument("--child", choices=["host", "staged", "check"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.device = a.device or ("cpu" if a.tiny else "cuda")
    if a.tiny:
        a.ckpt = str(REPO / "hmtiny" / "assets" / "tiny" / "model")
    if not a.ckpt:
        ap.error("give --ckpt (a full-size folder: bench/bench_sample.py builds WORK/ckpt) or --tiny")
    if a.child:
        print(json.dumps(child(a)))
        return 0

    sys.path.insert(0, str(REPO))
    from hmtiny.checkpoint import find_model_folder, resolve_folder, weight_files
    files = weight_files(find_model_folder(resolve_folder(a.ckpt)))
    gb = sum(f.stat().st_size for f in files) / 1e9
    info = {"ckpt": a.ckpt, "files": len(files), "gb": round(gb, 2), "device": a.device, "dtype": a.dtype,
            "int8": a.int8, "threads": a.threads, "buffers": a.buffers, "buffer_mb": a.buffer_mb,
            "page_cache_warm_up_s": round(warm_page_cache(files), 2)}
    print(json.dumps(info), flush=True)
    runs = [p for _ in range(a.repeats) for p in ("host", "staged")] + (["check"] if a.check else [])
    results = []
    for path in runs:
        argv = [sys.executable, __file__, "--child", path, "--ckpt", a.ckpt, "--device", a.device, "--dtype", a.dtype,
                "--threads", str(a.threads), "--buffers", str(a.buffers), "--buffer-mb", str(a.buffer_mb)]
        proc = subprocess.run(argv + (["--int8"] if a.int8 else []), capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            print(f"--- {path} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["gb_per_s"] = round(gb / r["load_s"], 3)
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\n| path | torch + CUDA start s | load s | GB/s | peak GiB alloc / reserved | pinned: alloc ms, blocks, "
          "MB kept | equal |\n|---|---|---|---|---|---|---|")
    for r in results:
        pinned = f"{r['pin_ms']}, {r['pin_blocks']}, {r['pinned_cached_mb']}" if "pin_ms" in r else "-"
        print(f"| {r['path']} | {r['init_s']} | {r['load_s']:.2f} | {r['gb_per_s']} | {r.get('peak_gib', '-')} / "
              f"{r.get('reserved_gib', '-')} | {pinned} | {r.get('equal', '-')} |")
    print(json.dumps({**info, "runs": results}))
    return 0 if all(r.get("equal", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
