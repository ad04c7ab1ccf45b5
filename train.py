"""LoRA fine-tuning of HeartMuLa from a SimpleTuner-style config.json.

    python train.py                                        # built-in tiny default: CPU, well under 2 minutes
    python train.py config/heartmula-training-demo/config.json
    python train.py env=heartmula-training-demo            # SimpleTuner's shorthand for config/NAME/config.json
    python train.py my.json --learning_rate=5e-5 --init_lora=old/pytorch_lora_weights.safetensors

Writes output_dir/pytorch_lora_weights.safetensors, checkpoint-STEP/ folders, metrics.jsonl, loss.svg and
validation/step-STEP-N.wav. Rerunning the same command resumes from the latest checkpoint
(resume_from_checkpoint defaults to "latest", as in SimpleTuner).

    torchrun --nproc_per_node 4 train.py my.json        # one process per GPU, train_batch_size clips each

Several processes (hmtiny/distributed.py) split every batch of train_batch_size x processes clips between them,
average the LoRA gradients, and leave every file to rank 0.

    python train.py my.json --model_type=full            # every weight trains: output_dir/model.safetensors
    torchrun --nproc_per_node 4 train.py my.json --model_type=full    # the same, sharded with FSDP2

Full fine-tuning lives in hmtiny/full_finetune.py.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
import zlib
from pathlib import Path

# Expandable segments (unless you set PYTORCH_CUDA_ALLOC_CONF yourself): the CUDA allocator maps memory into one
# growing range instead of caching fixed blocks, so what the training step frees is reusable by validation's
# generation and codec (and back) instead of staying reserved beside them. Read when CUDA first allocates.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch

from hmtiny import distributed, full_finetune
from hmtiny.captured_step import CapturedStep
from hmtiny.data import BucketBatchSampler, DatasetError, load_dataset
from hmtiny.lora import (LORA_WEIGHTS_NAME, inject_lora, load_lora_into, lora_parameters, read_lora, save_lora,
                         set_dropout_seed)
from hmtiny.model import HeartMuLa
from hmtiny.trackers import Trackers
from hmtiny.objective import Objective
from hmtiny.runtime import load_tokenizer
from hmtiny.train_config import ConfigError, load_config, parse_cli
from hmtiny.trainer import (Metrics, PeakMemory, TrainingError, Validator, autocast_dtype, build_model,
                            check_int8_available, check_output_dir, check_resume, keep_graphs_for_validation,
                            load_checkpoint, lr_factor, make_optimizer, pick_device, prune_checkpoints,
                            read_model_config, remove_temporaries, save_checkpoint)

USAGE = """usage: python train.py [CONFIG.json | env=NAME] [--key=value ...]

