"""Take a LoRA to other tools: a PEFT adapter folder in SimpleTuner's naming, or a full checkpoint with the LoRAs
merged in, in the official layout that heartlib (and every tool built on it) loads.

    python -m hmtiny.export --lora out/pytorch_lora_weights.safetensors --format peft --out my-peft
    python -m hmtiny.export --model ckpt --lora out:0.8 [--lora other.safetensors] --merge --out merged
    python -m hmtiny.export --model ckpt --lora out --merge --out ckpt-mine --ckpt-layout

The PEFT folder holds adapter_model.safetensors + adapter_config.json (keys
`base_model.model.backbone.layers.N.self_attn.q_proj.lora_A.weight`, `mlp.gate_proj`, ...: SimpleTuner's Hugging
Face Llama names) and simpletuner_init_lora.safetensors, the same tensors under the `transformer.` prefix that
SimpleTuner's `init_lora` looks for. Our `--lora DIR` / `init_lora` read the folder back exactly.

The merged folder holds model.safetensors (official key names, the base checkpoint's dtype) + its config.json;
with --ckpt-layout it is heartlib's ckpt/ folder instead: HeartMuLa-oss-3B/, tokenizer.json and gen_config.json
copied, HeartCodec-oss linked to the codec found beside the base. An int8 model is dequantised before merging.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import (MODEL_SUBFOLDERS, atomic_write, find_codec_beside, find_model_folder, load_heartmula,
                         resolve_folder, save_json, save_weights)
from .lora import (HF_NAMES, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, LoRAWeights, apply_loras, read_lora,
                   split_lora_spec)

PEFT_PREFIX = "base_model.model."  # PeftModel wraps the model: its module paths start here
SIMPLETUNER_INIT_NAME = "simpletuner_init_lora.safetensors"
SIMPLETUNER_PREFIX = "transformer."  # SimpleTuner's init_lora looks for the PeftModel's keys under this name
# our module names -> the Hugging Face Llama names of SimpleTuner's port (the same weights, no permutation)
OURS_TO_HF = {ours: hf for hf, ours in HF_NAMES.items()} | {"attn": "self_attn"}


def hf_module_path(path: str) -> str:
    return ".".join(OURS_TO_HF.get(p, p) for p in path.split("."))


# ---------------------------------------------------------------- LoRA -> PEFT folder
def peft_adapter(lora: LoRAWeights, base_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter_model tensors, adapter_config) for a LoRA whose layers share one rank and scale."""
    ranks = {a.shape[0] for a, _, _ in lora.modules.values()}
    scales = {s for _, _, s in lora.modules.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"LoRA {lora.path}: its layers have ranks {sorted(ranks)} and scales {sorted(scales)}; "
                         f"one PEFT config holds a single rank and alpha")
    rank, scale = ranks.pop(), scales.pop()
    alpha = lora.alpha if lora.alpha / rank == scale else scale * rank
    tensors, targets = {}, []
    for path, (a, b, _) in lora.modules.items():
        name = hf_module_path(path)
        targets.append(name)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    config = {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              # every adapted layer by path: PEFT then wraps exactly these, whatever subset was trained
              "target_modules": sorted(targets), "bias": "none", "use_dora": False, "use_rslora": False,
              "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
              "base_model_name_or_path": base_model, "revision": None, "inference_mode": True}
    return tensors, config


def write_peft(lora: LoRAWeights | str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """Write a PEFT adapter folder (see the module doc). Returns the folder."""
    lora = lora if isinstance(lora, LoRAWeights) else read_lora(lora)
    out = Path(out)
    tensors, config = peft_adapter(lora, base_model)
    meta = {"format": "pt"}
    atomic_write(out / PEFT_WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=meta))
    init = {SIMPLETUNER_PREFIX + k: v for k, v in tensors.items()}
    atomic_write(out / SIMPLETUNER_INIT_NAME, lambda p: save_file(init, str(p), metadata=meta))
    save_json(config, out / PEFT_CONFIG_NAME)
    return out


