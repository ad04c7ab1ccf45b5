"""What is alive on the GPU at the peak of the training step: bench_train.py's step (its model, variant and batch,
through its own build and run_variant) under torch.cuda.memory._record_memory_history. The allocator's trace is
replayed in order to find the moment of most memory in use, and the allocations alive then are listed, grouped by
where they were made: the innermost frames in hmtiny/, kernels/ or bench/, after the torch Python function that
allocated (when the allocation was made inside torch's Python code). JSON in $OUT/memory_peak.json when OUT is set.

    python3 bench/memory_peak.py                          # int8 (captured step), 1 clip with checkpointing
    python3 bench/memory_peak.py --variant captured --shape 4 --top 40
    python3 bench/memory_peak.py --eager                  # int8-eager: the same step without CUDA graphs

Recording starts before run_variant builds the step and covers all --steps steps (the first is its warm-up), which
is the window bench_train's peak covers. In a captured variant the first step runs one eager warm-up step on a side
stream, then captures the graph: the capture allocates from the graphs' private pool and the trace records it like
any step. A replayed graph allocates nothing (its pool was sized at capture), so the later steps add only the eager
part (gradient clipping, AdamW), and the peak falls in the warm-up, the capture or that eager part. --eager runs the
eager step op by op; each step allocates anew (the first also creates AdamW's state).

The trace records requested sizes, before the allocator rounds them up to its blocks, so the replay's peak reads a
little under max_memory_allocated (bench_train's peak figure), which counts whole blocks. A free counts when requested
(free_requested), as max_memory_allocated counts it; replayed with frees counted when completed (free_completed,
later for a block another stream still uses) the trace gives torch.cuda.memory_stats()'s requested_bytes peak, which
is printed beside it as a check. Allocations made before recording (the weights, the LoRA factors) have no trace:
they are one line, "alive before recording". Backward ops run on autograd's C++ thread, without Python frames: their
allocations group as "<no Python frames>" unless --cpp records C++ frames too (slower), which names the autograd node.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_train import GiB, build, parse_shapes, run_variant  # noqa: E402
from bench.results import write_json  # noqa: E402
from hmtiny.config import ModelConfig  # noqa: E402

MiB = 2 ** 20
OURS = ("hmtiny/", "kernels/", "bench/")
# bench_train's variants: int8 base, captured step, fused training kernels
VARIANTS = {"captured": (False, True, True), "captured-unfused": (False, True, False), "eager": (False, False, True),
            "int8": (True, True, True), "int8-eager": (True, False, True)}
EAGER = {"captured": "eager", "captured-unfused": "eager", "int8": "int8-eager"}


def _ours(frame: dict, root: str) -> str | None:
    """The frame as "hmtiny/model.py:123 forward" when its file is one of the repository's (under `root`, relative
    as a script run from it names itself, or the packages installed), else None."""
    path = frame["filename"]
    if path.startswith(root + "/"):
        path = path[len(root) + 1:]
    elif "-packages/" in path:  # site-packages/hmtiny/..., dist-packages/kernels/...
        path = path.split("-packages/")[-1]
    return f"{path}:{frame['line']} {frame['name']}" if path.startswith(OURS) else None


def _short(frame: dict) -> str:
    """A frame outside the repository: its path from site-packages on (torch/...), or a C++ function's name."""
    if frame["filename"].endswith(".py"):
        return f"{frame['filename'].split('-packages/')[-1]}:{frame['name']}"
    return frame["name"].split("(")[0]


def site(frames: list[dict], root: str, depth: int = 3) -> tuple[str, ...]:
    """Where an allocation was made (frames innermost first): the innermost torch Python frame below the first
    repository frame, then up to `depth` repository frames. Without any: C++ frames naming an autograd node and the
    ATen op (recorded with --cpp), else "<no Python frames>"."""
    ours = [(i, s) for i, f in enumerate(frames) if (s := _ours(f, root))]
    if ours:
        below = [_short(f) for f in frames[:ours[0][0]] if f["filename"].endswith(".py")]
        return tuple(below[:1] + [s for _, s in ours[:depth]])
    cpp = [next((_short(f) for f in frames if key in f["name"]), None) for key in ("Backward", "at::native::")]
    named = [s for s in cpp if s] or [_short(f) for f in frames if f["filename"].endswith(".py")][:depth]
    return tuple(named) or ("<no Python frames>",)


def _replay(trace: list[dict], before: int, free: str, stop: int | None = None):
    """Live traced allocations (addr -> entry) and bytes in use after trace[:stop], with the peak and its index."""
    live, total, peak, at = {}, before, before, -1
    for i, e in enumerate(trace[:stop]):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, at = total, i
        elif e["action"] == free:  # an address not in live was allocated before recording
            total -= live.pop(e["addr"], e)["size"]
    return live, total, peak, at