LoRA fine-tuning of HeartMuLa from a SimpleTuner-style config.json.

  CONFIG.json      a training config (SimpleTuner's keys); none: the built-in tiny default (CPU, about a minute)
  env=NAME         SimpleTuner's shorthand for config/NAME/config.json
  --key=value      overrides one config key (also --key value; a bare --flag means true), e.g.
                   --learning_rate=5e-5 --max_train_steps=2000 --output_dir=out/run2
                   --init_lora=old/pytorch_lora_weights.safetensors
                   --resume_anyway=true  (continue a run whose saved settings differ from this config)

Every key, its default and its meaning: the TrainConfig fields in hmtiny/train_config.py; the README's
"Training your own LoRA" and "When something goes wrong" sections explain the outputs and resuming.
Rerunning the same command resumes from the latest checkpoint in output_dir.
Several GPUs: torchrun --nproc_per_node N train.py CONFIG.json (train_batch_size is per GPU).
Full fine-tuning: --model_type=full (one process, or FSDP2 under torchrun); writes output_dir/model.safetensors."""


CAPTURED_STEP_DEVICES = {"cuda"}  # elsewhere it would run uncaptured: the same maths, no gain (tests add "cpu")


def log(msg: str):
    if distributed.is_main():  # one voice for the run: every rank computes the same messages
        print(msg, flush=True)


def fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_lora_plan(cfg, model_cfg):
    """Target layers and init_lora checked on a weightless (meta) model: errors come before the real load."""
    with torch.device("meta"):
        skeleton = HeartMuLa(model_cfg)
        try:
            inject_lora(skeleton, cfg.lora_rank, cfg.alpha, 0.0, cfg.lora_target_modules)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.init_lora:
        try:
            load_lora_into(skeleton, read_lora(cfg.init_lora))
        except ValueError as e:
            raise ConfigError(f"init_lora: {e}") from None


def check_everything(argv: list[str]):
    """Everything that can fail cheaply, before the model is loaded (on every rank: each needs the data)."""
    config_path, overrides = parse_cli(argv)
    cfg = load_config(config_path, overrides)
    log(f"config: {cfg.config_path}" + (f" with overrides {sorted(overrides)}" if overrides else ""))
    device = pick_device(cfg)
    if distributed.world() > 1:
        if device.type not in ("cuda", "cpu"):
            raise ConfigError(f"device {cfg.device!r}: several processes train on CUDA (NCCL) or CPU (gloo), "
                              f"not {device.type}")
        if device.type == "cuda":
            device = torch.device("cuda", distributed.local_rank())
    check_int8_available(cfg)
    resume_from = check_output_dir(cfg)
    saved_seed = check_resume(resume_from, cfg)["config"].get("seed") if resume_from is not None else None
    if cfg.seed is None:  # a resumed run keeps its seed (data order, crops); a new one draws and prints one
        cfg.seed = saved_seed if saved_seed is not None else random.SystemRandom().randrange(2**31)
        log(f"seed: {cfg.seed} ({'from ' + resume_from.name if saved_seed is not None else 'random'}; "
            f"pass --seed={cfg.seed} to repeat this run)")
    if resume_from is not None and cfg.init_lora:
        log(f"note: resuming from {resume_from}: init_lora is not used")
        cfg.init_lora = None
    model_cfg = read_model_config(cfg)
    if cfg.model_type == "full":
        full_finetune.check(cfg, distributed.world())
    else:
        check_lora_plan(cfg, model_cfg)
    tokenizer = load_tokenizer(cfg)
    dataset = load_dataset(cfg.data_backend_config, tokenizer, model_cfg, seed=cfg.seed, log=log)
    log(f"data: {dataset.summary()}")
    return cfg, device, resume_from, tokenizer, dataset


def dropout_seed(run_seed: int, step: int, micro: int, rank: int) -> int:
    """The LoRA dropout seed of one micro-batch: a resumed run draws the masks an uninterrupted one would."""
    return zlib.crc32(f"{run_seed}/{step}/{micro}/{rank}".encode())


def next_share(sampler: BucketBatchSampler, dataset, every_rank_computes: bool = False):
    """(epoch, this rank's part of the next batch or None, its loss weight, the whole batch's audio frames).
    The weight is the part's share of the batch's frames times the number of ranks: the loss is a mean over
    frames, so with the gradients then averaged over ranks a step equals one process's on the whole batch
    (one process: weight 1). every_rank_computes (FSDP, whose forward and backward are collectives): a rank
    left without a clip gets the batch's first one at weight 0."""
    epoch, indices = sampler.next_batch()
    mine = distributed.my_share(indices)
    part = dataset.batch(mine or indices[:1], epoch) if mine or every_rank_computes else None
    my_frames = int(part["audio_frame_mask"][:, 1:].sum()) if mine else 0
    all_frames = int(distributed.all_reduce_sum(torch.tensor([my_frames])))
    return epoch, part, my_frames * distributed.world() / all_frames, all_frames


def train(argv: list[str]) -> Path:
    world = distributed.init()
    cfg, device, resume_from, tokenizer, dataset = distributed.together(lambda: check_everything(argv),
                                                                        "checking the config and data")
    cfg.seed = distributed.rank0_value(cfg.seed)  # one data order and LoRA start, also when drawn at random
    # one global batch of train_batch_size clips per rank; each rank trains on its share (distributed.my_share)
    sampler = BucketBatchSampler(dataset.lengths, cfg.train_batch_size * world, seed=cfg.seed)
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(sampler) / accum)
    total = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    validate = cfg.validation_prompt is not None and not cfg.validation_disable
    memory = PeakMemory(device)
    rank0 = distributed.is_main()  # rank 0 alone writes files; the others wait for it in distributed.together
    validator = Validator(cfg, tokenizer, device, log, memory) if validate and rank0 else None
    out = Path(cfg.output_dir)
    metrics = Metrics(out)
    if rank0:
        remove_temporaries(out, log)
    trackers = Trackers(cfg, log) if rank0 else None  # report_to: TensorBoard / W&B beside metrics.jsonl

    # ---- model, optimizer, state
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    full = cfg.model_type == "full"  # every weight trains (hmtiny/full_finetune.py; FSDP2 when world > 1)
    model = full_finetune.build(cfg, device, log) if full else build_model(cfg, device, log)
    objective = Objective(cfg, device, cfg.seed)
    params = list(model.parameters()) if full else lora_parameters(model)
    if not full:  # a full fine-tune starts from the same pretrained weights on every rank
        distributed.broadcast_parameters(params)
    optimizer = make_optimizer(cfg, params, device)
    amp = autocast_dtype(cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    # CUDA: forward + backward replayed from captured graphs (the eager step is host-bound); fp16's loss scaling,
    # torch.compile'd blocks and full fine-tuning (FSDP's hooks and collectives) keep the eager step
    captured = (CapturedStep(model, params, amp, cfg.decoder_fraction, log=log)
                if device.type in CAPTURED_STEP_DEVICES and cfg.cuda_graphs and not scaler.is_enabled()
                and cfg.dynamo_backend == "no" and not full else None)
    step, last_ckpt = 0, None
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scaler, cfg, device, objective.generators)
        step, last_ckpt = int(state["step"]), resume_from
        sampler.load_state_dict(state["sampler"], log=log)
        if state.get("world_size", 1) != world:
            log(f"note: {resume_from.name} was trained by {state.get('world_size', 1)} process(es), this run has "
                f"{world}: the batch is now {cfg.train_batch_size} x {world} clips")
        if rank0:
            metrics.truncate_after(step)
        log(f"resumed from {resume_from} at step {step} (epoch {sampler.epoch}, batch {sampler.index})")
    elif cfg.init_lora:
        load_lora_into(model, cfg.init_lora)
        log(f"LoRA initialised from {cfg.init_lora}")
    model.train()

    def checkpoint():  # every rank keeps the same data position and step: rank 0's files serve a resume on any
        nonlocal last_ckpt  # number of processes
        last_ckpt = out / f"checkpoint-{step}"
        gathered = full_finetune.gather(model, optimizer) if full else None  # every rank: FSDP gathers to rank 0
        distributed.together(lambda: save(gathered), f"saving {last_ckpt}", rank0_only=True)

    def save(gathered):
        position = {"sampler": sampler.state_dict()} | ({"world_size": world} if world > 1 else {})
        save_checkpoint(out, step, model, optimizer, scaler, position, cfg, device, objective.generators,
                        gathered)
        prune_checkpoints(out, cfg.checkpoints_total_limit, log)
        metrics.write_curve()
        log(f"saved {last_ckpt}")

    validation_need = None  # bytes the first validation needed beyond what training held (CUDA)

    def validation():
        nonlocal validation_need
        if captured is not None and captured.shapes:
            # the graphs' memory goes to generation and the codec unless the card has room for both (the first
            # validation measures what it needs)
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
            if not keep_graphs_for_validation(free, validation_need, cfg):
                captured.release()  # the next steps capture their shapes again
        held = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            held = torch.cuda.memory_reserved(device)
        # a full fine-tune validates a copy in the validation dtype (gathered to rank 0 under FSDP)
        generator = full_finetune.validation_model(model, cfg, device) if full else model
        distributed.together(lambda: validate_on_rank0(generator), f"validating at step {step}", rank0_only=True)
        if device.type == "cuda" and validation_need is None:
            peak = max((r for name, (_, r) in memory.peaks.items() if name.startswith("validation")), default=0.0)
            validation_need = max(0, int(peak * 2**30) - held)

    def validate_on_rank0(generator):
        # generation draws its own seeded noise; fork_rng keeps the training RNG streams untouched anyway
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            clips = validator.run(generator, step)
        trackers.audio(clips, step)

    def finish(result: Path, gathered):
        if full:
            full_finetune.save_model(gathered.weights, out, cfg, log)
        else:
            save_lora(model, result, cfg.lora_target_modules, {"step": step})
        metrics.write_curve()
        log(f"saved {result}")

    def report(record: dict, eta: float):
        metrics.append(record)
        trackers.log(record)
        log(f"step {record['step']}/{total} | epoch {record['epoch']} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.2e} | {record['frames_per_s']:,.0f} audio frames/s"
            f"{f' (+{c:.1f} s capturing)' if (c := record['capture_s']) else ''} | ETA {fmt_time(eta)}")

    def check_finite(loss_val: float, grad_norm: float, at_step: int):
        if not math.isfinite(loss_val):  # the same value on every rank: they all stop here, rank 0 says why
            distributed.stop(TrainingError(
                f"loss is {loss_val} at step {at_step}: stopping before the update. The last good checkpoint is "
                f"{last_ckpt or 'none (no checkpoint was written yet)'}; try a lower learning_rate, mixed_precision "
                f"bf16 instead of fp16, or check the data"))
        if not math.isfinite(grad_norm) and not scaler.is_enabled():
            distributed.stop(TrainingError(
                f"gradient norm is {grad_norm} at step {at_step}: stopping before the update. The last good "
                f"checkpoint is {last_ckpt or 'none'}; try a lower learning_rate"))

    def settle(done: dict, now: float):
        """Read a queued step's numbers (a host sync), stop if one is not finite, log and record it."""
        nonlocal train_s
        loss_val, loss_c0, loss_rest, grad_norm = done.pop("values").tolist()
        check_finite(loss_val, grad_norm, done["step"])
        dt = now - done.pop("t0")
        train_s += dt
        eta = train_s / (done["step"] - start_step) * (total - done["step"])
        # frames/s is the step's own speed: a graph capture (once per batch shape) is left out and shown apart
        record = dict(done, loss=loss_val, loss_c0=loss_c0, loss_rest=loss_rest, grad_norm=grad_norm,
                      frames_per_s=done["frames"] / max(dt - done["capture_s"], 1e-9), step_s=dt,
                      elapsed_s=now - t_start)
        distributed.together(lambda: report(record, eta), f"writing step {done['step']}'s metrics", rank0_only=True)

    log(f"training {total} steps ({steps_per_epoch} per epoch) of {cfg.train_batch_size} clip(s) x {accum} "
        f"accumulation{f' x {world} processes' if world > 1 else ''} = {cfg.train_batch_size * accum * world} "
        f"clip(s) per step, {cfg.lr_scheduler} lr {cfg.learning_rate:g}, {cfg.mixed_precision} autocast, "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
        f"{'' if cfg.dynamo_backend == 'no' else ', blocks compiled (' + cfg.dynamo_backend + ')'}, on {device}")
    if objective.enabled:
        log(f"objective: {objective.describe()}")
    if world > 1 and (cfg.lora_dropout > 0 or cfg.decoder_fraction < 1 or objective.enabled):
        log("note: the ranks draw from the same seeded random streams (dropout, decoder_fraction, objective) and a "
            "resume gives every rank rank 0's saved streams: with these on, a resumed run goes on like the "
            "uninterrupted one in distribution, not draw for draw")
    if validate and cfg.validation_on_startup and step == 0:
        validation()

    def on_device(cpu_batch: dict) -> dict:
        return {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}

    # With fused AdamW a step's loss and gradient norm are read one step late, once the next step is queued, so
    # the GPU does not wait for Python between steps. A non-finite step still changes nothing: `bad` turns on
    # (and stays on) on the device, and the optimizer skips its update while it is on (AdamW's `found_inf`, as
    # GradScaler uses it); the host stops at the next read. Otherwise the numbers are read before the update.
    read_late = bool(optimizer.defaults.get("fused")) and not scaler.is_enabled() and not full
    bad = torch.zeros((), device=device)
    queued = None  # the step whose numbers are not read yet
    start_step, t_start, train_s = step, time.time(), 0.0  # train_s: step time only, for an ETA without validation
    while step < total:
        lr = cfg.learning_rate * lr_factor(cfg.lr_scheduler, step, cfg.lr_warmup_steps, total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.time()
        capture_s0 = captured.capture_s if captured is not None else 0.0
        losses, frames = torch.zeros(3, device=device), 0
        for micro in range(accum):
            epoch, cpu_batch, weight, batch_frames = next_share(sampler, dataset, full and world > 1)
            frames += batch_frames
            if cpu_batch is None:  # a short last batch of the epoch left this rank no clip
                continue
            set_dropout_seed(model, dropout_seed(cfg.seed, step, micro, distributed.rank()))
            if captured is not None:  # it copies the CPU batch itself; the objective (when on) needs it on device
                extra = objective.inputs(model, on_device(cpu_batch), step) if objective.enabled else {}
                losses += captured(cpu_batch, weight / accum, extra) * (weight / accum)  # [loss, c0, rest]
                continue
            batch = on_device(cpu_batch)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, info = model.loss(batch["tokens"], batch["tokens_mask"], batch["audio_frame_mask"],
                                        batch["muq_idx"], decoder_fraction=cfg.decoder_fraction,
                                        muq_embed=batch.get("muq_embed"), **objective.inputs(model, batch, step))
            scaler.scale(loss * weight / accum).backward()
            losses += torch.stack([loss.detach(), info["loss_c0"], info["loss_rest"]]).float() * weight / accum
        if not full:  # FSDP averages a full fine-tune's gradients itself
            distributed.average_gradients(params)
        losses = distributed.all_reduce_sum(losses) / world
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP's sharded parameters give a DTensor
            grad_norm = grad_norm.full_tensor()
        values = torch.cat([losses, grad_norm.reshape(1).float()])
        if read_late:
            bad.add_((~values.isfinite().all()).float()).clamp_(max=1)
            optimizer.found_inf = bad
        else:  # one host sync, before the update
            loss_val, *_, norm_val = values.tolist()
            check_finite(loss_val, norm_val, step + 1)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=captured is None)  # the captured step accumulates into these tensors
        step += 1

        if queued is not None:
            settle(queued, t0)  # the previous step, long finished on the GPU: no wait
        queued = {"step": step, "epoch": epoch, "lr": lr, "frames": frames, "t0": t0, "values": values,
                  "capture_s": (captured.capture_s - capture_s0) if captured is not None else 0.0}
        save_now = cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0
        validate_now = (validate and cfg.validation_step_interval and step % cfg.validation_step_interval == 0
                        and step < total)
        if not read_late or save_now or validate_now or step == total:
            settle(queued, time.time())
            queued = None
        if save_now:
            checkpoint()
        if validate_now:
            validation()

    # ---- the end: final checkpoint, the LoRA, a last validation
    if step == start_step:
        log(f"training already finished at step {step}")
    if cfg.checkpointing_steps and (last_ckpt is None or last_ckpt.name != f"checkpoint-{step}"):
        checkpoint()
    result = out / (full_finetune.MODEL_NAME if full else LORA_WEIGHTS_NAME)
    gathered = full_finetune.gather(model) if full else None  # every rank: FSDP gathers to rank 0
    distributed.together(lambda: finish(result, gathered), f"saving {result.name}", rank0_only=True)
    if validate and not any((out / "validation").glob(f"step-{step}-*")):  # read after rank 0 wrote (a barrier)
        validation()
    memory.close("training")
    if memory.summary():
        log(memory.summary())
    if captured is not None and captured.captures:
        log(f"captured the training step {captured.captures} time(s) ({captured.capture_s:.1f} s in all; each padded "
            f"length once, again when a batch had more loss rows than its graph's room, and after a validation that "
            f"needed the graphs' memory)")
    if trackers:
        trackers.close()
    return result



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        train(argv)
    except distributed.StoppedElsewhere:  # another rank printed the error
        return 1
    except (ConfigError, DatasetError, TrainingError, OSError) as e:  # OSError: a full disk, a vanished folder
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume from the last checkpoint in output_dir",
              file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
