"""Fused decode attention (kernels/decode_attention.py) vs the torch path of FastLayer.forward, on CUDA.

    python3 bench/bench_decode_attention.py            # the table (~1 min on an H100)
    python3 bench/bench_decode_attention.py --sweep    # tile settings only (~1 min)

Shapes: the backbone's (B=2 CFG rows, S=1, H=24, KV=8, hd=128, L=584 and 3000, slot near the end, one row left-
padded) and the depth decoder's (B=2, S=1 and 2, H=8, KV=4, hd=384, L=8). Paths, each timed as 50 calls captured
in one CUDA graph (every call on its own copy of the inputs and caches, so the backbone's caches come from device
memory as in a real frame), replayed, divided by 50 (median of 5 replays):
  torch          RoPE + 2 index_copy_ + SDPA with a boolean mask over the whole cache, exactly as FastLayer does
                 (cos/sin and the mask are built outside, once per stack as FastStack does: not timed)
  torch+compile  the same under torch.compile(fullgraph=True)
  triton         decode_attention (the custom op): RoPE, cache write and attention in one launch
  triton+compile decode_attention inside torch.compile (checks that the compiled graph adds no copy of the caches)
Also the max relative error of triton vs torch and whether the written cache rows are bit-equal.

--sweep times the kernel's settings per shape (chunk, warps, head split) and prints lines for
kernels/decode_attention.py's TABLE. JSON to
$OUT/bench_decode_attention.json (--sweep: bench_decode_attention_sweep.json) when OUT is set.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_json  # noqa: E402
from kernels import decode_attention as da  # noqa: E402
from kernels.timing import graph_time  # noqa: E402

CALLS = 50
CASES = [  # name, B, S, H, KV, hd, L, slots[0], start
    ("backbone L=584", 2, 1, 24, 8, 128, 584, 580, (0, 37)),
    ("backbone L=3000", 2, 1, 24, 8, 128, 3000, 2995, (0, 37)),
    ("decoder S=1", 2, 1, 8, 4, 384, 8, 5, (0, 0)),
    ("decoder S=2", 2, 2, 8, 4, 384, 8, 0, (0, 0)),
]


def make_inputs(B, S, H, KV, hd, L, slot0, start, gen):
    """One call's arguments (bf16, random caches) plus the torch path's precomputed cos/sin and mask."""
    dev = "cuda"
    angles = torch.randn(L + 8, hd // 2, generator=gen) * 3
    rope = torch.stack([angles.cos(), angles.sin()], -1).to(dev)
    start_t = torch.tensor(start, device=dev)
    slots = torch.arange(slot0, slot0 + S, device=dev)
    pos = (slots[None] - start_t[:, None]).clamp(min=0)  # each song's own position, as the engine computes it
    a = dict(qkv=torch.randn(B, S, (H + 2 * KV) * hd, generator=gen).to(dev, torch.bfloat16),
             k_cache=torch.randn(B, KV, L, hd, generator=gen).to(dev, torch.bfloat16),
             v_cache=torch.randn(B, KV, L, hd, generator=gen).to(dev, torch.bfloat16),
             rope=rope, pos=pos, slots=slots, start=start_t, n_heads=H, n_kv=KV)
    t = rope[pos]
    cols = torch.arange(L, device=dev)
    mask = (cols >= start_t[:, None, None]) & (cols <= slots[None, :, None])  # [B, S, L]
    G = H // KV
    mask = mask[:, None, None].expand(B, 1, G, S, L).reshape(B, 1, G * S, L)
    extra = dict(cos=t[..., 0].unsqueeze(2), sin=t[..., 1].unsqueeze(2), mask=mask)
    return a, extra


def torch_path(qkv, k_cache, v_cache, cos, sin, slots, mask, H, KV):
    """FastLayer.forward's attention part, operation for operation."""
    b, s, _ = qkv.shape
    hd = qkv.shape[-1] // (H + 2 * KV)
    qk = qkv[..., : (H + KV) * hd].float().unflatten(-1, (H + KV, hd // 2, 2))
    x0, x1 = qk[..., 0], qk[..., 1]
    qk = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-3).to(qkv.dtype)
    q, k = qk.split([H * hd, KV * hd], -1)
    v = qkv[..., (H + KV) * hd:]
    k_cache.index_copy_(2, slots, k.view(b, s, KV, hd).transpose(1, 2))
    v_cache.index_copy_(2, slots, v.reshape(b, s, KV, hd).transpose(1, 2))
    G = H // KV
    q = q.view(b, s, KV, G, hd).permute(0, 2, 3, 1, 4).reshape(b, KV, G * s, hd)
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
    return y.view(b, KV, G, s, hd).permute(0, 3, 1, 2, 4).reshape(b, s, H * hd)


def time_graph(fn, n_inputs, calls=CALLS) -> float:
    """µs per call: `calls` calls of fn(i) (i cycling over the input copies) captured in one CUDA graph."""
    return graph_time(lambda i: fn(i % n_inputs), calls) * 1e6


def try_time(fn, n_inputs, calls=CALLS):
    try:
        return time_graph(fn, n_inputs, calls)
    except Exception as exc:  # a setting this card or Triton cannot run: report it, keep going
        torch.cuda.synchronize()
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_case(name, B, S, H, KV, hd, L, slot0, start, with_compile=True):
    gen = torch.Generator().manual_seed(0)
    sets = [make_inputs(B, S, H, KV, hd, L, slot0, start, gen) for _ in range(CALLS)]
    assert da.usable(**sets[0][0]), "the kernel does not take this shape"

    # correctness on fresh copies of the first set's caches
    a, e = sets[0]
    ka, va, kt, vt = (c.clone() for c in (a["k_cache"], a["v_cache"], a["k_cache"], a["v_cache"]))
    y_k = da.decode_attention(**dict(a, k_cache=ka, v_cache=va))
    y_t = torch_path(a["qkv"], kt, vt, e["cos"], e["sin"], a["slots"], e["mask"], H, KV)
    row = dict(case=name, B=B, S=S, H=H, KV=KV, hd=hd, L=L, slot=slot0,
               config=da.config(B, KV, L, hd, H // KV, S)._asdict(),
               rel_err=rel_err(y_k, y_t), cache_equal=bool(torch.equal(ka, kt) and torch.equal(va, vt)))
    torch_call = lambda f: lambda i: f(sets[i][0]["qkv"], sets[i][0]["k_cache"], sets[i][0]["v_cache"],  # noqa
                                       sets[i][1]["cos"], sets[i][1]["sin"], sets[i][0]["slots"], sets[i][1]["mask"],
                                       H, KV)
    row["triton_us"] = time_graph(lambda i: da.decode_attention(**sets[i][0]), CALLS)
    if with_compile:
        compiled_torch = torch.compile(torch_path, fullgraph=True, dynamic=False)
        compiled_kernel = torch.compile(da.decode_attention, fullgraph=True, dynamic=False)
        row["torch_us"] = time_graph(torch_call(torch_path), CALLS)
        row["torch_compile_us"] = time_graph(torch_call(compiled_torch), CALLS)
        row["triton_compile_us"] = time_graph(lambda i: compiled_kernel(**sets[i][0]), CALLS)
    return row, sets


def sweep_candidates(B, S, H, KV, hd, L):
    """(chunk, warps, head_split) settings worth timing for a shape (each one is a compile: ~1 s)."""
    G = H // KV
    if L <= 16:  # the depth decoder: one chunk; warps and head split
        return [(da._pow2(L), w, h) for w, h in ((2, 1), (4, 1), (2, G), (4, G), (8, G))]
    if L <= 1024:
        return [(c, w, 1) for c in (16, 32, 64) for w in (4, 8)] + [(32, 2, 1), (32, 4, G), (64, 4, G), (64, 8, G)]
    return [(32, 4, 1), (64, 4, 1), (64, 8, 1), (128, 8, 1), (64, 4, G), (128, 8, G)]


def run_sweep(name, B, S, H, KV, hd, L, slot0, start, sets):
    cands = []
    for chunk, warps, hs in sweep_candidates(B, S, H, KV, hd, L):
        t0 = time.time()
        r = try_time(lambda i: da._launch(**sets[i][0], chunk=chunk, num_warps=warps, head_split=hs), CALLS)
        nch = -(-L // chunk)
        cands.append(dict(chunk=chunk, warps=warps, head_split=hs, programs=B * KV * hs * nch, us=r,
                          seconds=round(time.time() - t0, 1)))
    return cands


def header(res):
    print(f"{res['device']}, torch {res['torch']}, triton {res['triton']} (tile axis order FLIP={res['flip']})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="time tile settings instead (no torch paths)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or da.triton is None:
        sys.exit("needs CUDA and triton")
    t_start = time.time()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=da.triton.__version__,
               flip=da._FLIP, calls_per_graph=CALLS, table=[[list(k), v._asdict()] for k, v in da.TABLE])
    header(res)
    if args.sweep:
        return sweep_main(res, t_start)
    rows = []
    for c in CASES:
        row, sets = run_case(*c)
        rows.append(row)
        del sets
        torch.cuda.empty_cache()
    res["rows"] = rows
    print(f"µs per call ({CALLS} calls in one CUDA graph)")
    print(f"{'case':<18}{'torch':>8}{'+compile':>10}{'triton':>9}{'+compile':>10}{'speedup':>9}{'rel err':>10}  "
          f"cache  config")
    for r in rows:
        best_torch = min(r["torch_us"], r["torch_compile_us"])
        cfg = r["config"]
        print(f"{r['case']:<18}{r['torch_us']:>8.2f}{r['torch_compile_us']:>10.2f}{r['triton_us']:>9.2f}"
              f"{r['triton_compile_us']:>10.2f}{best_torch / r['triton_us']:>8.2f}x{r['rel_err']:>10.1e}  "
              f"{'equal' if r['cache_equal'] else 'DIFFERS'}  chunk {cfg['chunk']} warps {cfg['num_warps']} "
              f"head_split {cfg['head_split']}")
    print(f"max rel err {max(r['rel_err'] for r in rows):.2e}")
    res["seconds"] = round(time.time() - t_start, 1)
    print(f"({res['seconds']} s)")
    write_json("bench_decode_attention.json", res)


def sweep_main(res, t_start):
    """Tile settings per shape."""
    res["sweep"] = []
    for c in CASES:
        row, sets = run_case(*c, with_compile=False)
        row["candidates"] = run_sweep(*c, sets)
        res["sweep"].append(row)
        del sets
        torch.cuda.empty_cache()
        ok = sorted((x for x in row["candidates"] if isinstance(x["us"], float)), key=lambda x: x["us"])
        cfg = row["config"]
        print(f"\n{row['case']}: default chunk {cfg['chunk']} warps {cfg['num_warps']} head_split "
              f"{cfg['head_split']}: {row['triton_us']:.2f} µs; candidates, fastest first:")
        for x in ok:
            print(f"    chunk {x['chunk']:<4} warps {x['warps']} head_split {x['head_split']} programs "
                  f"{x['programs']:<5} {x['us']:.2f} µs")
        for x in row["candidates"]:
            if not isinstance(x["us"], float):
                print(f"    chunk {x['chunk']:<4} warps {x['warps']} head_split {x['head_split']}: {x['us']}")
        if ok:
            best = ok[0]
            B, S, H, KV, hd, L = (row[k] for k in ("B", "S", "H", "KV", "hd", "L"))
            # keyed like the TABLE entry that serves this shape now (its L bound), else by this L
            key = next((k for k, _ in da.TABLE if k[:5] == (B, KV, H // KV, S, hd) and L <= k[5]),
                       (B, KV, H // KV, S, hd, L))
            key_s = "(" + ", ".join("1 << 30" if x == 1 << 30 else str(x) for x in key) + ")"
            if best["us"] < row["triton_us"]:
                print(f"  TABLE line: ({key_s}, Cfg({best['chunk']}, {best['warps']}, {best['head_split']})),  "
                      f"# {best['us']:.2f} µs (default {row['triton_us']:.2f})")
            else:
                print(f"  TABLE: keep the default ({row['triton_us']:.2f} µs <= {best['us']:.2f})")
        write_json("bench_decode_attention_sweep.json", res)
    res["seconds"] = round(time.time() - t_start, 1)
    print(f"({res['seconds']} s)")
    write_json("bench_decode_attention_sweep.json", res)


if __name__ == "__main__":
    main()
