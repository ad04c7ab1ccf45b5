"""LoRA training step of the full-size HeartMuLa-3B (random weights) on one GPU, exactly as train.py runs it:
bf16 (or int8) frozen base, float32 LoRA rank 16 on q/k/v/o + w1/w2/w3 of both stacks (dropout 0.1, the
SimpleTuner default), bf16 autocast, fused AdamW, grad-norm clipping. Synthetic 30 s clips: 200 prompt rows +
375 audio frames each.

    python bench/bench_train.py                          # captured (train.py's step), eager, int8; JSON in $OUT
    python bench/bench_train.py --variants captured,profile

Compare with the SimpleTuner + PEFT anchors of bench/NOTES.md (H100): 1 clip w/ checkpointing 361.5 ms, 1,037
frames/s, 11.5 GiB; 4 clips w/o checkpointing 339.5 ms, 4,419 frames/s, 31.6 GiB; 4 clips w/ 527 ms, 2,846, 18.4.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmtiny.config import ModelConfig  # noqa: E402
from hmtiny.captured_step import CapturedStep  # noqa: E402
from hmtiny.fused import use_fused_kernels  # noqa: E402
from hmtiny.lora import inject_lora, lora_parameters, mark_only_lora_trainable, set_dropout_seed  # noqa: E402
from hmtiny.model import build_random  # noqa: E402

PROMPT, FRAMES = 200, 375
GiB = 2 ** 30


def synthetic_batch(cfg: ModelConfig, batch: int, seed: int = 0, device="cuda"):
    """Random (never zero) tokens in the training layout (hmtiny.data.build_example/collate)."""
    g = torch.Generator().manual_seed(seed)
    S = PROMPT + FRAMES
    tokens = torch.zeros(batch, S, 9, dtype=torch.long)
    mask = torch.zeros(batch, S, 9, dtype=torch.bool)
    tokens[:, :PROMPT, 8] = torch.randint(1, cfg.text_vocab_size, (batch, PROMPT), generator=g)
    mask[:, :PROMPT, 8] = True
    tokens[:, PROMPT:, :8] = torch.randint(0, cfg.codebook_size, (batch, FRAMES, 8), generator=g)
    mask[:, PROMPT:, :8] = True
    frames = torch.zeros(batch, S, dtype=torch.bool)
    frames[:, PROMPT:] = True
    muq = torch.full((batch,), 40, dtype=torch.long)
    return [t.to(device) for t in (tokens, mask, frames, muq)]


def train_flops(cfg: ModelConfig, batch: int, ckpt: bool, rank: int = 16) -> float:
    """FLOPs of one step with a frozen base. The frozen matmuls' backward computes input gradients only: one
    matmul per forward matmul, so they cost 2x the forward (3x under checkpointing, which runs each block's
    forward again). The LoRA matmuls also compute weight gradients (3x, 4x). Attention scores (causal: half of
    S x S) cost 2 matmuls forward, 5 in FlashAttention's backward."""
    def linear(st):  # matmul width of one block: sum of in x out over q, k, v, o, w1, w2, w3
        return st.embed_dim * (2 * st.num_heads * st.head_dim + 2 * st.num_kv_heads * st.head_dim
                               + 3 * st.intermediate_dim)

    def lora(st):  # sum of r x (in + out) over the same layers
        return rank * (st.embed_dim * 7 + 2 * st.num_heads * st.head_dim + 2 * st.num_kv_heads * st.head_dim
                       + 3 * st.intermediate_dim)

    def attention(st, seqs, length):  # causal QK^T and PV, forward
        return 2 * seqs * length * length * st.num_heads * st.head_dim * st.num_layers

    n, S = batch * FRAMES, PROMPT + FRAMES
    bb, dec = cfg.backbone, cfg.decoder
    blocks = 2 * (batch * S * bb.num_layers * linear(bb) + n * 8 * dec.num_layers * linear(dec))
    adapters = 2 * (batch * S * bb.num_layers * lora(bb) + n * 8 * dec.num_layers * lora(dec))
    attn = attention(bb, batch, S) + attention(dec, n, 8)
    heads = 2 * n * cfg.dim * cfg.audio_vocab_size + 2 * n * 7 * dec.embed_dim * cfg.audio_vocab_size \
        + 2 * n * 8 * cfg.dim * dec.embed_dim
    again = 1 if ckpt else 0  # checkpointing: every block's forward twice
    return (2 + again) * blocks + (3 + again) * adapters + (1 + 2.5 + again) * attn + 2 * heads


