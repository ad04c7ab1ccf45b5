"""kernels/layer_step.py (an experiment, HMTINY_LAYER_KERNEL=1): its one-launch decode layer step against FastLayer's
own decode step, under Triton's interpreter with one program (every grid barrier passes at once), bf16 weights and
int8 ones; through the engine's stack; and compiled for an H100 without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")

CODE = r"""
import dataclasses, json, sys, torch
from kernels import layer_step as pl
from hmtiny.engine import FastLayer
from hmtiny.model import KVCache, build_random
from hmtiny.tiny import tiny_model_config
INT8 = sys.argv[1] == "int8"
D = int(sys.argv[2])  # 256: head dim 64; 192: head dim 48, not a power of two (as the 3B depth decoder's 384)
tiny = tiny_model_config(384)
st = dataclasses.replace(tiny.backbone, num_layers=1, embed_dim=D, intermediate_dim=2 * D, num_heads=4,
                         num_kv_heads=2)
cfg = dataclasses.replace(tiny, backbone=st, decoder=dataclasses.replace(st, num_layers=1))
dt = torch.float16  # the interpreter's bf16 dot products are wrong; the GPU runs bf16
model = build_random(cfg, device="cpu", dtype=dt, seed=2)
if INT8:
    from hmtiny.quant import quantize_model
    quantize_model(model)
B, L, P, HD, KV = 3, 40, 30, D // 4, 2
g = torch.Generator().manual_seed(0)
results = []
for pending_slices in (0, 2):
    layers = [FastLayer(model.backbone.layers[0], fuse=True) for _ in range(2)]
    base_k = torch.randn(B, KV, L, HD, generator=g).to(dt)
    base_v = torch.randn(B, KV, L, HD, generator=g).to(dt)
    for layer in layers:
        layer.cache = KVCache(B, KV, L, HD, dt, "cpu")
        layer.cache.k.copy_(base_k)
        layer.cache.v.copy_(base_v)
    x = torch.randn(B, 1, D, generator=g).to(dt)
    pending = (torch.randn(pending_slices, B, 1, D, generator=g) * 0.3) if pending_slices else None
    start = torch.tensor([0, 3, 17])
    slots = torch.tensor([P])
    pos = (slots - start)[:, None]
    rope = model.backbone.rope
    torch.set_grad_enabled(False)
    ref_h, ref_p = layers[0](x, pending, slots, pos, start, rope, prompt=False)
    bar = torch.zeros(3, dtype=torch.int32)
    h, parts = pl.layer_step(layers[1], x, pending, rope, pos, slots, start, 1, bar, bn=16, kc=64, chunk=16)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    results.append({"h": rel(h, ref_h), "down": rel(parts.sum(0), ref_p.float().sum(0)),
                    "k": rel(layers[1].cache.k, layers[0].cache.k), "v": rel(layers[1].cache.v, layers[0].cache.v),
                    "arrived": int(bar[0]), "barriers": int(bar[1]), "gave_up": int(bar[2])})
print(json.dumps(results))
"""


@pytest.mark.parametrize("weights,width", [("bf16", 256), ("int8", 256), ("bf16", 192)])
def test_layer_step_matches_fastlayer_under_interpreter(weights, width):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", CODE, weights, str(width)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    for r in json.loads(out.stdout.strip().splitlines()[-1]):
        assert r["h"] < 1e-2 and r["down"] < 2e-2, r
        assert r["k"] < 1e-3 and r["v"] < 1e-3, r  # the new slot written as the engine writes it
        assert r["barriers"] == 7 and r["arrived"] == 0 and r["gave_up"] == 0, r


@pytest.mark.parametrize("stack", ["backbone", "decoder"])
def test_layer_kernel_compiles_for_hopper(stack):
    """At the 3B backbone's sizes (int8, 8 pending slices, 576 slots) and the depth decoder's (head dim 384, 8
    slots) the kernel compiles and assembles for sm_90 with layer_step's defaults, using no local memory, with
    the L2 prefetch in it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, str(REPO / "bench"))
    import kernel_resources
    from kernels import layer_step as pl
    k = pl._layer_kernel
    consts = {"D": 3072, "H": 24, "KV": 8, "HD": 128, "HD_P": 128, "F": 8192, "SP": 8, "BLOCK_D": 4096, "G_P": 4,
              "CHUNK": 32, "NCH": 19, "NCH_P": 32, "BN": 16, "KC": 1024, "SCALED": True, "PF_BYTES": 8 << 20,
              "PF_SLOTS": 256, "M": 2, "EXACT": True, "WKIND": 0}
    if stack == "decoder":
        consts.update(H=8, KV=4, HD=384, HD_P=512, G_P=2, CHUNK=8, NCH=1, NCH_P=1)  # chunk = the 8-slot cache
    types = {"x_ptr": "*bf16", "pend_ptr": "*fp32", "g1_ptr": "*bf16", "g2_ptr": "*bf16", "eps": "fp32",
             "k_ptr": "*bf16", "v_ptr": "*bf16", "rope_ptr": "*fp32", "pos_ptr": "*i64", "slots_ptr": "*i64",
             "start_ptr": "*i64", "h1_ptr": "*bf16", "n1_ptr": "*bf16", "qkvp_ptr": "*fp32", "pm_ptr": "*fp32",
             "pl_ptr": "*fp32", "pa_ptr": "*fp32", "y_ptr": "*bf16", "op_ptr": "*fp32", "h2_ptr": "*bf16",
             "n2_ptr": "*bf16", "g_ptr": "*bf16", "out_ptr": "*fp32", "bar_ptr": "*i32", "qk_scale": "fp32",
             **{w: "*i32" for w in ("wqkv", "wo", "w13", "w2")}, **{s: "*fp32" for s in ("sqkv", "so", "s13", "s2")}}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in k.arg_names}
    # every pointer is 16-byte aligned at the real launch, as Triton's launcher tells the compiler there
    attrs = {(k.arg_names.index(n),): [["tt.divisibility", 16]] for n in k.arg_names if sig[n].startswith("*")}
    ptx = triton.compile(ASTSource(k, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 8}).asm["ptx"]  # layer_step's defaults: 8 warps, chunks of 32
    used = kernel_resources.resources(ptx, 90)
    assert 0 < used["registers"] <= 255 and used["spill_stores"] == used["spill_loads"] == 0, used
    assert "cp.async.bulk.prefetch.L2" in ptx


