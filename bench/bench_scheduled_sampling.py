"""Cost of scheduled sampling: the full-size HeartMuLa-3B LoRA step (bench_train.py's set-up: bf16 base, rank 16,
bf16 autocast, fused AdamW, 200 prompt + 375 audio rows per clip) with K = 0 (the plain step), 1 and 2 rollout
passes (p = 0.5, top-k 50 frames, as train.py draws them), with and without caption dropout's extra input.

    python bench/bench_scheduled_sampling.py              # table last, JSON in $OUT/bench_scheduled_sampling.json
    python bench/bench_scheduled_sampling.py --steps 10 --batches 1
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import FRAMES, GiB, build, synthetic_batch  # noqa: E402
from hmtiny.config import ModelConfig  # noqa: E402
from hmtiny.lora import lora_parameters  # noqa: E402
from hmtiny.objective import Objective  # noqa: E402
from hmtiny.train_config import load_config  # noqa: E402


def run(model, cfg, batch: int, ckpt: bool, passes: int, caption: float, steps: int, warmup: int) -> dict:
    train_cfg = load_config(None, {"scheduled_sampling_max_step_offset": str(passes),
                                   "scheduled_sampling_probability": "0.5", "validation_topk": "50",
                                   "caption_dropout_probability": str(caption)}, warn=lambda m: None)
    objective = Objective(train_cfg, torch.device("cuda"), seed=0)
    model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = ckpt
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=True)
    data = [dict(zip(("tokens", "tokens_mask", "audio_frame_mask", "muq_idx"), synthetic_batch(cfg, batch, seed=s)))
            for s in range(3)]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        b = data[i % len(data)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.loss(b["tokens"], b["tokens_mask"], b["audio_frame_mask"], b["muq_idx"],
                                 **objective.inputs(model, b, i))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[warmup:])
    r = {"batch": batch, "ckpt": ckpt, "passes": passes, "caption_dropout": caption, "ms_per_step": 1e3 * med,
         "audio_frames_per_s": batch * FRAMES / med, "peak_GiB": torch.cuda.max_memory_allocated() / GiB}
    print(json.dumps(r), flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", default="1,4", help="clips per step, comma-separated (gradient checkpointing on)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    cfg = ModelConfig.official_3b()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    print(info, flush=True)
    model = build(cfg)
    for batch in (int(b) for b in args.batches.split(",")):
        for passes, caption in ((0, 0.0), (0, 0.1), (1, 0.0), (2, 0.0)):
            info["results"].append(run(model, cfg, batch, True, passes, caption, args.steps, args.warmup))
    Path(args.out, "bench_scheduled_sampling.json").write_text(json.dumps(info, indent=1))
    print(f"\n{info['device']}, torch {info['torch']}; {args.steps} steps after {args.warmup} warm-up, median, "
          f"gradient checkpointing on, p 0.5, top-k 50")
    print("| clips | rollout passes K | caption dropout | ms/step | x plain | audio frames/s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in info["results"]:
        plain = next(q for q in info["results"] if q["batch"] == r["batch"] and q["passes"] == 0
                     and q["caption_dropout"] == 0)
        print(f"| {r['batch']} | {r['passes']} | {r['caption_dropout']:g} | {r['ms_per_step']:.1f} | "
              f"{r['ms_per_step'] / plain['ms_per_step']:.2f} | {r['audio_frames_per_s']:,.0f} | "
              f"{r['peak_GiB']:.2f} |")


if __name__ == "__main__":
    main()
