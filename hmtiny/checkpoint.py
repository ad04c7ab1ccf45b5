"""Finding, loading and saving safetensors checkpoints (HeartMuLa and HeartCodec share this code).

Weights are loaded into a model built on the meta device (without its random init), tensor by tensor, so host
memory never holds a second full copy; key/shape mismatches are reported all at once.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def resolve_folder(name_or_path: str | os.PathLike, subfolder: str | None = None,
                   allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or a Hugging Face repo id fetched with snapshot_download (only the files needed)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is a file; expected a checkpoint folder")
        return p / subfolder if subfolder else p
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder {name_or_path} does not exist (and is not a repo id 'org/name')")
    from huggingface_hub import snapshot_download
    patterns = allow_patterns or ["*.json", "*.safetensors"]
    if subfolder:
        patterns = [f"{subfolder}/{x}" for x in patterns]
    try:
        root = Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
    except Exception as e:  # offline, missing repo, no auth...
        raise FileNotFoundError(f"could not fetch {name_or_path} from the Hugging Face hub ({type(e).__name__}: {e}). "
                                f"Download it with `hf download {name_or_path} --local-dir DIR` "
                                f"and pass DIR instead.") from e
    return root / subfolder if subfolder else root


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: sharded (index json) or a single file."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    elif (folder / SINGLE_NAME).exists():
        files = [folder / SINGLE_NAME]
    else:
        files = sorted(folder.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.exists()]
    if not files or missing:
        raise FileNotFoundError(f"no safetensors weights in {folder}"
                                + (f" (missing shards {missing})" if missing else ""))
    return files


def damaged(path: Path, why: str) -> ValueError:
    """The error for a weight file that is not a whole safetensors file (here and in hmtiny.stream_load)."""
    return ValueError(f"{path} is not a readable safetensors file ({why}); it may be truncated or damaged: "
                      f"download or write it again")


def open_safetensors(path: Path, device="cpu"):
    """safe_open, with an error that names the file when it is not a whole safetensors file. Opening reads and
    checks the header against the file size, so a truncated or garbage file fails here, cheaply. `device`: where
    get_tensor puts the tensors (CUDA: safetensors copies each one over itself)."""
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except Exception as e:  # SafetensorError (truncated, garbage header), OSError
        raise damaged(path, e) from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def check_weight_files(folder: Path) -> list[Path]:
    """Every weight file of a checkpoint folder opens (headers only): found before anything is loaded."""
    files = weight_files(folder)
    for f in files:
        with open_safetensors(f):
            pass
    return files


def iter_tensors(folder: Path, device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time from every weight file of the checkpoint, read onto `device`."""
    for f in weight_files(folder):
        with open_safetensors(f, device) as sf:
            for key in sf.keys():
                yield key, sf.get_tensor(key)


