"""LoRA training step of the full-size HeartMuLa-3B (random weights) on one GPU, exactly as train.py runs it:
bf16 (or int8) frozen base, float32 LoRA rank 16 on q/k/v/o + w1/w2/w3 of both stacks (dropout 0.1, the
SimpleTuner default), bf16 autocast, fused AdamW, grad-norm clipping. Synthetic 30 s clips: 200 prompt rows +
375 audio frames each.

    python bench/bench_train.py                 # every variant; table last, JSON in $OUT/bench_train.json
    python bench/bench_train.py --only eager    # skip the torch.compile and int8 variants

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
from hmtiny.lora import inject_lora, lora_parameters, mark_only_lora_trainable  # noqa: E402
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


def train_flops(cfg: ModelConfig, batch: int, ckpt: bool) -> float:
    """Matmul FLOPs of one step with a frozen base: forward + input-gradient backward (2x forward) + a second
    forward of each block under checkpointing. LoRA and attention scores are small and left out."""
    def stack(st, rows):
        per_layer = st.embed_dim * (2 * st.num_heads * st.head_dim + 2 * st.num_kv_heads * st.head_dim
                                    + 3 * st.intermediate_dim)
        return 2 * rows * st.num_layers * per_layer
    n = batch * FRAMES
    fwd_blocks = stack(cfg.backbone, batch * (PROMPT + FRAMES)) + stack(cfg.decoder, n * 8)
    heads = 2 * n * cfg.dim * cfg.audio_vocab_size * 8 + 2 * n * 8 * cfg.dim * cfg.decoder.embed_dim
    return 3 * (fwd_blocks + heads) + (fwd_blocks if ckpt else 0)


def run_variant(model, cfg, name, batch, ckpt, steps, warmup, compiled=False):
    model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = ckpt
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=True)
    data = [synthetic_batch(cfg, batch, seed=s) for s in range(3)]  # rotate inputs
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    t_first = time.perf_counter()
    for i in range(warmup + steps):
        tokens, mask, frames, muq = data[i % len(data)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, info = model.loss(tokens, mask, frames, muq)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # one host sync per step, as train.py
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == warmup - 1:
            warm_s = time.perf_counter() - t_first
    med = statistics.median(times[warmup:])
    spread = (min(times[warmup:]), max(times[warmup:]))
    r = {"variant": name, "batch": batch, "ckpt": ckpt, "compiled": compiled, "ms_per_step": 1e3 * med,
         "ms_min_max": [1e3 * spread[0], 1e3 * spread[1]], "audio_frames_per_s": batch * FRAMES / med,
         "peak_GiB": torch.cuda.max_memory_allocated() / GiB,
         "reserved_GiB": torch.cuda.max_memory_reserved() / GiB, "warmup_s": warm_s,
         "tflops": train_flops(cfg, batch, ckpt) / med / 1e12, "loss_first_last": [losses[0], losses[-1]],
         "finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses))}
    print(json.dumps(r), flush=True)
    del opt
    return r


def build(cfg, int8=False, seed=0):
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(seed)
    model = build_random(cfg, device="cuda", dtype=torch.bfloat16, seed=seed)
    if int8:
        from hmtiny.quant import quantize_model
        quantize_model(model)
    inject_lora(model, rank=16, alpha=16, dropout=0.1)
    mark_only_lora_trainable(model)
    model.train()
    torch.cuda.synchronize()
    return model


def profile_top(model, cfg, batch=1, ckpt=False, rows=25):
    """The kernels that take the time in one step (CUDA time, descending)."""
    from torch.profiler import ProfilerActivity, profile
    model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = ckpt
    tokens, mask, frames, muq = synthetic_batch(cfg, batch)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.loss(tokens, mask, frames, muq)
        loss.backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.loss(tokens, mask, frames, muq)
        loss.backward()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    events = prof.key_averages()
    n_kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    table = events.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    return table, n_kernels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", choices=["all", "eager"], default="all")
    ap.add_argument("--budget_s", type=float, default=240, help="skip compiled variants past this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    t_start = time.time()
    cfg = ModelConfig.official_3b()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(info, flush=True)
    results = []

    model = build(cfg)
    info["weights_GiB"] = torch.cuda.memory_allocated() / GiB
    info["lora_params_M"] = sum(p.numel() for p in lora_parameters(model)) / 1e6
    for name, batch, ckpt in (("bf16", 1, True), ("bf16", 4, False), ("bf16", 4, True), ("bf16", 1, False)):
        results.append(run_variant(model, cfg, name, batch, ckpt, args.steps, args.warmup))
    table, n_kernels = profile_top(model, cfg)
    info["kernels_per_step_b1"] = n_kernels
    print(table, flush=True)
    Path(args.out, "profile_b1.txt").write_text(table)

    del model
    if args.only == "all":
        try:
            model = build(cfg, int8=True)
            info["int8_weights_GiB"] = torch.cuda.memory_allocated() / GiB
            results.append(run_variant(model, cfg, "int8", 1, True, args.steps, args.warmup))
            del model
        except Exception as e:
            print(f"int8 variant failed: {type(e).__name__}: {e}", flush=True)

        # torch.compile of every block (LoRA layers inside): last, time-boxed, failures reported not fatal
        from torch import _dynamo
        _dynamo.config.cache_size_limit = 64
        model = build(cfg)
        for stack in (model.backbone, model.decoder):
            for layer in stack.layers:
                layer.compile()
        for batch, ckpt in ((1, True), (4, False), (4, True)):
            if time.time() - t_start > args.budget_s:
                print(f"skipping compiled b{batch} ckpt={ckpt}: past the time budget", flush=True)
                continue
            try:
                results.append(run_variant(model, cfg, "bf16+compile", batch, ckpt, args.steps, args.warmup, True))
            except Exception as e:  # report, keep the eager numbers
                print(f"compiled variant failed: {type(e).__name__}: {e}", flush=True)
                break
        del model

    info["results"] = results
    Path(args.out, "bench_train.json").write_text(json.dumps(info, indent=1))
    print(f"\n{info['device']}, torch {info['torch']}, weights {info['weights_GiB']:.2f} GiB, "
          f"LoRA {info['lora_params_M']:.1f}M params; {args.steps} steps after {args.warmup} warm-up, median")
    print("| variant | clips | ckpt | ms/step | audio frames/s | peak GiB | TFLOP/s | first/last loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['batch']} | {'yes' if r['ckpt'] else 'no'} | {r['ms_per_step']:.1f} | "
              f"{r['audio_frames_per_s']:,.0f} | {r['peak_GiB']:.2f} | {r['tflops']:.0f} | "
              f"{r['loss_first_last'][0]:.3f}/{r['loss_first_last'][1]:.3f} |")
    print(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
