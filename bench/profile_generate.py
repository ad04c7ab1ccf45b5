"""Where a generated frame's time goes: per-kernel GPU time of one frame step at full 3B size.

    python bench/profile_generate.py [--frames 375] [--steps 20] [--int8]

The engine's graph mode: one short request (200-row prompt, CFG on) to build and capture the step, then
torch.profiler over `--steps` replays of the captured CUDA graph (CUPTI reports the kernels inside a graph), and
over the same number of un-captured calls of the step (what the graph holds, launched one by one); before that,
the replay's wall time with the cache at its start, middle and end (attention grows with the cache). Prints the
kernels grouped by name: calls per frame, GPU µs per frame, share of the frame; and the graph replay's wall time
per frame next to the sum of its kernels' times (the difference is the gaps between kernels). `--int8` quantises
the stacks first (hmtiny.quant, as `sample.py --int8`).
JSON to $OUT/profile_generate.json (profile_generate_int8.json) when OUT is set.
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_generate import synthetic_prompt  # noqa: E402
from hmtiny.config import ModelConfig  # noqa: E402
from hmtiny.engine import Engine  # noqa: E402
from hmtiny.model import build_random  # noqa: E402


def kernel_table(prof, steps):
    rows = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:90]
            rows[name][0] += 1
            rows[name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(v[1] for v in rows.values())
    table = sorted(({"kernel": k, "calls_per_frame": v[0] / steps, "us_per_frame": v[1] / steps}
                    for k, v in rows.items()), key=lambda r: -r["us_per_frame"])
    return table, total / steps


def critical_path(prof, steps):
    """Inside a graph of kernels chained with PDL, kernels overlap, so their own times add up to more than the
    frame. What each kernel costs the frame is how much later than its predecessor it ends: sort the kernels by
    end time and charge kernel i with end_i - end_(i-1). These increments add up to the replays' GPU time. Grouped
    by name: calls and µs per frame, and µs per call."""
    spans = sorted((e.time_range.end, e.time_range.start, e.name[:90]) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    rows = defaultdict(lambda: [0, 0.0])
    sequence = []  # (name, µs added, µs it ran) in order: a frame's pattern (norm, q/k/v, attention, ...)
    for (end0, _, _), (end, start, name) in zip(spans, spans[1:]):
        rows[name][0] += 1
        rows[name][1] += end - end0  # a gap before a kernel's start is charged to it
        sequence.append((name[:40], round(end - end0, 2), round(end - start, 2)))
    total = sum(v[1] for v in rows.values())
    table = sorted(({"kernel": k, "calls_per_frame": v[0] / steps, "us_per_frame": v[1] / steps,
                     "us_per_call": v[1] / max(v[0], 1)} for k, v in rows.items()), key=lambda r: -r["us_per_frame"])
    return table, total / steps, sequence[len(sequence) // steps: len(sequence) // steps + 60]


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=375)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--int8", action="store_true", help="int8 weights (hmtiny.quant.quantize_model) first")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "int8": args.int8}
    model = build_random(ModelConfig.official_3b(), device="cuda", dtype=torch.bfloat16)
    if args.int8:
        from hmtiny.quant import quantize_model
        quantize_model(model)
        torch.cuda.empty_cache()
    prompt = synthetic_prompt(model.cfg)
    for mode in ["graph"]:
        eng = Engine(model, mode)
        eng.generate([prompt], args.frames, generator=torch.Generator("cuda").manual_seed(0), stop_on_eos=False)
        P = int(prompt[0].shape[0])

        def rewind():  # the request is over: put the frame counters back so replays stay inside the buffers
            eng.state["idx"].zero_()
            eng.state["slot"].fill_(P + 1)

        def replay_us(at):  # wall µs per replay with the cache holding the prompt + `at` frames
            eng.state["idx"].fill_(at + 1)
            eng.state["slot"].fill_(P + 1 + at)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                eng._graph.replay()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / args.steps * 1e6

        at_frames = [0, (args.frames - args.steps) // 2, args.frames - args.steps - 1]
        by_length = {a: replay_us(a) for a in at_frames}
        print(f"{mode}: graph replay us/frame by frames already in the cache: "
              + ", ".join(f"{a}: {t:.0f}" for a, t in by_length.items()), flush=True)
        wall = by_length[0]
        rewind()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            for _ in range(args.steps):
                eng._graph.replay()
            torch.cuda.synchronize()
        table_g, sum_g = kernel_table(p, args.steps)
        path, path_sum, sequence = critical_path(p, args.steps)
        print(f"\n== {mode}: what each kernel adds to the frame (end after its predecessor's end), "
              f"{path_sum:.0f} us/frame", flush=True)
        for r in path[:24]:
            print(f"{r['us_per_frame']:8.1f} us {r['calls_per_frame']:6.1f}x {r['us_per_call']:6.2f} us/call  "
                  f"{r['kernel']}", flush=True)
        print("the second frame's first kernels: (name, µs added, µs running)")
        for item in sequence:
            print("   ", item)
        rewind()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            for _ in range(args.steps):
                eng._step()
            torch.cuda.synchronize()
        table_e, sum_e = kernel_table(p, args.steps)
        res[mode] = {"graph_wall_us_per_frame": wall, "graph_wall_us_by_cached_frames": by_length,
                     "graph_kernel_sum_us": sum_g, "graph_kernels": table_g,
                     "graph_critical_path_us": path_sum, "graph_critical_path": path,
                     "graph_second_frame_start": sequence,
                     "ungraphed_kernel_sum_us": sum_e, "ungraphed_kernels": table_e,
                     "kernels_per_frame": sum(r["calls_per_frame"] for r in table_e)}
        print(f"\n== {mode}: graph replay {wall:.0f} us/frame wall; kernels inside {sum_g:.0f} us "
              f"({len(table_g)} names); ungraphed kernels {sum_e:.0f} us, "
              f"{res[mode]['kernels_per_frame']:.0f} launches/frame", flush=True)
        tab = table_g if table_g else table_e
        for r in tab[:40]:
            print(f"{r['us_per_frame']:8.1f} us {r['calls_per_frame']:6.1f}x  {r['kernel']}")
        (out / f"profile_generate{'_int8' if args.int8 else ''}.json").write_text(json.dumps(res, indent=1))
        eng = None  # its graphs and cache freed before the next mode's
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