def read_device(device, direct: bool) -> torch.device:
    """Where load_weights reads tensors for a model on `device`: the CPU, or with `direct` a CUDA device itself
    (safetensors copies each tensor over, casts run there)."""
    device = torch.device(device)
    if not direct or device.type != "cuda":
        return torch.device("cpu")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def checkpoint_tensors(folder: Path, device, direct: bool = False,
                       staged: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The (key, tensor) pairs load_weights assigns to a model on `device`. staged (None: on CUDA unless direct):
    hmtiny.stream_load's threaded reads through pinned buffers, each tensor arriving on `device` in its stored dtype
    (True on the CPU: the same reads into plain buffers). Else safetensors' own reads, onto read_device."""
    if staged is None:
        staged = torch.device(device).type == "cuda" and not direct
    if staged:
        from .stream_load import stream_tensors
        return stream_tensors(weight_files(folder), device)
    return iter_tensors(folder, read_device(device, direct))


class _NoInit(TorchFunctionMode):
    """Inside build_empty: torch.nn.init's fills and the random in-place fills do nothing, and arithmetic on meta
    tensors (a buffer such as `arange(K) * V`, recomputed on the device after loading) and meta ranges (arange,
    linspace) return an empty meta tensor of the result's shape and dtype: every value on the meta device is a
    placeholder."""
    FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_}
    ARITHMETIC = {"add", "sub", "mul", "div", "__add__", "__radd__", "__sub__", "__mul__", "__rmul__", "__truediv__"}
    # on meta these run torch's Python references, whose torch._check imports sympy (~0.4 s of start-up)
    RANGES = {torch.arange, torch.linspace}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        kwargs = kwargs or {}
        if func in self.RANGES and torch.device(kwargs.get("device") or "meta").type == "meta":
            probe = func(*args, **{**kwargs, "device": "cpu"})  # its shape and dtype (buffers' ranges are small)
            return torch.empty(probe.shape, dtype=probe.dtype, device="meta")
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if getattr(func, "__name__", None) in self.ARITHMETIC and not kwargs and len(args) == 2 and tensors \
                and all(t.is_meta for t in tensors):
            # the result's dtype from the op itself on one-element CPU stand-ins (same dimensioned / 0-d kinds, so
            # the same promotion): torch.result_type alone says int64 for int / int, where `/` gives a float
            probe = func(*(torch.zeros((1,) if a.dim() else (), dtype=a.dtype, device="cpu")
                           if isinstance(a, torch.Tensor) else a for a in args))
            # the shape from broadcast_tensors on zero-stride stand-ins (torch.broadcast_shapes imports sympy)
            shape = torch.broadcast_tensors(*(torch.zeros((), device="cpu").expand(t.shape) for t in tensors))[0].shape
            return torch.empty(shape, dtype=probe.dtype, device="meta")
        return func(*args, **kwargs)


def build_empty(cls, *args):
    """cls(*args) on the meta device without its random init: a checkpoint sets every weight after, and torch's
    meta kernels for normal_ and arithmetic import torch._dynamo on first use (about a second of start-up), its
    meta ranges and broadcast_shapes sympy (~0.4 s)."""
    with torch.device("meta"), _NoInit():
        return cls(*args)


def _set_tensor(module: nn.Module, key: str, value: torch.Tensor):
    *path, name = key.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner._buffers[name] = value


def load_weights(module: nn.Module, folder: Path, dtype: torch.dtype | None = None, device="cpu",
                 rename: Callable[[str], str | None] | None = None,
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                 ignore: Callable[[str], bool] | None = None, what: str = "checkpoint",
                 direct: bool = False, staged: bool | None = None) -> nn.Module:
    """Assign the checkpoint's tensors to `module` (typically built on the meta device), one at a time.

    rename: map a stored key to the module's key (None drops it). transform: rewrite a tensor before casting
    (e.g. fold weight norm). ignore: stored keys that may be present but unused. Floating tensors are cast to
    `dtype`; integer/bool buffers keep theirs. Every missing, unexpected or mis-shaped key is listed in one error.
    On the CPU and MPS each tensor is read on the CPU, transformed, cast, then moved to `device`. On CUDA
    (checkpoint_tensors): read in chunks by several threads through pinned buffers, copied over on a side stream
    while the next chunk is read, then transformed and cast on the GPU. direct (CUDA): safetensors reads each tensor
    straight onto the GPU (the codec's background load, which needs no pinned buffers). staged=False: the host read.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    seen, unexpected, bad_shape = set(), [], []
    for key, tensor in checkpoint_tensors(folder, device, direct, staged):
        if ignore and ignore(key):
            continue
        name = rename(key) if rename else key
        if name is None:
            continue
        if transform:
            tensor = transform(name, tensor)
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != expected[name]:
            bad_shape.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {expected[name]}")
            continue
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        _set_tensor(module, name, tensor.to(device))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing or unexpected or bad_shape:
        lines = [f"{what} at {folder} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            more = " ..." if len(unexpected) > 20 else ""
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{more}")
        if bad_shape:
            lines.append(f"  shape mismatches ({len(bad_shape)}): {bad_shape[:20]}")
        raise ValueError("\n".join(lines))
    return module


def usual_mode(*paths: Path):
    """Temporary files/folders are created private (0600/0700): give finished outputs the umask's usual mode."""
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        os.chmod(p, (0o777 if Path(p).is_dir() else 0o666) & ~mask)