def parse_shapes(text: str) -> list[tuple[int, bool]]:
    """"1c,4" -> [(1, True), (4, False)]: clips per step, c = with checkpointing."""
    return [(int(x.rstrip("c")), x.endswith("c")) for x in text.split(",")]


def peak_tflops() -> float:
    """Dense bf16 tensor-core peak of the card (H100/H200 SXM: 989 TFLOP/s), for MFU."""
    name = torch.cuda.get_device_name()
    return 989.0 if ("H100" in name or "H200" in name) else float("nan")


def run_variant(model, cfg, name, batch, ckpt, steps, warmup, compiled=False, captured=False, fused=True):
    """Steps as train.py runs them: eager, or (captured) forward+backward replayed from CUDA graphs, with the fused
    training kernels (train.py's) or (fused=False) the torch ops."""
    use_fused_kernels(model, on=False)  # an earlier CapturedStep switched the model in place: start from torch ops
    model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = ckpt
    params = lora_parameters(model)
    for p in params:
        p.grad = None
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=True)
    data = [synthetic_batch(cfg, batch, seed=s, device="cpu" if captured else "cuda") for s in range(3)]
    step_fn = CapturedStep(model, params, torch.bfloat16, fused=fused) if captured else None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    t_first = time.perf_counter()
    for i in range(warmup + steps):
        tokens, mask, frames, muq = data[i % len(data)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        set_dropout_seed(model, i)
        if step_fn is not None:
            loss = step_fn({"tokens": tokens, "tokens_mask": mask, "audio_frame_mask": frames, "muq_idx": muq})[0]
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, info = model.loss(tokens, mask, frames, muq)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=step_fn is None)
        losses.append(loss.item())  # one host sync per step, as train.py
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == warmup - 1:
            warm_s = time.perf_counter() - t_first
    med = statistics.median(times[warmup:])
    spread = (min(times[warmup:]), max(times[warmup:]))
    flops = train_flops(cfg, batch, ckpt) / med
    r = {"variant": name, "batch": batch, "ckpt": ckpt, "compiled": compiled, "fused": captured and fused,
         "ms_per_step": 1e3 * med,
         "ms_min_max": [1e3 * spread[0], 1e3 * spread[1]], "audio_frames_per_s": batch * FRAMES / med,
         "peak_GiB": torch.cuda.max_memory_allocated() / GiB,
         "reserved_GiB": torch.cuda.max_memory_reserved() / GiB, "warmup_s": warm_s,
         "tflops": flops / 1e12, "mfu": flops / 1e12 / peak_tflops(), "loss_first_last": [losses[0], losses[-1]],
         "finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses))}
    if step_fn is not None:
        r["capture_s"] = step_fn.capture_s
        step_fn.release()
    print(json.dumps(r), flush=True)
    del opt
    return r


def build(cfg, int8=False, seed=0, dropout=0.1):
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(seed)
    model = build_random(cfg, device="cuda", dtype=torch.bfloat16, seed=seed)
    if int8:
        from hmtiny.quant import quantize_model
        quantize_model(model)
    inject_lora(model, rank=16, alpha=16, dropout=dropout)
    mark_only_lora_trainable(model)
    model.train()
    torch.cuda.synchronize()
    return model


def profile_top(model, cfg, batch=1, ckpt=False, rows=45, captured=False):
    """The kernels that take the time in one step (CUDA time, descending); captured: inside the replayed graph."""
    from torch.profiler import ProfilerActivity, profile
    use_fused_kernels(model, on=False)  # as run_variant: a CapturedStep switches them back on when it captures
    model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = ckpt
    params = lora_parameters(model)
    tokens, mask, frames, muq = synthetic_batch(cfg, batch, device="cpu" if captured else "cuda")
    cpu_batch = {"tokens": tokens, "tokens_mask": mask, "audio_frame_mask": frames, "muq_idx": muq}
    step_fn = CapturedStep(model, params, torch.bfloat16) if captured else None

    def one():
        if step_fn is not None:
            step_fn(cpu_batch)
            return
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.loss(tokens, mask, frames, muq)
        loss.backward()

    for _ in range(2):
        one()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        one()
        torch.cuda.synchronize()
    for p in params:
        p.grad = None
    if step_fn is not None:
        step_fn.release()
    events = prof.key_averages()
    n_kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    table = events.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    return table, n_kernels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="captured,eager,int8",
                    help="comma list of captured (train.py's default step), captured-unfused (the same without "
                         "the fused RMSNorm/SwiGLU/RoPE kernels: their A/B), eager, int8 (captured), int8-eager, "
                         "profile / profile-captured (1 clip, checkpointing), "
                         "compile (blocks torch.compile'd, eager step), "
                         "captured-compile (compiled blocks, captured step)")
    ap.add_argument("--shapes", default="1c,4,4c,1", help="clips per step, c = with checkpointing")
    ap.add_argument("--profile_shapes", default="1c", help="shapes the profile variants profile (as --shapes)")
    ap.add_argument("--lora_dropout", type=float, default=0.1, help="train.py's default is 0.1")
    ap.add_argument("--budget_s", type=float, default=240, help="skip compiled variants past this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    variants = set(args.variants.split(","))
    t_start = time.time()
    cfg = ModelConfig.official_3b()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(info, flush=True)
    results = []
    shapes = parse_shapes(args.shapes)

    model = build(cfg, dropout=args.lora_dropout)
    info["weights_GiB"] = torch.cuda.memory_allocated() / GiB
    info["lora_dropout"] = args.lora_dropout
    info["lora_params_M"] = sum(p.numel() for p in lora_parameters(model)) / 1e6
    for mode in ("captured", "captured-unfused", "eager"):
        if mode in variants:
            for batch, ckpt in shapes:
                results.append(run_variant(model, cfg, f"bf16 {mode}", batch, ckpt, args.steps, args.warmup,
                                           captured=mode != "eager", fused=mode == "captured"))
    for mode in ("profile", "profile-captured"):  # default: 1 clip with checkpointing, the quickstart's step
        if mode in variants:
            for batch, ckpt in parse_shapes(args.profile_shapes):
                table, n_kernels = profile_top(model, cfg, batch=batch, ckpt=ckpt,
                                               captured=mode == "profile-captured")
                shape = f"{batch}{'c' if ckpt else ''}"
                info[f"kernels_per_step_{shape}_{mode}"] = n_kernels
                print(table, flush=True)
                Path(args.out, f"{mode}_{shape}.txt").write_text(table)
    del model

    if variants & {"int8", "int8-eager"}:
        model = build(cfg, int8=True, dropout=args.lora_dropout)
        info["int8_weights_GiB"] = torch.cuda.memory_allocated() / GiB
        for mode in ("int8", "int8-eager"):
            if mode in variants:
                results.append(run_variant(model, cfg, mode, 1, True, args.steps, args.warmup,
                                           captured=mode == "int8"))
        del model

    # torch.compile of every block (LoRA layers inside), with the eager step or inside the captured step:
    # time-boxed, failures reported
    for mode in ("compile", "captured-compile"):
        if mode not in variants:
            continue
        from torch import _dynamo
        _dynamo.config.cache_size_limit = 64
        model = build(cfg, dropout=args.lora_dropout)
        for stack in (model.backbone, model.decoder):
            for layer in stack.layers:
                layer.compile()
        for batch, ckpt in shapes[:3]:
            if time.time() - t_start > args.budget_s:
                print(f"skipping {mode} b{batch} ckpt={ckpt}: past the time budget", flush=True)
                continue
            try:
                results.append(run_variant(model, cfg, f"bf16 {mode}", batch, ckpt, args.steps, args.warmup, True,
                                           captured=mode == "captured-compile"))
            except Exception as e:  # report, keep the other numbers
                print(f"{mode} failed: {type(e).__name__}: {e}", flush=True)
                break
        del model

    info["results"] = results
    Path(args.out, "bench_train.json").write_text(json.dumps(info, indent=1))
    print(f"\n{info['device']}, torch {info['torch']}, weights {info['weights_GiB']:.2f} GiB, "
          f"LoRA {info['lora_params_M']:.1f}M params; {args.steps} steps after {args.warmup} warm-up, median")
    print("| variant | clips | ckpt | ms/step | audio frames/s | peak GiB | TFLOP/s | MFU | first/last loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['batch']} | {'yes' if r['ckpt'] else 'no'} | {r['ms_per_step']:.1f} | "
              f"{r['audio_frames_per_s']:,.0f} | {r['peak_GiB']:.2f} | {r['tflops']:.0f} | {r['mfu']:.1%} | "
              f"{r['loss_first_last'][0]:.3f}/{r['loss_first_last'][1]:.3f} |")
    print(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