STACK = r"""
import dataclasses, json, os, torch
from kernels import layer_step
from hmtiny.engine import Engine
from hmtiny.model import build_random
from hmtiny.tiny import tiny_model_config
torch.set_grad_enabled(False)
tiny = tiny_model_config(384)
st = dataclasses.replace(tiny.backbone, num_layers=2, embed_dim=128, intermediate_dim=256, num_heads=4,
                         num_kv_heads=2)
cfg = dataclasses.replace(tiny, backbone=st, decoder=dataclasses.replace(st, num_layers=1))
model = build_random(cfg, device="cpu", dtype=torch.float16, seed=3)
B, P = 2, 12
g = torch.Generator().manual_seed(1)
x = torch.randn(B, P + 1, 128, generator=g).to(torch.float16)
start = torch.tensor([0, 4])
pos = (torch.arange(P + 1)[None] - start[:, None]).clamp(min=0)
calls = []
run = layer_step.run
layer_step.run = lambda *a: calls.append(1) or run(*a)
outs = []
for on in ("0", "1"):
    os.environ["HMTINY_LAYER_KERNEL"] = on
    eng = Engine(model)
    eng.backbone.setup_cache(B, 16, torch.float16, "cpu")
    eng.backbone(x[:, :P], pos[:, :P], torch.arange(P), start, prompt=True)
    outs.append(eng.backbone(x[:, P:], pos[:, P:], torch.tensor([P]), start).float())
print(json.dumps({"rel": float((outs[1] - outs[0]).norm() / outs[0].norm()), "calls": len(calls)}))
"""


def test_engine_stack_runs_the_layer_kernel_when_asked():
    """HMTINY_LAYER_KERNEL=1: the engine's decode step of a stack goes through layer_step for every layer (the
    prompt does not) and gives what the seven-kernel path gives."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", STACK], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["calls"] == 2 and res["rel"] < 1e-2, res


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA only")
def test_layer_step_on_cuda_matches_fastlayer():
    """On a GPU, one program per SM and real grid barriers: the layer kernel against FastLayer's seven kernels,
    bf16 and int8 weights, twice on the same barrier words, no barrier wait given up."""
    import dataclasses

    import torch

    from hmtiny.engine import FastLayer
    from hmtiny.model import KVCache, build_random
    from hmtiny.quant import quantize_model
    from hmtiny.tiny import tiny_model_config
    from kernels import layer_step
    tiny = tiny_model_config(384)
    st = dataclasses.replace(tiny.backbone, num_layers=1, embed_dim=1024, intermediate_dim=2048, num_heads=8,
                             num_kv_heads=4)
    cfg = dataclasses.replace(tiny, backbone=st, decoder=dataclasses.replace(st, num_layers=1))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for int8 in (False, True):
        model = build_random(cfg, device="cuda", dtype=torch.bfloat16, seed=4)
        if int8:
            quantize_model(model)
        B, L, P, HD, KV = 2, 200, 150, 128, 4
        g = torch.Generator("cuda").manual_seed(0)
        layers = [FastLayer(model.backbone.layers[0], fuse=True) for _ in range(2)]
        base_k = torch.randn(B, KV, L, HD, device="cuda", generator=g).to(torch.bfloat16)
        base_v = torch.randn(B, KV, L, HD, device="cuda", generator=g).to(torch.bfloat16)
        for layer in layers:
            layer.cache = KVCache(B, KV, L, HD, torch.bfloat16, "cuda")
            layer.cache.k.copy_(base_k)
            layer.cache.v.copy_(base_v)
        x = torch.randn(B, 1, 1024, device="cuda", generator=g).to(torch.bfloat16)
        pending = torch.randn(4, B, 1, 1024, device="cuda", generator=g) * 0.1
        start = torch.tensor([0, 9], device="cuda")
        slots = torch.tensor([P], device="cuda")
        pos = (slots - start)[:, None]
        rope = model.backbone.rope
        bar = torch.zeros(3, dtype=torch.int32, device="cuda")
        with torch.no_grad():
            ref_h, ref_p = layers[0](x, pending, slots, pos, start, rope, prompt=False)
            for _ in range(2):
                h, parts = layer_step.layer_step(layers[1], x, pending, rope, pos, slots, start, sms, bar)
        torch.cuda.synchronize()
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
        assert rel(h, ref_h) < 1e-2 and rel(parts.sum(0), ref_p.float().sum(0)) < 3e-2, (int8, rel(h, ref_h))
        assert rel(layers[1].cache.k, layers[0].cache.k) < 1e-3
        assert int(bar[0]) == 0 and int(bar[1]) == 2 * 7 and int(bar[2]) == 0, bar.tolist()
