"""model_type "full": every weight of HeartMuLa trains (both stacks, embeddings, heads, muq_linear).

One process: a plain module whose parameters are the float32 master weights; mixed_precision bf16/fp16 is autocast
compute over them. Several processes (torchrun): FSDP2 (`fully_shard`) on every transformer block and then on the
whole model, so float32 parameters, gradients and AdamW moments are each split over the ranks; with bf16 the
blocks compute in bf16 (MixedPrecisionPolicy) and gradients are reduced in float32.

Checkpoints hold the whole model and optimizer under the official key names (gathered to rank 0 under FSDP), so a
run resumes on any number of processes. The final output is output_dir/model.safetensors (official keys, bf16
when trained with bf16 mixed precision, else float32) with config.json, tokenizer.json and gen_config.json beside
it and a link to the codec, which makes output_dir a model folder for `sample.py --model`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from . import distributed
from .checkpoint import SINGLE_NAME, atomic_write, load_heartmula, read_safetensors, save_weights
from .model import HeartMuLa
from .train_config import ConfigError, TrainConfig

MODEL_NAME = SINGLE_NAME  # model.safetensors: the trained weights in a checkpoint and in output_dir
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's host only


def check(cfg: TrainConfig, world: int):
    """What full fine-tuning over several processes cannot do (found before the model loads)."""
    if world == 1:
        return
    if cfg.mixed_precision == "fp16":
        raise ConfigError("mixed_precision 'fp16' with model_type 'full' over several processes is not supported "
                          "(each rank would skip overflowing steps on its own shard): use 'bf16'")
    if cfg.scheduled_sampling_max_step_offset > 0:
        raise ConfigError("scheduled_sampling_max_step_offset > 0 with model_type 'full' over several processes is "
                          "not supported (the rollout reads sharded weights outside the model's forward): train "
                          "on one process, or set it to 0")


def sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------- the model
def build(cfg: TrainConfig, device: torch.device, log=print) -> HeartMuLa:
    """The pretrained model in float32, every parameter trainable; sharded with FSDP2 when world > 1."""
    import time
    from .trainer import compile_blocks, model_folder
    t0 = time.time()
    try:
        model = load_heartmula(model_folder(cfg), dtype=torch.float32, device=device)
    except ValueError as e:  # keys or shapes that do not match config.json
        raise ConfigError(f"pretrained_model_name_or_path: {e}") from None
    model.requires_grad_(True)
    model.backbone.gradient_checkpointing = cfg.gradient_checkpointing
    model.decoder.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.dynamo_backend != "no":
        compile_blocks(model, cfg.dynamo_backend, cfg.dynamo_mode)
    n = sum(p.numel() for p in model.parameters())
    world = distributed.world()
    if world > 1:
        shard(model, cfg)
    compute = "float32" if cfg.mixed_precision == "no" else cfg.mixed_precision
    log(f"model: full fine-tuning of {n / 1e6:.1f}M parameters (float32 master weights, {compute} compute"
        f"{f', FSDP2 over {world} processes' if world > 1 else ''}), loaded in {time.time() - t0:.1f}s on {device}")
    if device.type == "cuda":
        log(memory_estimate(n, world))
    return model


def shard(model: HeartMuLa, cfg: TrainConfig):
    """FSDP2: each block is one all-gather unit (gathered for its forward and again for its backward); the root
    holds the embeddings, heads and final norms. model.loss is the forward the training loop calls."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    policy = MixedPrecisionPolicy()
    if cfg.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for stack in (model.backbone, model.decoder):
        for block in stack.layers:
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_method(model, "loss")


def memory_estimate(n_params: int, world: int) -> str:
    """Weights, gradients and AdamW moments per GPU: 4 + 4 + 8 bytes a parameter, split over the ranks."""
    four = n_params * 4 / world / 2**30
    return (f"memory: {4 * four:.1f} GiB per GPU{f' ({world} processes)' if world > 1 else ''} for float32 "
            f"weights, gradients and AdamW moments ({four:.1f} + {four:.1f} + {2 * four:.1f}), plus activations"
            f"{' and the blocks FSDP gathers' if world > 1 else ''}")


# ---------------------------------------------------------------- gathered state
@dataclass
class Gathered:
    """The whole model and optimizer on rank 0's host, by official parameter name."""
    weights: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]  # "name::exp_avg", "name::exp_avg_sq", "name::step"
    groups: list[dict]  # optimizer param groups, params by name