def peak_report(snapshot: dict, device: int = 0, before: int = 0, root: str = str(REPO), depth: int = 3,
                top: int = 25, free: str = "free_requested") -> dict:
    """Replay device `device`'s trace of a torch.cuda.memory._snapshot() from `before` bytes in use (at the start of
    recording), counting frees at `free` (the other free action if the trace has none), and list what is alive at
    the peak, grouped by `site`, largest first (the `top` largest groups)."""
    trace = snapshot["device_traces"][device] if device < len(snapshot["device_traces"]) else []
    if not any(e["action"] == free for e in trace):
        free = {"free_requested": "free_completed", "free_completed": "free_requested"}[free]
    _, _, peak, at = _replay(trace, before, free)
    live, _, _, _ = _replay(trace, before, free, at + 1)
    groups = defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[site(e.get("frames", []), root, depth)]
        g[0] += e["size"]
        g[1] += 1
    traced = sum(b for b, _ in groups.values())
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    last = trace[at] if at >= 0 else None
    return {"events": len(trace), "free_at": free, "peak_bytes": peak, "peak_event": at, "before_bytes": before,
            "before_alive_at_peak_bytes": peak - traced, "traced_alive_bytes": traced, "n_groups": len(groups),
            "peak_alloc": last and {"bytes": last["size"], "frames": list(site(last.get("frames", []), root, depth))},
            "groups": [{"bytes": b, "count": n, "frames": list(k)} for k, (b, n) in ranked[:top]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="int8", choices=list(VARIANTS), help="bench_train.py's variant names")
    ap.add_argument("--shape", default="1c", help="clips per step, c = with checkpointing (bench_train's --shapes)")
    ap.add_argument("--steps", type=int, default=3, help="steps run, all recorded (>= 2: the first is the warm-up)")
    ap.add_argument("--top", type=int, default=25, help="groups listed")
    ap.add_argument("--depth", type=int, default=3, help="repository frames that name a group")
    ap.add_argument("--eager", action="store_true", help="the variant's eager step (int8 -> int8-eager, captured -> "
                                                         "eager): no CUDA graph, every step allocates op by op")
    ap.add_argument("--cpp", action="store_true", help="record C++ frames too: names backward ops (slower)")
    ap.add_argument("--max_entries", type=int, default=2_000_000, help="trace entries kept (a ring buffer)")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps: at least 2 (run_variant's warm-up step and one more)")
    if not torch.cuda.is_available():
        sys.exit("memory_peak.py needs a CUDA GPU: torch.cuda.is_available() is False")
    variant = EAGER.get(args.variant, args.variant) if args.eager else args.variant
    int8, captured, fused = VARIANTS[variant]
    (batch, ckpt), = parse_shapes(args.shape)
    cfg = ModelConfig.official_3b()
    model = build(cfg, int8=int8)
    device = torch.cuda.current_device()
    before = torch.cuda.memory_stats().get("requested_bytes.all.current", torch.cuda.memory_allocated())
    allocated_before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history("all", context="alloc", stacks="all" if args.cpp else "python",
                                             max_entries=args.max_entries)
    name = variant if int8 else f"bf16 {variant}"
    bench = run_variant(model, cfg, name, batch, ckpt, args.steps - 1, 1, captured=captured, fused=fused)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(None)
    stats = torch.cuda.memory_stats()
    r = peak_report(snapshot, device, before, top=args.top, depth=args.depth)
    r["peak_freed_at_completion_bytes"] = peak_report(snapshot, device, before, top=0, free="free_completed")[
        "peak_bytes"]
    r.update(variant=variant, shape=args.shape, steps=args.steps, device=torch.cuda.get_device_name(),
             torch=torch.__version__, allocated_before_bytes=allocated_before, max_allocated_bytes=
             torch.cuda.max_memory_allocated(), requested_peak_bytes=stats.get("requested_bytes.all.peak"),
             bench=bench)
    if r["events"] >= args.max_entries:
        print(f"WARNING: the trace filled its {args.max_entries:,} entries and lost its oldest: raise --max_entries")

    print(f"\n{variant}, shape {args.shape}, {args.steps} steps recorded ({r['events']:,} trace events), "
          f"{r['device']}, torch {r['torch']}")
    print(f"alive before recording: {before / MiB:.1f} MiB ({allocated_before / MiB:.1f} MiB allocated), "
          f"{r['before_alive_at_peak_bytes'] / MiB:.1f} MiB of it still alive at the peak")
    print(f"peak per replay: {r['peak_bytes'] / MiB:.1f} MiB at event {r['peak_event']:,}; torch's "
          f"max_memory_allocated {r['max_allocated_bytes'] / MiB:.1f} MiB = {r['max_allocated_bytes'] / GiB:.3f} GiB "
          f"(whole blocks)")
    print(f"check: replay with frees at completion {r['peak_freed_at_completion_bytes'] / MiB:.1f} MiB, torch's "
          f"requested_bytes peak {(r['requested_peak_bytes'] or 0) / MiB:.1f} MiB (counted from run_variant's reset)")
    if r["peak_alloc"]:
        print(f"reached by {r['peak_alloc']['bytes'] / MiB:.1f} MiB at {' <- '.join(r['peak_alloc']['frames'])}")
    print(f"alive at the peak, by where allocated (innermost frame first; top {len(r['groups'])} of {r['n_groups']} "
          f"groups, {r['traced_alive_bytes'] / MiB:.1f} MiB traced):\n{'MiB':>9} {'count':>6}  where")
    for g in r["groups"]:
        print(f"{g['bytes'] / MiB:9.1f} {g['count']:6d}  {' <- '.join(g['frames'])}")
    write_json("memory_peak.json", r)


if __name__ == "__main__":
    main()
