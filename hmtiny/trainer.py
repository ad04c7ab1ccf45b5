"""The pieces of the training loop that train.py strings together: model/tokenizer/codec set-up, the learning-rate
schedule, checkpoints (written atomically, resumable exactly), metrics and validation clips.

Nothing here unpickles: optimizer moments and RNG states go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoint import (atomic_write, check_weight_files, find_model_folder, fsync, load_heartmula,
                         open_safetensors, read_safetensors, resolve_folder, usual_mode, writable_folder_problem)
from .config import ModelConfig
from .lora import (LORA_WEIGHTS_NAME, inject_lora, load_lora_into, lora_layers, mark_only_lora_trainable,
                   normalize_targets, read_lora, save_lora)
from . import runtime
from .runtime import FRAME_RATE, find_codec_folder, save_npy
from .train_config import ConfigError, TrainConfig

CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "training_state.json"
EARLIER_RUN_MARKERS = (LORA_WEIGHTS_NAME, "metrics.jsonl", "validation")


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, ...): reported without a traceback."""


# ---------------------------------------------------------------- schedule
def lr_factor(name: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based), as diffusers' get_scheduler
    defines them (which SimpleTuner uses): linear warm-up from 0, then constant / cosine / linear decay to 0."""
    if name == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if name == "linear":
        return max(0.0, 1.0 - progress)
    raise ValueError(f"unknown lr_scheduler {name!r}")


# ---------------------------------------------------------------- set-up
def pick_device(cfg: TrainConfig) -> torch.device:
    try:
        return runtime.pick_device(None if cfg.device == "auto" else cfg.device)
    except ValueError as e:
        raise ConfigError(f"device {cfg.device!r}: {e}") from None


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return None if cfg.mixed_precision == "no" else runtime.DTYPES[cfg.mixed_precision]


def base_dtype(cfg: TrainConfig) -> torch.dtype:
    """The frozen base weights: bf16 when asked, else the autocast dtype, else float32."""
    if cfg.base_model_precision == "bf16":
        return torch.bfloat16
    return autocast_dtype(cfg) or torch.float32


def model_folder(cfg: TrainConfig) -> Path:
    try:
        return find_model_folder(resolve_folder(cfg.pretrained_model_name_or_path))
    except FileNotFoundError as e:
        raise ConfigError(f"pretrained_model_name_or_path: {e}") from None


def read_model_config(cfg: TrainConfig) -> ModelConfig:
    """The model's config.json, and every weight file's header checked (a truncated download fails now)."""
    folder = model_folder(cfg)
    try:
        model_cfg = ModelConfig.from_file(folder / "config.json")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(f"pretrained_model_name_or_path: {folder / 'config.json'}: {e}") from None
    try:
        check_weight_files(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"pretrained_model_name_or_path: {e}") from None
    return model_cfg


def check_int8_available(cfg: TrainConfig):
    """The int8 base runs everywhere (Triton on CUDA, plain torch elsewhere); fail early if it cannot import."""
    if not cfg.int8_base:
        return
    try:
        from . import quant  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"base_model_precision {cfg.base_model_precision!r} needs the int8 base (hmtiny.quant), "
                          f"which cannot be imported here ({e}); use 'no_change' or 'bf16'") from None


def build_model(cfg: TrainConfig, device: torch.device, log=print):
    """Frozen base (bf16/fp16/fp32 or int8) + fresh LoRA layers (float32) on the target layers."""
    t0 = time.time()
    try:
        model = load_heartmula(model_folder(cfg), dtype=base_dtype(cfg), device=device, quantize=cfg.int8_base)
    except ValueError as e:  # keys or shapes that do not match config.json
        raise ConfigError(f"pretrained_model_name_or_path: {e}") from None
    try:
        inject_lora(model, cfg.lora_rank, cfg.alpha, cfg.lora_dropout, cfg.lora_target_modules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mark_only_lora_trainable(model)
    model.backbone.gradient_checkpointing = cfg.gradient_checkpointing
    model.decoder.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.dynamo_backend != "no":
        compile_blocks(model, cfg.dynamo_backend, cfg.dynamo_mode)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log(f"model: {n_base / 1e6:.1f}M frozen base parameters ({cfg.base_model_precision}, {base_dtype(cfg)}), "
        f"{n_lora / 1e6:.2f}M LoRA parameters in {len(lora_layers(model))} layers "
        f"(rank {cfg.lora_rank}, alpha {cfg.alpha:g}), loaded in {time.time() - t0:.1f}s on {device}")
    return model


def compile_blocks(model, backend: str, mode: str | None = None):
    """torch.compile every transformer block (SimpleTuner calls this regional compilation): the blocks share one
    graph, fused elementwise work cuts the launch-bound overhead of the many small ops (LoRA, RoPE, RMSNorm).
    The first steps pay the compilation; a new sequence length may recompile once (then shapes go dynamic)."""
    from torch import _dynamo
    _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    for stack in (model.backbone, model.decoder):
        for block in stack.layers:
            block.compile(backend=backend, mode=mode)


def make_optimizer(cfg: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    extra = {"fused": True} if device.type == "cuda" else {"foreach": False}
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay, **extra)


# ---------------------------------------------------------------- output folder
def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            suffix = p.name[len(CHECKPOINT_PREFIX):]
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and (p / STATE_NAME).is_file():
                out.append((int(suffix), p))
    return sorted(out)


def check_output_dir(cfg: TrainConfig) -> Path | None:
    """Decide where the run starts, before anything heavy: the checkpoint to resume (or None). Refuses to start
    a fresh run over an earlier run's results."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    problem = writable_folder_problem(out)
    if problem:
        raise ConfigError(f"output_dir {out}: cannot write there ({problem})")
    ckpts = list_checkpoints(out)
    resume = cfg.resume_from_checkpoint
    if resume == "latest":
        if ckpts:
            return ckpts[-1][1]
        resume = None
    if resume is not None:
        for cand in (Path(resume), out / resume, out / Path(resume).name):
            if (cand / STATE_NAME).is_file():
                return cand
        raise ConfigError(f"resume_from_checkpoint: {resume} is not a checkpoint folder (no {STATE_NAME})")
    earlier = [p.name for p in sorted(out.glob(f"{CHECKPOINT_PREFIX}*"))] if out.is_dir() else []
    earlier += [m for m in EARLIER_RUN_MARKERS if (out / m).exists()]
    if earlier:
        raise ConfigError(f"output_dir {out} already holds an earlier run ({', '.join(earlier[:4])}) and there is "
                          f"no checkpoint to resume (resume_from_checkpoint={cfg.resume_from_checkpoint!r}): choose "
                          f"another output_dir, or remove those files; nothing was overwritten")
    return None