def gather(model, optimizer=None) -> Gathered | None:
    """Every rank calls this (FSDP all-gathers); rank 0 gets the state, the others None."""
    weights = get_model_state_dict(model, options=GATHER)
    moments, groups = {}, []
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=GATHER)
        if distributed.is_main():
            for name, entry in osd["state"].items():
                for k, v in entry.items():
                    moments[f"{name}::{k}"] = v.detach().float().reshape(-1) if k == "step" else v.contiguous()
            groups = [dict(g, betas=list(g["betas"])) for g in osd["param_groups"]]
    return Gathered(weights, moments, groups) if distributed.is_main() else None


def write_checkpoint_weights(gathered: Gathered, folder: Path):
    """A checkpoint's model.safetensors (float32 master weights)."""
    save_weights(gathered.weights, folder)


def load_checkpoint_weights(folder: Path, state: dict, model, optimizer):
    """Weights and optimizer moments of a checkpoint, on every rank: rank 0 reads the files, FSDP sends each
    rank its shards."""
    weights, osd = {}, {}
    if distributed.is_main():
        weights = read_safetensors(folder / MODEL_NAME)
        moments = read_safetensors(folder / "optimizer.safetensors")
        entries: dict[str, dict] = {}
        for key, t in moments.items():
            name, k = key.rsplit("::", 1)
            entries.setdefault(name, {})[k] = t.reshape(()) if k == "step" else t
        osd = {"state": entries, "param_groups": [dict(g, betas=tuple(g["betas"])) for g in state["optimizer_groups"]]}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed.world() > 1)
    set_model_state_dict(model, weights, options=options)
    # not strict: a parameter that never had a gradient (muq_linear's weight without reference audio) has no
    # moments yet, as in the uninterrupted run
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=distributed.world() > 1, strict=False))


# ---------------------------------------------------------------- validation and the final model
def validation_model(model, cfg: TrainConfig, device: torch.device) -> HeartMuLa | None:
    """The model validation generates with, on rank 0 (None elsewhere); every rank calls this. One process whose
    weights are already in the validation dtype: the model itself. Else a copy in that dtype (bf16 with bf16
    mixed precision: what the engine runs fastest), from the gathered weights under FSDP."""
    from .trainer import base_dtype
    dtype = base_dtype(cfg)
    if not sharded(model) and model.codebook0_head.weight.dtype == dtype:
        return model
    gathered = gather(model) if sharded(model) else Gathered(model.state_dict(), {}, [])
    return plain_model(model.cfg, gathered.weights, dtype, device) if gathered is not None else None


def plain_model(model_cfg, weights: dict[str, torch.Tensor], dtype: torch.dtype, device) -> HeartMuLa:
    with torch.device("meta"):
        copy = HeartMuLa(model_cfg)
    copy.load_state_dict({k: v.detach().to(device=device, dtype=dtype) for k, v in weights.items()}, assign=True)
    copy.init_buffers(device)
    return copy.eval()


def saved_dtype(cfg: TrainConfig) -> torch.dtype:
    """bf16 like the official checkpoint when trained with bf16 compute; else the float32 weights as trained."""
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def save_model(weights: dict[str, torch.Tensor], out: Path, cfg: TrainConfig, log=print) -> Path:
    """output_dir/model.safetensors + the base's config.json, tokenizer.json and gen_config.json, and a link to
    the codec when it is a local folder: `sample.py --model output_dir` then needs nothing else."""
    from .runtime import find_codec_folder
    from .trainer import model_folder
    dtype = saved_dtype(cfg)
    save_weights({k: v.to(dtype) for k, v in weights.items()}, out)
    copy_file(model_folder(cfg) / "config.json", out / "config.json")  # metadata included, as heartlib reads it
    for f in text_assets(cfg):
        copy_file(f, out / f.name)
    codec = find_codec_folder(cfg)
    link = out / "HeartCodec-oss"
    if isinstance(codec, Path) or (codec is not None and Path(codec).is_dir()):
        if not (link.exists() or link.is_symlink()):
            link.symlink_to(Path(codec).resolve(), target_is_directory=True)  # large and unchanged: not copied
    else:
        log(f"note: no local codec to link beside {out}; sample with --codec {codec or 'HeartMuLa/HeartCodec-oss'}")
    return out / MODEL_NAME


def copy_file(src: Path, dst: Path):
    atomic_write(dst, lambda p: shutil.copyfile(src, p))


def text_assets(cfg: TrainConfig) -> tuple[Path, Path]:
    """The tokenizer.json and gen_config.json this run used (found as runtime.load_tokenizer finds them)."""
    from .text import find_text_assets
    if cfg.tokenizer_path and cfg.gen_config_path:
        return Path(cfg.tokenizer_path), Path(cfg.gen_config_path)
    tok, gen = find_text_assets(cfg.tokenizer_path or cfg.pretrained_model_name_or_path)
    return Path(tok), Path(cfg.gen_config_path or gen)