# ---------------------------------------------------------------- LoRAs merged into a full checkpoint
def merge_into(model: nn.Module, loras) -> nn.Module:
    """Fold [(LoRA, scale)] into the model's weights. Int8 layers are made dense first (bf16, their compute
    dtype): a float update added to int8 weights would be lost to their rounding."""
    from .quant import Int8Linear, dequantize_model
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        dequantize_model(model, torch.bfloat16)
    return apply_loras(model, loras, merge=True)


def export_merged(model_path, loras, out: str | Path, ckpt_layout: bool = False, log=print) -> Path:
    """Load the base as stored (its dtype), merge the LoRAs, write model.safetensors + config.json. Returns the
    model folder written."""
    source = find_model_folder(resolve_folder(model_path))
    model = load_heartmula(source, dtype=None)  # None: every tensor keeps the checkpoint's dtype
    merge_into(model, loras)
    out = Path(out)
    folder = out / MODEL_SUBFOLDERS[0] if ckpt_layout else out
    save_weights(model.state_dict(), folder)
    # the base's own config.json, metadata included: heartlib reads it as it read the original
    atomic_write(folder / "config.json", lambda p: shutil.copyfile(source / "config.json", p))
    if ckpt_layout:
        _complete_ckpt_layout(model_path, source, out, log)
    return folder


def _complete_ckpt_layout(model_path, source: Path, out: Path, log):
    from .text import find_text_assets
    try:
        for f in find_text_assets(source):
            atomic_write(out / f.name, lambda p, f=f: shutil.copyfile(f, p))
    except FileNotFoundError as e:
        log(f"note: no tokenizer.json/gen_config.json copied ({e}); put HeartMuLaGen's two files in {out}")
    codec = find_codec_beside(model_path)
    if isinstance(codec, Path):
        link = out / "HeartCodec-oss"
        if not link.exists():
            os.symlink(codec.resolve(), link, target_is_directory=True)  # the codec is large and unchanged
        log(f"{link} -> {codec.resolve()}")
    else:
        log(f"note: no local HeartCodec beside {model_path}: download HeartMuLa/HeartCodec-oss into "
            f"{out / 'HeartCodec-oss'}")


# ---------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hmtiny.export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--lora", action="append", required=True, metavar="PATH[:SCALE]",
                    help="LoRA file or folder (ours or PEFT); repeatable with --merge")
    ap.add_argument("--format", choices=["peft"], help="write the LoRA as a PEFT adapter folder")
    ap.add_argument("--merge", action="store_true", help="merge the LoRAs into --model's weights")
    ap.add_argument("--model", help="base model folder, heartlib ckpt/ folder or repo id (with --merge)")
    ap.add_argument("--ckpt-layout", action="store_true", help="with --merge: write heartlib's ckpt/ folder")
    ap.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    return ap.parse_args(argv)


def run(a) -> Path:
    if bool(a.format) == a.merge:
        raise ValueError("choose one of --format peft (convert a LoRA) or --merge (full checkpoint)")
    out = Path(a.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty folder: choose a new one")
    if a.format:
        if len(a.lora) != 1 or a.model or a.ckpt_layout:
            raise ValueError("--format peft converts one --lora (no --model, --ckpt-layout or :SCALE)")
        path, scale = split_lora_spec(a.lora[0])
        if scale != 1.0:
            raise ValueError("--format peft writes the LoRA as trained: drop the :SCALE")
        folder = write_peft(path, out)
        print(f"wrote {folder / PEFT_WEIGHTS_NAME}, {folder / PEFT_CONFIG_NAME} and {folder / SIMPLETUNER_INIT_NAME}")
        return folder
    if not a.model:
        raise ValueError("--merge needs --model (the base the LoRAs were trained on)")
    loras = [(read_lora(p), s) for p, s in map(split_lora_spec, a.lora)]
    folder = export_merged(a.model, loras, out, a.ckpt_layout)
    print(f"wrote {folder / 'model.safetensors'} and {folder / 'config.json'} "
          f"({', '.join(f'{Path(l.path).name}:{s:g}' for l, s in loras)} merged)")
    return folder


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
