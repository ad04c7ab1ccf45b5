"""Decode GEMV tiles chosen by the whole frame's time, not by the GEMV's own.

    python bench/tune_in_frame.py [--int8] [--frames 200] [--per-shape 8]

kernels.gemv picks each shape's tile by timing the GEMV alone, back to back with itself. In a frame each GEMV sits
between other kernels (the norm that adds its K slices, attention, the next GEMV), so the tile that is fastest
alone need not be the one that makes the frame fastest: more K slices cost the consumer more partial sums, and
how a GEMV starts and ends matters more between short kernels. This builds the full-size engine (random weights,
graph mode, as bench_generate.py), then for each decode GEMV shape in turn tries a few tiles on every layer of
that shape and keeps the one with the fastest frame step (coordinate descent, one shape at a time). Prints each
trial; writes $OUT/tune_in_frame.json with the winners in kernels/gemv_tiles.json's format ("picks": copy them
there to ship them).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_generate import synthetic_prompt  # noqa: E402
from hmtiny.config import ModelConfig  # noqa: E402
from hmtiny.engine import Engine  # noqa: E402
from hmtiny.model import build_random  # noqa: E402
from kernels import gemv  # noqa: E402


def groups(eng):
    """The planned decode GEMVs grouped by their tile-pick key (shape, dtypes, kind): one tile serves a group."""
    out = {}
    for st in (eng.backbone, eng.decoder):
        for layer in st.layers:
            for f in (layer.qkv, layer.wo, layer.w13, layer.w2):
                if f.tile is None:
                    continue
                key = gemv.pick_key(f.gemv_weight()[0], eng.dtype, f.tile_split, f.tile_glu)
                out.setdefault(key, []).append(f)
    return out


def trials(key, current, limit):
    """Tiles to try for a group: the current one first, then its K-slice variants, then other row blocks / K steps
    at the current K slices, up to `limit` in all."""
    n, k, _, _, split, glu, _ = key
    fits = [c for c in gemv._candidates(k, split) if gemv._fits(c, n, k, glu)]
    same_tile = [c for c in fits if c[:2] == current[:2] and c[3] == current[3] and c != current]
    same_split = [c for c in fits if c[2] == current[2] and c != current and c not in same_tile]
    picked = [current] + same_tile + same_split
    return picked[:limit]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--per-shape", type=int, default=8, help="tiles tried per shape, the current one included")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    model = build_random(ModelConfig.official_3b(), device="cuda", dtype=torch.bfloat16)
    if args.int8:
        from hmtiny.quant import quantize_model
        quantize_model(model)
        torch.cuda.empty_cache()
    prompt = synthetic_prompt(model.cfg)
    eng = Engine(model, "graph", share=True)

    def frame_us():
        eng._graph = eng._first_graph = None  # capture again with the tiles as they are now
        for seed in (0, 1):
            eng.generate([prompt], args.frames, generator=torch.Generator("cuda").manual_seed(seed),
                         eos_check_every=64, stop_on_eos=False)
        return 1e3 * eng.last_timing["ms_per_frame_step"]

    base = frame_us()
    res = {"device": torch.cuda.get_device_name(), "int8": args.int8, "baseline_us": base, "groups": []}
    print(f"baseline {base:.1f} us/frame", flush=True)
    started = time.perf_counter()
    winners = {}
    for key, fused in groups(eng).items():
        current = fused[0].tile
        rows = []
        for tile in trials(key, current, args.per_shape):
            for f in fused:
                f.tile = tile
            try:
                t = frame_us()
            except Exception as e:  # a tile this card cannot run
                print(f"  {key[:2]} {tile}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rows.append((t, tile))
            print(f"  {key[:2]} split={key[4]} glu={key[5]} x{len(fused)} {tile}: {t:.1f} us/frame", flush=True)
        if not rows:  # every trial failed: keep the tile it had
            print(f"  {key[:2]}: no tile ran, keeping {current}", flush=True)
            continue
        best = winners[key] = min(rows)[1]
        for f in fused:
            f.tile = best
        res["groups"].append({"N": key[0], "K": key[1], "dtype": str(key[2]), "split": key[4], "glu": key[5],
                              "layers": len(fused), "was": list(current), "best": list(best),
                              "trials": [[list(c), t] for t, c in rows]})
        (out / "tune_in_frame.json").write_text(json.dumps(res, indent=1))
    res["tuned_us"] = frame_us()
    res["seconds"] = time.perf_counter() - started
    # the winners under the names kernels/gemv_tiles.json uses (gemv._names holds this process's keys)
    res["picks"] = {gemv._names[key]: list(tile) for key, tile in winners.items() if key in gemv._names}
    print(f"baseline {base:.1f} -> tuned {res['tuned_us']:.1f} us/frame", flush=True)
    for g in res["groups"]:
        print(f"  N={g['N']} K={g['K']} {g['dtype']} split={g['split']} glu={g['glu']}: {g['was']} -> {g['best']}")
    (out / "tune_in_frame.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
