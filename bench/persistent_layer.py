"""Time kernels/layer_step.py (one decode layer step as one persistent launch) against the engine's 7-kernel layer
step at full size on a GPU.

    python bench/persistent_layer.py [--bf16] [--slots 576]

JSON to $OUT/persistent_layer.json when OUT is set.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.layer_step import layer_step  # noqa: E402


def main():
    """Full size on a GPU, int8 (or --bf16) weights, 2 songs (CFG): the backbone's 28 layer steps (576 cache
    slots) and the depth decoder's 3 (8 slots) as the engine runs them (FastLayer, planned tiles, PDL, one CUDA
    graph) against as many persistent launches; and one layer's outputs compared. JSON to
    $OUT/persistent_layer.json."""
    import argparse
    import json
    import os

    from hmtiny.config import ModelConfig
    from hmtiny.engine import Engine
    from hmtiny.model import build_random
    from kernels.timing import graph_time
    ap = argparse.ArgumentParser()
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--slots", type=int, default=576)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    dev = "cuda"
    model = build_random(ModelConfig.official_3b(), device=dev, dtype=torch.bfloat16)
    if not args.bf16:
        from hmtiny.quant import quantize_model
        quantize_model(model)
        torch.cuda.empty_cache()
    eng = Engine(model, "graph", share=True)
    B = 2
    eng._plan_tiles(rows=B)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"device": torch.cuda.get_device_name(), "int8": not args.bf16, "slots": args.slots, "stacks": {}}
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    # (stack, its rope table, cache slots, the new row's slot): the backbone mid-song, the depth decoder's 8 slots
    for name, stack, rope, L, at in (("backbone", eng.backbone, model.backbone.rope, args.slots, args.slots - 10),
                                     ("decoder", eng.decoder, model.decoder.rope, 8, 5)):
        stack.setup_cache(B, L, torch.bfloat16, dev)
        layers = list(stack.layers)
        for layer in layers:  # a filled cache: older slots hold keys/values
            layer.cache.k.normal_()
            layer.cache.v.normal_()
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(B, 1, 3072, device=dev, generator=g).to(torch.bfloat16)
        pending = torch.randn(8, B, 1, 3072, device=dev, generator=g) * 0.05
        start = torch.zeros(B, dtype=torch.long, device=dev)
        slots = torch.tensor([at], device=dev)
        pos = (slots - start)[:, None]
        row = res["stacks"][name] = {"layers": len(layers), "slots": L, "persistent": []}
        with torch.no_grad():
            ref = layers[0](x, pending, slots, pos, start, rope, prompt=False)
            bar = torch.zeros(3, dtype=torch.int32, device=dev)
            got = layer_step(layers[0], x, pending, rope, pos, slots, start, sms, bar)
            torch.cuda.synchronize()
            row["check"] = {"h": rel(got[0], ref[0]), "down": rel(got[1].sum(0), ref[1].float().sum(0)),
                            "gave_up": int(bar[2])}
            print(f"{name}: one layer against FastLayer: {row['check']}", flush=True)
            today = graph_time(lambda i: [layer(x, pending, slots, pos, start, rope, prompt=False)
                                          for layer in layers], 3, warmup=1) * 1e6
            row["today_us_per_layer"] = today / len(layers)
            print(f"{name}: the engine's layer step (7 kernels, PDL): {today / len(layers):.1f} us", flush=True)
            bars = [torch.zeros(3, dtype=torch.int32, device=dev) for _ in layers]
            # (bn, kc, chunk, prefetch): the defaults, then one change at a time (tiles that compile for sm_90
            # without spilling at 8 warps)
            variants = [(16, None, 32, 8 << 20), (16, None, 32, 0), (16, None, 16, 8 << 20), (16, 512, 32, 8 << 20),
                        (32, 512, 32, 8 << 20)]
            for bn, kc, chunk, pf in variants if name == "backbone" else variants[:2]:
                label = f"{name}: persistent, {sms} programs, bn {bn}, kc {kc or 'default'}, chunk {chunk}, " \
                        f"prefetch {pf >> 20} MiB"
                try:
                    t = graph_time(lambda i: [layer_step(layer, x, pending, rope, pos, slots, start, sms, c,
                                                         bn=bn, kc=kc, chunk=chunk, pf_bytes=pf)
                                              for layer, c in zip(layers, bars)], 3, warmup=1) * 1e6
                except Exception as e:
                    print(f"{label}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                gave_up = sum(int(c[2]) for c in bars)
                row["persistent"].append({"bn": bn, "kc": kc, "chunk": chunk, "pf_mb": pf >> 20,
                                          "us_per_layer": t / len(layers), "gave_up": gave_up})
                print(f"{label}: {t / len(layers):.1f} us a layer (barrier waits given up: {gave_up})", flush=True)
    (out_dir / "persistent_layer.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