def atomic_write(path: Path, write: Callable[[Path], None]):
    """Write through a temporary file in the same folder, then rename: readers never see a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        usual_mode(tmp)
        fsync(Path(tmp))
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync(path: Path):
    """Flush a file's (or a folder's entries') data to disk: a rename is only durable once both the new file and
    its folder are synced, so a power cut cannot leave a renamed but empty file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on Windows: nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def writable_folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (created when missing), or None: checked before a long run,
    not found after it."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None = None,
                 metadata: dict[str, str] | None = None):
    """Save a state dict as model.safetensors, or as shards + model.safetensors.index.json when larger than
    max_shard_bytes. Each file is written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        atomic_write(folder / SINGLE_NAME, lambda p: save_file(shards[0], str(p), metadata=meta))
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(folder / name, lambda p, s=shard: save_file(s, str(p), metadata=meta))
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(folder / INDEX_NAME, lambda p: p.write_text(json.dumps(index, indent=2)))


def save_json(obj, path: Path):
    atomic_write(Path(path), lambda p: p.write_text(json.dumps(obj, indent=2)))


# ---------------------------------------------------------------- HeartMuLa model files
MODEL_SUBFOLDERS = ("HeartMuLa-oss-3B", "HeartMuLa-RL-oss-3B-20260123", "HeartMuLa-oss-3B-happy-new-year")
CODEC_SUBFOLDERS = ("HeartCodec-oss", "HeartCodec-oss-20260123")


def find_model_folder(root: Path, subfolders=MODEL_SUBFOLDERS) -> Path:
    """A folder holding config.json + weights, or heartlib's ckpt/ layout with the model in a subfolder."""
    root = Path(root)
    if (root / "config.json").exists():
        return root
    for name in subfolders:
        if (root / name / "config.json").exists():
            return root / name
    raise FileNotFoundError(f"no config.json in {root} nor in any of its subfolders {list(subfolders)}")


def find_codec_beside(model_name_or_path) -> Path | str | None:
    """Where HeartCodec is, given where the model is: a codec folder inside or beside a local model folder
    (heartlib's ckpt/ layout: HeartCodec-oss/; the built-in tiny default: codec/), the official repo id when the
    model itself comes from the hub, None when a local model has no codec next to it."""
    given = Path(model_name_or_path).expanduser()
    if not given.exists():
        return "HeartMuLa/HeartCodec-oss"
    for root in (given, given.parent):
        for name in CODEC_SUBFOLDERS + ("codec", "HeartCodec"):
            if (root / name / "config.json").is_file():
                return root / name
    return None


def load_heartmula(name_or_path, dtype: torch.dtype = torch.float32, device="cpu", quantize: bool = False,
                   staged: bool | None = None):
    """Build HeartMuLa on the meta device (no random init) and assign the checkpoint's tensors (no second copy).
    quantize: int8 weight-only stacks (hmtiny.quant), each weight quantised on `device` as it is read. staged: how
    the files are read (load_weights; None: the pinned, threaded read on CUDA, the host read elsewhere)."""
    from .config import ModelConfig
    from .model import HeartMuLa
    folder = find_model_folder(resolve_folder(name_or_path))
    cfg = ModelConfig.from_file(folder / "config.json")
    model = build_empty(HeartMuLa, cfg)
    transform = None
    if quantize:
        from .quant import quantize_on_load
        transform = quantize_on_load(model, device)
    load_weights(model, folder, dtype=dtype, device=device, transform=transform, what="HeartMuLa checkpoint",
                 staged=staged)
    model.init_buffers(device)
    return model.eval()


def save_heartmula(model, folder: Path, max_shard_bytes: int | None = None):
    folder = Path(folder)
    save_weights(model.state_dict(), folder, max_shard_bytes=max_shard_bytes)
    save_json(model.cfg.to_dict(), folder / "config.json")
