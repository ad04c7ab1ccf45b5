"""What sample.py and training's validation share: device and dtype choice, the frame rate, sampling-argument rules,
and finding, loading and running the codec. Errors are ValueErrors; each script reports them in its own words
(check_sampling takes the option names: --topk for sample.py, validation_topk for the config).
"""
from __future__ import annotations

import math
import operator
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CODEC_SUBFOLDERS, build_empty, find_codec_beside, find_model_folder, resolve_folder
from .codec.config import FRAME_RATE  # noqa: F401  (audio frames per second, for both scripts)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(asked: str | None = None) -> torch.device:
    """`asked` (cpu, cuda[:N], mps), else the best available: CUDA, then MPS, then the CPU."""
    if asked:
        try:
            device = torch.device(asked)
        except RuntimeError:
            raise ValueError(f"{asked!r} is not a device: cpu, cuda[:N] or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_sampling(topk, temperature: float, cfg_scale: float = 1.0,
                   names: tuple[str, str, str] = ("topk", "temperature", "cfg_scale")):
    """The one rule for sampling arguments (ValueError otherwise): topk an integer >= 0 (0 = no top-k, 1 = greedy),
    temperature finite and > 0, cfg_scale finite and >= 1 (1 = no guidance). `names` name them in the message."""
    k, t, c = names
    for name, value in ((t, temperature), (c, cfg_scale)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    try:
        whole = operator.index(topk) >= 0
    except TypeError:
        whole = False
    if not whole:
        raise ValueError(f"{k} must be an integer >= 0 (0 = no top-k, 1 = greedy), got {topk!r}")
    if not temperature > 0:
        raise ValueError(f"{t} must be > 0, got {temperature}")
    if cfg_scale < 1:
        raise ValueError(f"{c} must be >= 1 (1 = no guidance), got {cfg_scale}")


# ---------------------------------------------------------------- generation
GENERATION_MODES = ("plain", "eager", "graph")


def default_mode(device: torch.device) -> str:
    """graph (hmtiny.engine's CUDA graphs) on CUDA; plain (hmtiny.generate's loop) elsewhere, where the engine's
    kernels would run their torch references anyway."""
    return "graph" if device.type == "cuda" else "plain"


def generate(model, prompts, max_frames: int, cfg_scale: float, topk: int, temperature: float,
             generator: torch.Generator | None = None, mode: str | None = None, stop_on_eos: bool = True,
             progress=None, engine_options: dict | None = None, timing: dict | None = None) -> list[torch.Tensor]:
    """Frames [n, 8] for each prompt, in eval mode (no LoRA dropout; the model's mode is restored after), through
    `mode` (GENERATION_MODES; None: default_mode). plain: hmtiny.generate, one prompt at a time; eager / graph: an
    hmtiny.engine.Engine for this call only (its cache and graphs are freed when it returns), the prompts in one
    batch, built with `engine_options` (share=True: sample.py owns the model; copy_weights=False: beside training).
    timing: a dict that receives the engine's Engine.last_timing (where the seconds went; left empty by plain)."""
    mode = mode or default_mode(model.codebook0_head.weight.device)
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(GENERATION_MODES)}, not {mode!r}")
    was_training = model.training
    model.eval()
    try:
        if mode == "plain":
            from .generate import generate as plain
            return plain(model, prompts, max_frames, cfg_scale, topk, temperature, generator, stop_on_eos, progress)
        from .engine import Engine
        engine = Engine(model, mode, **(engine_options or {}))
        frames = engine.generate(prompts, max_frames, cfg_scale=cfg_scale, topk=topk, temperature=temperature,
                                 generator=generator, progress=progress, stop_on_eos=stop_on_eos)
        if timing is not None:
            timing.update(engine.last_timing or {})
        return frames
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- a training config's tokenizer and codec
def load_tokenizer(cfg):
    """The PromptTokenizer a TrainConfig names (tokenizer_path / gen_config_path, else found from the model)."""
    from .text import PromptTokenizer, find_text_assets
    from .train_config import ConfigError
    try:
        if cfg.tokenizer_path and cfg.gen_config_path:
            return PromptTokenizer.load(cfg.tokenizer_path, cfg.gen_config_path)
        tok, gen = find_text_assets(cfg.tokenizer_path or cfg.pretrained_model_name_or_path)
        return PromptTokenizer.load(tok, cfg.gen_config_path or gen)
    except (FileNotFoundError, ValueError) as e:
        key = "tokenizer_path" if cfg.tokenizer_path else "pretrained_model_name_or_path"
        raise ConfigError(f"{key}: no usable tokenizer.json + gen_config.json ({e}); set tokenizer_path "
                          f"(and gen_config_path) to HeartMuLaGen's files") from None


def find_codec_folder(cfg) -> Path | str | None:
    """A TrainConfig's codec_path, else the codec found beside its model (hmtiny.checkpoint.find_codec_beside)."""
    return cfg.codec_path or find_codec_beside(cfg.pretrained_model_name_or_path)