def remove_temporaries(output_dir: Path, log=print):
    """The hidden .NAME.RANDOM.tmp files and folders of a save that was interrupted (kill, power cut, full disk):
    never a finished output, and on the 3B a checkpoint's worth of disk each."""
    stale = [p for folder in (output_dir, output_dir / "validation") if folder.is_dir() for p in folder.glob(".*.tmp")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} temporary file(s) left by an interrupted save: "
            f"{', '.join(p.name for p in stale[:4])}")


# ---------------------------------------------------------------- RNG states
def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    if device.type == "mps":
        tensors["torch_mps"] = torch.mps.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, pystate, pygauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(pystate), pygauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device):
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda":
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    if device.type == "mps" and "torch_mps" in tensors:
        torch.mps.set_rng_state(tensors["torch_mps"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, pystate, pygauss = meta["python"]
    random.setstate((version, tuple(pystate), pygauss))


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(output_dir: Path, step: int, model, optimizer, scaler, state: dict, cfg: TrainConfig,
                    device: torch.device, generators: dict[str, torch.Generator] | None = None,
                    gathered=None) -> Path:
    """output_dir/checkpoint-STEP/: LoRA (or, for model_type full, the whole model: `gathered`, a
    full_finetune.Gathered), optimizer moments, RNG states (the global ones and the named `generators`), data
    position and step. Built in a hidden temporary folder and renamed into place, so a crash never leaves a half
    checkpoint behind."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=output_dir))
    try:
        if gathered is not None:
            from .full_finetune import write_checkpoint_weights
            write_checkpoint_weights(gathered, tmp)
            moments, groups = gathered.moments, gathered.groups
        else:
            save_lora(model, tmp / LORA_WEIGHTS_NAME, cfg.lora_target_modules, {"step": step})
            moments, groups = lora_moments(model, optimizer)
        save_file(moments, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        rng_tensors, rng_meta = rng_state(device)
        rng_tensors |= {f"generator_{name}": g.get_state() for name, g in (generators or {}).items()}
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        full = dict(state, step=step, rng=rng_meta, optimizer_groups=groups,
                    scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                    model_type=cfg.model_type, config=cfg.to_dict())
        if gathered is None:
            full["lora"] = {"rank": cfg.lora_rank, "alpha": cfg.alpha,
                            "targets": normalize_targets(cfg.lora_target_modules)}
        (tmp / STATE_NAME).write_text(json.dumps(full, indent=1))  # last: marks the folder complete
        usual_mode(tmp, *tmp.iterdir())
        for f in [*tmp.iterdir(), tmp]:  # on disk before the rename makes the checkpoint visible
            fsync(f)
        if final.exists():  # a re-run of the same step (resumed run): replace our own earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def lora_moments(model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's moments by "parameter name::key", and its param groups with parameters by name."""
    names = dict(zip((id(p) for p in model.parameters()), (n for n, _ in model.named_parameters())))
    moments, groups = {}, []
    for g in optimizer.param_groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        groups.append(hyper | {"params": [names[id(p)] for p in g["params"]]})
        for p in g["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                moments[f"{names[id(p)]}::{k}"] = v.detach().float().reshape(-1).cpu() if k == "step" \
                    else v.detach().contiguous().cpu()
    return moments, groups


def prune_checkpoints(output_dir: Path, limit: int | None, log=print):
    if limit is None:
        return
    ckpts = list_checkpoints(output_dir)
    for _, p in ckpts[: max(0, len(ckpts) - limit)]:
        shutil.rmtree(p)
        log(f"removed {p.name} (checkpoints_total_limit {limit})")


# What a resumed run may change and still be the same run: how long it goes on, how often it saves and validates,
# where and how fast it runs. Every other setting must equal the checkpoint's.
CHANGEABLE_ON_RESUME = {"max_train_steps", "num_train_epochs", "checkpointing_steps", "checkpoints_total_limit",
                        "resume_from_checkpoint", "resume_anyway", "init_lora", "output_dir", "device",
                        "dynamo_backend", "dynamo_mode", "cuda_graphs", "gradient_checkpointing", "codec_path",
                        "resolution", "num_validation_images"}
PATH_KEYS = {"pretrained_model_name_or_path", "data_backend_config", "tokenizer_path", "gen_config_path"}


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """'key: checkpoint X, now Y' for every run-defining setting that differs from the saved config."""
    out = []
    for key, now in cfg.to_dict().items():
        if key in CHANGEABLE_ON_RESUME or key.startswith("validation_") or key not in saved:
            continue
        if cfg.model_type == "full" and key.startswith("lora_"):  # unused by a full fine-tune
            continue
        old = saved[key]
        if key == "seed" and now is None:  # a resumed run takes the checkpoint's seed
            continue
        same = old == now
        if not same and key in PATH_KEYS and old is not None and now is not None:
            same = Path(old).expanduser().resolve() == Path(now).expanduser().resolve()
        if not same:
            out.append(f"{key}: checkpoint {old!r}, now {now!r}")
    return out


def check_resume(folder: Path, cfg: TrainConfig) -> dict:
    """The checkpoint's saved state, if it is whole and was saved by this same run: same LoRA shape and, unless
    resume_anyway, the same settings (checked before loading anything heavy)."""
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"resume_from_checkpoint: cannot read {folder / STATE_NAME} ({e})") from None
    damaged = f"checkpoint {folder} is damaged"
    start_over = (f"resume from an earlier checkpoint (--resume_from_checkpoint=checkpoint-N) or remove "
                  f"{folder.name}")
    missing = [k for k in ("step", "rng", "optimizer_groups", "sampler")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(f"resume_from_checkpoint: {damaged}: {STATE_NAME} lacks {missing}; {start_over}")
    saved_type = state.get("model_type", (state.get("config") or {}).get("model_type", "lora"))
    if saved_type != cfg.model_type:
        raise ConfigError(f"model_type: checkpoint {folder} was trained with {saved_type!r}, this run asks for "
                          f"{cfg.model_type!r}; use the same value to resume, or a new output_dir")
    full = cfg.model_type == "full"
    try:
        if not full:
            read_lora(folder / LORA_WEIGHTS_NAME)
        for name in ("model.safetensors",) * full + ("optimizer.safetensors", "rng.safetensors"):
            with open_safetensors(folder / name):
                pass
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"resume_from_checkpoint: {damaged}: {e}; {start_over}") from None
    saved = state.get("lora", {})
    want = {"rank": cfg.lora_rank, "alpha": cfg.alpha, "targets": normalize_targets(cfg.lora_target_modules)}
    for key, name in (("rank", "lora_rank"), ("alpha", "lora_alpha"), ("targets", "lora_target_modules")):
        if not full and saved.get(key) != want[key]:
            raise ConfigError(f"{name}: checkpoint {folder} was trained with {saved.get(key)!r}, this run asks for "
                              f"{want[key]!r}; use the same value to resume, or a new output_dir")
    differences = config_differences(state.get("config") or {}, cfg)
    if differences and not cfg.resume_anyway:
        listed = "".join(f"\n  - {d}" for d in differences)
        raise ConfigError(f"output_dir {cfg.output_dir} holds a run with other settings; its checkpoint {folder.name} "
                          f"differs from this config in:{listed}\nTo continue that run with the new settings, pass "
                          f"--resume_anyway=true (config key resume_anyway); to start a new run, choose another "
                          f"output_dir. Nothing was changed.")
    return state


def load_checkpoint(folder: Path, model, optimizer, scaler, cfg: TrainConfig, device: torch.device,
                    generators: dict[str, torch.Generator] | None = None) -> dict:
    """Restore LoRA weights (model_type full: the whole model), optimizer moments, grad scaler and RNG states (and
    those of the named `generators` that the checkpoint holds); return the saved state (step, data position). The
    run's LoRA shape must equal the checkpoint's."""
    state = check_resume(folder, cfg)
    if cfg.model_type == "full":  # every rank calls this: under FSDP the ranks receive their shards
        from .full_finetune import load_checkpoint_weights
        load_checkpoint_weights(folder, state, model, optimizer)
    else:
        load_lora_and_moments(folder, state, model, optimizer)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng = read_safetensors(folder / "rng.safetensors")
    set_rng_state(rng, state["rng"], device)
    for name, g in (generators or {}).items():
        if f"generator_{name}" in rng:
            g.set_state(rng[f"generator_{name}"])
    return state


def load_lora_and_moments(folder: Path, state: dict, model, optimizer):
    load_lora_into(model, folder / LORA_WEIGHTS_NAME)
    moments = read_safetensors(folder / "optimizer.safetensors")
    params = dict(model.named_parameters())
    sd = optimizer.state_dict()
    opt_state = {}
    for g, saved_g in zip(sd["param_groups"], state["optimizer_groups"]):
        for pid, name in zip(g["params"], saved_g["params"]):
            p = params[name]
            entry = {}
            for k in ("step", "exp_avg", "exp_avg_sq"):
                t = moments.get(f"{name}::{k}")
                if t is not None:
                    entry[k] = t.reshape(()) if k == "step" else t.to(p.device)
            if entry:
                opt_state[pid] = entry
        g.update({k: v for k, v in saved_g.items() if k != "params"})
    optimizer.load_state_dict({"state": opt_state, "param_groups": sd["param_groups"]})


# ---------------------------------------------------------------- metrics
class Metrics:
    """output_dir/metrics.jsonl (one JSON object per optimizer step) and a loss curve, loss.svg."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "metrics.jsonl"

    def _lines(self) -> list[tuple[str, dict]]:
        """(line, record) of every whole line; a torn last line (a kill or a full disk mid-write) is skipped."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append((line, record))
        return out

    def truncate_after(self, step: int):
        """On resume, drop lines of the interrupted run past the checkpoint (they will be trained again), and a
        torn last line."""
        if not self.path.is_file():
            return
        keep = [l for l, r in self._lines() if r.get("step", 0) <= step]
        atomic_write(self.path, lambda p: p.write_text("".join(l + "\n" for l in keep)))

    def append(self, record: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        return [r for _, r in self._lines()]

    def write_curve(self):
        points = [(r["step"], r["loss"]) for r in self.read() if "loss" in r]
        if points:
            atomic_write(self.path.parent / "loss.svg", lambda p: p.write_text(loss_svg(points)))


def loss_svg(points: list[tuple[int, float]], width: int = 640, height: int = 320) -> str:
    """A dependency-free line chart of loss against step."""
    pad = 48
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    text = 'font-family="sans-serif" font-size="12"'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/>\n'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>\n'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>\n'
            f'<text x="{pad}" y="{height - pad + 16}" {text}>{x0}</text>\n'
            f'<text x="{width - pad}" y="{height - pad + 16}" {text} text-anchor="end">step {x1}</text>\n'
            f'<text x="{pad - 4}" y="{height - pad}" {text} text-anchor="end">{y0:.3g}</text>\n'
            f'<text x="{pad - 4}" y="{pad + 4}" {text} text-anchor="end">{y1:.3g}</text>\n'
            f'<text x="{width / 2}" y="{pad / 2}" {text} text-anchor="middle">training loss</text>\n'
            f'</svg>\n')


class PeakMemory:
    """The run's peak GPU memory, by phase (training steps, validation's generation, validation's decoding), so the
    user of a small card sees which one sets it. Does nothing off CUDA."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.peaks: dict[str, tuple[float, float]] = {}  # phase -> (GiB allocated, GiB reserved)

    def close(self, phase: str):
        """Count the peak since the previous close towards `phase`, and measure afresh from here."""
        if self.device is None:
            return
        now = (torch.cuda.max_memory_allocated(self.device) / 2**30,
               torch.cuda.max_memory_reserved(self.device) / 2**30)
        before = self.peaks.get(phase, (0.0, 0.0))
        self.peaks[phase] = (max(before[0], now[0]), max(before[1], now[1]))
        torch.cuda.reset_peak_memory_stats(self.device)

    def summary(self) -> str | None:
        if not self.peaks:
            return None
        alloc, reserved = (max(p[i] for p in self.peaks.values()) for i in (0, 1))
        phases = ", ".join(f"{name} {a:.2f}/{r:.2f}" for name, (a, r) in self.peaks.items())
        return f"peak GPU memory: {alloc:.2f} GiB allocated, {reserved:.2f} GiB reserved ({phases})"


# ---------------------------------------------------------------- validation
def keep_graphs_for_validation(free: int, measured_need: int | None, cfg: TrainConfig) -> bool:
    """Whether the training step's CUDA graphs (and their memory) may stay through a validation, so the steps after
    it replay them instead of capturing every shape again. free: the card's free bytes now; measured_need: what an
    earlier validation of this run needed beyond training's memory (None before the first). Before the first
    validation nothing is measured: the graphs stay only where the card has several times what a validation was
    seen to need (the 3B's 30 s clip: ~2.3 GiB over training on an H100, bench/NOTES.md): 8 GiB plus 2 GiB per
    clip and 30 s. A 12-24 GB card frees them; later validations go by the measured need."""
    if measured_need is not None:
        return free >= measured_need + 2**29
    clips = cfg.num_validation_images * max(1.0, cfg.validation_audio_duration / 30)
    return free >= (8 + 2 * clips) * 2**30


class Validator:
    """Generates validation clips with the LoRA-applied model and writes output_dir/validation/step-STEP-N.wav
    (or .npy tokens when no codec weights can be found: said once)."""

    def __init__(self, cfg: TrainConfig, tokenizer, device: torch.device, log=print, memory: PeakMemory | None = None):
        self.cfg, self.tokenizer, self.device, self.log = cfg, tokenizer, device, log
        self.memory = memory or PeakMemory(device)
        self.folder = Path(cfg.output_dir) / "validation"
        self._codec, self._codec_tried, self._said_no_wav, self._said_short = None, False, False, False
        self.prompt = tokenizer.prompt(cfg.validation_prompt, cfg.validation_lyrics)
        from .tiny import is_builtin
        # the built-in tiny model's random weights say EOS at once: give it clips of the asked length instead
        self.stop_on_eos = not is_builtin(model_folder(cfg))

    def codec(self):
        if not self._codec_tried:
            self._codec_tried = True
            where = find_codec_folder(self.cfg)
            reason = "no codec folder found (set codec_path)"
            if where is not None:
                try:
                    name = runtime.codec_dtype_name(self.device, self.cfg.validation_codec_dtype,
                                                    beside_training=True)
                    self._codec = runtime.load_codec_for(where, self.device, name, beside_training=True)
                except Exception as e:  # missing package piece, offline hub, bad weights: tokens still get saved
                    reason = f"could not load HeartCodec from {where} ({type(e).__name__}: {e})"
            if self._codec is None:
                self.log(f"note: {reason}; validation clips are saved as audio tokens (.npy, [frames, 8]) "
                         f"instead of wav")
        return self._codec

    def write_wav(self, stem: Path, wav: torch.Tensor, sample_rate: int) -> Path | None:
        try:
            from .codec import write_audio  # writes atomically (temporary file + rename)
            return write_audio(stem.with_suffix("." + self.cfg.validation_audio_format), wav, sample_rate)
        except ImportError as e:  # soundfile missing: keep the tokens instead
            if not self._said_no_wav:
                self.log(f"note: cannot write wav ({e}); validation clips are saved as audio tokens (.npy)")
                self._said_no_wav = True
            return None

    @torch.no_grad()
    def generate(self, model, max_frames: int, seed: int) -> list[torch.Tensor]:
        """The validation clips' frames, as sample.py makes them (runtime.generate). On CUDA the engine lives for this
        call only: its KV cache and captured graphs are freed before training goes on (kept, they would hold memory
        through every training step)."""
        cfg = self.cfg
        prompts = [tuple(x.to(self.device) if torch.is_tensor(x) else x for x in self.prompt)] \
            * cfg.num_validation_images
        try:
            return runtime.generate(model, prompts, max_frames, cfg.validation_cfg_scale, cfg.validation_topk,
                                    cfg.validation_temperature, torch.Generator(self.device).manual_seed(seed),
                                    stop_on_eos=self.stop_on_eos, engine_options={"copy_weights": False})
        finally:
            self.free_cuda_cache()

    def free_cuda_cache(self):
        """Give cached, unused GPU memory back (the training step's activations before validation, the engine's and
        the codec's after), so validation's peak is the model plus validation's own needs, not the sum."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def run(self, model, step: int) -> list[Path]:
        cfg = self.cfg
        t0 = time.time()
        max_frames = max(1, round(cfg.validation_audio_duration * FRAME_RATE))
        room = model.cfg.backbone.max_seq_len - len(self.prompt[0]) - 1  # the engine needs one spare position
        if max_frames > room:
            if not self._said_short:
                self.log(f"note: validation_audio_duration {cfg.validation_audio_duration}s is {max_frames} frames; "
                         f"the prompt leaves room for {room} in the model's context: generating {room}")
                self._said_short = True
            max_frames = room
        seed = cfg.validation_seed if cfg.validation_seed is not None else (cfg.seed or 0)
        self.memory.close("training")
        self.free_cuda_cache()
        clips = self.generate(model, max_frames, seed)
        self.memory.close("validation generation")
        self.folder.mkdir(parents=True, exist_ok=True)
        codec, written = self.codec(), []
        for i, frames in enumerate(clips):
            stem = self.folder / f"step-{step}-{i}"
            if len(frames) == 0:
                self.log(f"validation clip {i} at step {step}: the model stopped at once (EOS), nothing to decode")
                continue
            path = None
            if codec is not None:
                wav = runtime.decode_frames(codec, frames, cfg.validation_codec_steps, cfg.validation_codec_guidance,
                                            seed + i, self.device)
                path = self.write_wav(stem, wav, getattr(codec, "sample_rate", 48000))
            if path is None:
                path = stem.with_suffix(".npy")
                atomic_write(path, lambda p, f=frames: save_npy(p, f.cpu().numpy()))
            written.append(path)
        self.free_cuda_cache()  # a codec kept on the host freed its estimator graph itself (HeartCodec.detokenize)
        self.memory.close("validation decoding")
        self.log(f"validation at step {step}: {len(written)} clip(s), "
                 f"{sum(len(c) for c in clips) / FRAME_RATE:.1f}s of audio in {time.time() - t0:.1f}s -> {self.folder}")
        return written
