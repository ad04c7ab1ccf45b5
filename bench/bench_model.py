"""Full-size HeartMuLa-3B (random weights, bf16) on one GPU: build, training forward+backward on one 30 s clip,
and a 10-frame CFG generation through the static KV cache.

    python bench/bench_model.py            # prints a table; JSON to $OUT/bench_model.json when OUT is set
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results import write_json  # noqa: E402
from hmtiny.config import ModelConfig  # noqa: E402
from hmtiny.model import build_random  # noqa: E402


def synthetic_clip(cfg: ModelConfig, prompt_rows=200, frames=375, batch=1, device="cuda"):
    S = prompt_rows + frames
    tokens = torch.zeros(batch, S, 9, dtype=torch.long, device=device)
    mask = torch.zeros(batch, S, 9, dtype=torch.bool, device=device)
    tokens[:, :prompt_rows, 8] = torch.randint(0, cfg.text_vocab_size, (batch, prompt_rows), device=device)
    mask[:, :prompt_rows, 8] = True
    tokens[:, prompt_rows:, :8] = torch.randint(0, cfg.codebook_size, (batch, frames, 8), device=device)
    mask[:, prompt_rows:, :8] = True
    audio = torch.zeros(batch, S, dtype=torch.bool, device=device)
    audio[:, prompt_rows:] = True
    muq_idx = torch.full((batch,), 40, device=device)
    return tokens, mask, audio, muq_idx


def timed(fn, reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    dev = "cuda"
    cfg = ModelConfig.official_3b()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t0 = time.perf_counter()
    model = build_random(cfg, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    results["build_s"] = time.perf_counter() - t0
    results["params_B"] = sum(p.numel() for p in model.parameters()) / 1e9
    results["weights_GiB"] = torch.cuda.memory_allocated() / 2**30

    tokens, mask, audio, muq = synthetic_clip(cfg)
    for mode in ("frozen_base", "full_grads"):
        for ckpt in (False, True):
            model.train()
            model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = ckpt
            for p in model.parameters():
                p.requires_grad_(mode == "full_grads")
            # a frozen base still needs grads w.r.t. activations (LoRA): make the input embeddings require grad
            def step():
                loss, _ = model.loss(tokens, mask, audio, muq)
                if mode == "frozen_base":
                    # stand-in for LoRA: backprop through every block to an input-side parameter
                    loss = loss + 0 * model.text_embeddings.weight.sum()
                loss.backward()
                model.zero_grad(set_to_none=True)
            if mode == "frozen_base":
                model.text_embeddings.weight.requires_grad_(True)
            torch.cuda.reset_peak_memory_stats()
            ms = timed(step) * 1e3
            key = f"train_{mode}_{'ckpt' if ckpt else 'nockpt'}"
            results[key] = {"ms_per_step": ms, "audio_frames_per_s": 375 / ms * 1e3,
                            "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
            print(key, results[key], flush=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = False

    # 10-frame CFG generation, each way hmtiny.runtime.generate offers
    from hmtiny import runtime
    prompt = (tokens[0, :200].cpu(), mask[0, :200].cpu(), 40)
    torch.cuda.reset_peak_memory_stats()
    for mode in runtime.GENERATION_MODES:
        t0 = time.perf_counter()
        frames = runtime.generate(model, [prompt], 10, 1.5, 50, 1.0, torch.Generator("cuda").manual_seed(0), mode=mode)
        torch.cuda.synchronize()
        results[f"generate10_{mode}"] = {"s": time.perf_counter() - t0, "frames": int(frames[0].shape[0]),
                                         "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
        print(f"generate10 {mode}", results[f"generate10_{mode}"], flush=True)

    print(json.dumps(results, indent=1))
    write_json("bench_model.json", results)


if __name__ == "__main__":
    main()