# ---------------------------------------------------------------- the codec
def codec_dtype_name(device: torch.device, asked: str | None = None, model_dtype: torch.dtype | None = None,
                     beside_training: bool = False) -> str:
    """`asked` wins; else fp32 beside an fp32 model (its user wants exact numbers); else the device's default
    (hmtiny.codec.precision: tf32 on CUDA for sample.py, bf16 on CUDA beside training, fp32 elsewhere)."""
    from .codec.precision import default_codec_dtype
    if asked:
        return asked
    if model_dtype == torch.float32:
        return "fp32"
    return default_codec_dtype(device, validation=beside_training)


def load_codec_for(where, device: torch.device, dtype_name: str, beside_training: bool = False):
    """HeartCodec for decoding on `device`. Beside training on CUDA it stays in pinned host memory and decodes stage
    by stage on the GPU (each stage's weights are copied over for the stage): between validations it takes no GPU
    memory at all. Elsewhere it lives on `device`."""
    from .codec import load_codec
    on_host = beside_training and device.type == "cuda"
    codec = load_codec(where, "cpu" if on_host else device, dtype_name)
    if on_host:
        codec.pin_memory_()
    return codec


def codec_nbytes(where, dtype_name: str) -> int:
    """Bytes of HeartCodec's decoding weights at `dtype_name` (from its config, nothing loaded)."""
    from .codec import HeartCodec, HeartCodecConfig
    from .codec.precision import codec_torch_dtype
    folder = find_model_folder(resolve_folder(where), CODEC_SUBFOLDERS)
    codec = build_empty(HeartCodec, HeartCodecConfig.from_file(folder / "config.json"))
    return sum(p.numel() for p in codec.parameters()) * codec_torch_dtype(dtype_name).itemsize


def codec_in_background(device: torch.device) -> bool:
    """sample.py loads the codec in a thread while a CUDA model generates: reading files and copying weights leave
    the GPU's compute free. On the CPU or MPS the load would slow the generation it overlaps: it waits."""
    return device.type == "cuda"


def load_codec_beside_model(where, device: torch.device, dtype_name: str, margin: int = 2 * 2**30):
    """HeartCodec for decoding on `device`, loaded while the model generates there (call it once generation's
    memory is allocated, e.g. after the CUDA graphs' capture): on a CUDA device with room for its weights plus
    `margin` bytes, it is read straight there, its copies on a stream of their own so they never wait for the
    generation's kernels; without that room it is kept pinned in host memory (move it over once the model is freed).
    Elsewhere: load_codec_for."""
    if device.type != "cuda":
        return load_codec_for(where, device, dtype_name)
    with torch.cuda.device(device):
        if torch.cuda.mem_get_info(device)[0] < codec_nbytes(where, dtype_name) + margin:
            return load_codec_for(where, device, dtype_name, beside_training=True)
        side = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            codec = load_codec_for(where, device, dtype_name)
        side.synchronize()  # the weights are complete before another stream reads them
        return codec


def warm_triton():
    """Triton's once-per-process set-up, for a thread while the model loads (sample.py on CUDA): Triton's import
    (~0.2 s), the compiler's cache key (a hash of Triton's own files, libtriton's ~500 MB among them: ~0.4 s on this
    repository's CPU machine), and the backend's key (`ptxas --version` in a subprocess). Otherwise the first kernel
    launch of generation pays all of it, even when every kernel is already in Triton's disk cache. Best effort: any
    failure here is left for that launch to meet and report. Imports only triton (never hmtiny or kernels modules,
    which the loading thread imports: no two threads wait on each other's imports). torch._dynamo is not needed:
    the kernels' entry points skip the custom-op wrapper outside torch.compile (kernels/custom_op.py)."""
    try:
        import triton  # noqa: F401
        try:
            from triton.runtime.cache import triton_key
        except ImportError:  # older Tritons
            from triton.compiler.compiler import triton_key
        triton_key()
        from triton.compiler.compiler import make_backend
        from triton.runtime import driver
        make_backend(driver.active.get_current_target()).hash()
    except Exception:
        pass


class Background:
    """fn(*args) run in a thread, started now. result() waits for it and returns its value, or raises its exception
    in the caller's thread, as if the call had been made there. The thread is a daemon: a failure or Ctrl-C in the
    caller never waits for it. `seconds`: how long fn ran."""

    def __init__(self, fn, *args):
        self.value = self.error = self.seconds = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True,
                                       name=f"hmtiny-{getattr(fn, '__name__', 'background')}")
        self.thread.start()

    def _run(self, fn, args):
        t = time.perf_counter()
        try:
            self.value = fn(*args)
        except BaseException as e:  # handed to result()
            self.error = e
        self.seconds = time.perf_counter() - t

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def decode_frames(codec, frames: torch.Tensor, steps: int, guidance: float, seed: int,
                  device: torch.device) -> torch.Tensor:
    """Generated frames [T, 8] -> float32 CPU waveform [2, samples], computed on `device` (a codec kept on the
    host copies each stage's weights there)."""
    staged = codec.device.type != device.type
    return codec.decode(frames.T.contiguous(), steps=steps, guidance=guidance, seed=seed,
                        device=device if staged else None)


def save_npy(path: Path, array: np.ndarray):
    with open(path, "wb") as f:  # a file object: np.save would append .npy to a temporary name
        np.save(f, array)
