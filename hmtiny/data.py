"""Training data: precomputed audio tokens + tags + lyrics -> padded [B, S, 9] batches.

Sources are listed in a SimpleTuner `multidatabackend.json` (a list of backends; `disabled` ones are skipped,
`dataset_type: text_embeds` ones too: HeartMuLa has no text encoder):

- `type: local`, `dataset_type: audio`, `instance_data_dir`, `caption_strategy: textfile`,
  `metadata_backend: discovery`. Every audio file under the folder (wav/flac/aiff/alac/mp3/ogg/m4a/aac/wma/opus;
  the audio itself is never read) is a sample: tags from NAME.txt, lyrics from NAME.lyrics (absent = instrumental),
  tokens from NAME.tokens.npy or NAME.tokens.npz, or else from a `metadata.jsonl` / `metadata.csv` in the folder
  whose rows name the audio file (`file_name`) and give `audio_tokens_path` (relative to the folder) or
  `audio_tokens` (a nested list; in csv a JSON string). Such rows may also carry `tags` / `lyrics`.
- `type: huggingface`, `dataset_name` (a local folder or a hub dataset repo id), `config.audio_caption_fields`
  (columns joined with ", " into the tags; default ["tags"]), `config.lyrics_column` (default "lyrics"; missing
  or null = instrumental), `split` (default "train"), `revision` (hub only), `subset` / `config_name`: rows with
  `audio_tokens` or `audio_tokens_path` (relative to the dataset folder; in a hub dataset it must stay inside it).
  With the `datasets` library installed it reads them (its splits, configs and cache); without it, the *.parquet
  (needs pyarrow) or *.jsonl files whose path names the split (all files when none names any split), under the
  `subset` folder when given.

Every backend may set `repeats` (SimpleTuner's meaning: 0 = each clip once per epoch, 2 = three times) and
`disabled`. Other SimpleTuner backend keys are accepted with a note (they do nothing here); an unknown key is an
error naming the backend.

Relative paths in a backend are looked up in the working directory (as SimpleTuner does), else beside the
multidatabackend.json (the built-in configs under hmtiny/assets only beside it).

A sample may carry a reference-audio embedding for the prompt's MuQ row (hmtiny/reference.py): NAME.muq.npy
beside the audio, or a `muq_embedding` (list) / `muq_embedding_path` column; absent = zeros, as the release does.

Token arrays are [frames, K] or [K, frames] integers in 0..codebook_size-1 (K = 8 codebooks). Every sample is
checked when the data is loaded and every problem (missing file, ambiguous [8, 8] shape, other codebook count,
ids out of range, non-integer or empty array, unreadable file) is reported in one error naming the file and
sample, before training starts. Files are read with np.load(allow_pickle=False): never pickle, never torch.load.

Prompts are tokenised once at load time. A clip whose prompt + frames exceed the backbone context is cropped to
a random window (seeded by (seed, epoch, sample), so a resumed run crops identically), with a warning at load.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .codec.config import FRAME_RATE
from .config import ModelConfig
from .text import PromptTokenizer

AUDIO_EXTENSIONS = (".wav", ".flac", ".aiff", ".aif", ".alac", ".mp3", ".ogg", ".m4a", ".aac", ".wma", ".opus")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TOKEN_SUFFIXES = (".tokens.npy", ".tokens.npz")
MUQ_SUFFIX = ".muq.npy"  # NAME.muq.npy: optional reference-audio embedding of NAME (hmtiny/reference.py)
NPZ_KEYS = ("tokens", "audio_tokens")  # preferred array names inside an .npz
SPLIT_NAMES = ("train", "validation", "valid", "test", "eval", "dev")
HUB_SHARD = re.compile(r"data/[^/]+-\d{5}-of-\d{5}[^/]*")  # data/train-00000-of-00003.parquet

# Backend keys acted on, per type. SimpleTuner's other backend keys (images, caches, buckets, cloud storage) are
# accepted with a note; anything else is a typo.
COMMON_BACKEND_KEYS = {"id", "type", "dataset_type", "disabled", "disable", "repeats", "caption_strategy",
                       "metadata_backend"}
BACKEND_KEYS = {"local": COMMON_BACKEND_KEYS | {"instance_data_dir"},
                "huggingface": COMMON_BACKEND_KEYS | {"dataset_name", "config", "split", "revision", "subset",
                                                      "config_name", "huggingface"}}
SIMPLETUNER_BACKEND_KEYS = set("""
audio audio_column aws_access_key_id aws_bucket_name aws_data_prefix aws_endpoint_url aws_max_pool_connections
aws_region_name aws_secret_access_key aws_session_token bucket_report cache_dir cache_dir_conditioning_image_embeds
cache_dir_vae cache_file_suffix caption_column caption_filter_list caption_shuffle composite_image_column
conditioning conditioning_config conditioning_data conditioning_image_embed_batch_size conditioning_image_embeds
conditioning_type crop crop_aspect crop_aspect_buckets crop_style csv_cache_dir csv_caption_column csv_file
csv_url_column default delete_nsfw_images delete_problematic_images delete_unwanted_images
disable_multiline_split disable_validation end_epoch end_step fallback_caption_column filename_column
hash_filenames identifier_includes_extension image_column image_embeds image_processing_batch_size
instance_data_root instance_prompt is_i2v is_regularisation_data is_regularization_data max_frames
max_num_samples max_upscale_threshold maximum_aspect_ratio maximum_image_size metadata_update_interval min_frames
minimum_aspect_ratio minimum_image_size num_frames num_proc only_instance_prompt parquet prepend_instance_prompt
preserve_data_backend_cache probability quality_column quality_thresholds read_batch_size resolution
resolution_type s2v_datasets scan_for_errors shuffle skip_file_discovery slider_strength source_dataset_id
start_epoch start_step streaming target_downsample_size text_cache_disable text_cache_ondemand text_embeds
text_encoder_batch_size timestep_sampling_offset train_batch_size vae_cache_clear_each_epoch vae_cache_disable
vae_cache_ondemand video video_column write_batch_size
""".split())


class DatasetError(ValueError):
    """Every problem found in the training data, reported together."""

    def __init__(self, problems: list[str], max_shown: int = 50):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:max_shown])
        more = f"\n  ... and {len(problems) - max_shown} more" if len(problems) > max_shown else ""
        super().__init__(f"{len(problems)} problem(s) in the training data:\n{shown}{more}")


# ---------------------------------------------------------------- token arrays
def check_audio_tokens(arr, num_codebooks: int = 8, codebook_size: int = 8192) -> np.ndarray:
    """Validate a token array and return it as [frames, num_codebooks] int16/int32. Raises ValueError."""
    try:
        arr = np.asarray(arr)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"audio tokens are not a rectangular array ({e})") from None
    if arr.dtype == object:
        raise ValueError("audio tokens are not a rectangular integer array")
    if arr.size == 0:
        raise ValueError(f"audio tokens are empty (shape {list(arr.shape)})")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"audio tokens have dtype {arr.dtype}; they must be integers "
                         f"(codec ids 0..{codebook_size - 1})")
    if arr.ndim != 2:
        raise ValueError(f"audio tokens have shape {list(arr.shape)}; expected [frames, {num_codebooks}] "
                         f"or [{num_codebooks}, frames]")
    K = num_codebooks
    if arr.shape == (K, K):
        raise ValueError(f"audio tokens have the ambiguous shape {list(arr.shape)}: both axes have {K} entries, so "
                         f"frames and codebooks cannot be told apart (give at least {K + 1} frames or drop it)")
    if arr.shape[1] != K:
        if arr.shape[0] != K:
            raise ValueError(f"audio tokens have shape {list(arr.shape)}: neither axis has {K} codebooks")
        arr = arr.T
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= codebook_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"audio token id {bad} is out of range: codec ids are 0..{codebook_size - 1}")
    dtype = np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    return np.ascontiguousarray(arr.astype(dtype))


def read_token_file(path: Path) -> np.ndarray:
    """An .npy array, or an .npz archive's `tokens` / `audio_tokens` / only array. Never unpickles."""
    if not path.is_file():
        raise ValueError(f"token file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ValueError(f"token file {path} is not .npy or .npz (other formats, e.g. torch .pt, are not read: "
                         f"they can run code when loaded)")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"cannot read {path} without unpickling Python objects ({e}); save a plain integer "
                         f"array with np.save") from None
    except Exception as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            keys = list(data.files)
            key = next((k for k in NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{path} holds arrays {keys}: name the token array 'tokens'")
            try:
                return data[key]
            except ValueError as e:
                raise ValueError(f"cannot read array {key!r} of {path} without unpickling ({e})") from None
    return data


# ---------------------------------------------------------------- samples and examples
@dataclass
class Sample:
    """One training clip as found on disk: `source` names it in messages (a file, or file:row)."""
    source: str
    tags: str
    lyrics: str
    audio_tokens: np.ndarray  # [frames, K], validated
    muq_embedding: np.ndarray | None = None  # [muq_dim] reference-audio embedding; None = zeros (the release's)


def build_example(prompt_tokens: torch.Tensor, prompt_mask: torch.Tensor, muq_idx: int,
                  audio_tokens, empty_id: int = 0, muq_embedding: np.ndarray | None = None) -> dict:
    """Prompt rows followed by one row per audio frame (docs/model.md): audio rows have codebook columns 0..K-1 live
    and the text column = empty_id, not live. A reference embedding, when given, goes along as `muq_embed`."""
    audio = torch.as_tensor(np.asarray(audio_tokens), dtype=torch.long)
    T, K = audio.shape
    P, C = prompt_tokens.shape
    if C != K + 1:
        raise ValueError(f"prompt has {C} columns but audio has {K} codebooks (+1 text column expected)")
    audio_rows = torch.cat([audio, torch.full((T, 1), empty_id, dtype=torch.long)], dim=1)
    audio_mask = torch.ones(T, C, dtype=torch.bool)
    audio_mask[:, -1] = False
    frame_mask = torch.zeros(P + T, dtype=torch.bool)
    frame_mask[P:] = True
    example = {"tokens": torch.cat([prompt_tokens.long(), audio_rows]),
               "tokens_mask": torch.cat([prompt_mask.bool(), audio_mask]),
               "audio_frame_mask": frame_mask, "muq_idx": int(muq_idx)}
    if muq_embedding is not None:
        example["muq_embed"] = torch.as_tensor(muq_embedding, dtype=torch.float32)
    return example


def collate(examples: Sequence[dict], pad_to: int | None = None, empty_id: int = 0) -> dict:
    """Right-pad to the longest example (or pad_to): padding rows hold empty_id with nothing live.
    -> tokens [B,S,9] long, tokens_mask [B,S,9] bool, audio_frame_mask [B,S] bool, muq_idx [B], lengths [B], and
    muq_embed [B, muq_dim] (zeros where absent) only when some example has a reference embedding."""
    lengths = [e["tokens"].shape[0] for e in examples]
    S = max(lengths)
    if pad_to is not None:
        if pad_to < S:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({S} rows)")
        S = pad_to
    B, C = len(examples), examples[0]["tokens"].shape[1]
    tokens = torch.full((B, S, C), empty_id, dtype=torch.long)
    mask = torch.zeros(B, S, C, dtype=torch.bool)
    frames = torch.zeros(B, S, dtype=torch.bool)
    for b, (e, n) in enumerate(zip(examples, lengths)):
        tokens[b, :n], mask[b, :n], frames[b, :n] = e["tokens"], e["tokens_mask"], e["audio_frame_mask"]
    out = {"tokens": tokens, "tokens_mask": mask, "audio_frame_mask": frames,
           "muq_idx": torch.tensor([e["muq_idx"] for e in examples], dtype=torch.long),
           "lengths": torch.tensor(lengths, dtype=torch.long)}
    refs = [e.get("muq_embed") for e in examples]
    dim = next((r.shape[0] for r in refs if r is not None), None)
    if dim is not None:
        out["muq_embed"] = torch.stack([torch.zeros(dim) if r is None else r for r in refs])
    return out


# ---------------------------------------------------------------- multidatabackend.json
ASSETS = Path(__file__).resolve().parent / "assets"


def _resolve(path: str, base: Path) -> Path:
    """A backend's relative path: the working directory (as SimpleTuner), else beside the multidatabackend.json.
    The built-in configs under hmtiny/assets always use their own folder."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    beside = base / p
    if ASSETS in base.resolve().parents or base.resolve() == ASSETS:
        return beside
    return p if p.exists() or not beside.exists() else beside


def read_utf8(path: Path) -> str:
    """A text file's content; a file that is not UTF-8 (or cannot be read) raises a ValueError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                         f"save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror or e})") from None


def _read_text(path: Path) -> str | None:
    return read_utf8(path) if path.is_file() else None


def _text_field(row: dict, key: str, where: str) -> str | None:
    """A metadata row's tags/lyrics: text or absent; a number or a list is a mistake, not text to train on."""
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: {key} must be text, got {type(value).__name__} {value!r}")
    return value


def _jsonl_rows(path: Path, problems: list[str]):
    """(line number, parsed value) of every non-blank line; lines that are not JSON go to `problems`."""
    try:
        text = read_utf8(path)
    except ValueError as e:
        problems.append(str(e))
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{n}: not valid JSON ({e})")


def _read_metadata(folder: Path, problems: list[str]) -> dict[str, dict]:
    """metadata.jsonl / metadata.csv rows keyed by the audio file's path relative to the folder."""
    rows: dict[str, dict] = {}
    for name in METADATA_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".jsonl"):
            items = list(_jsonl_rows(path, problems))
        else:
            try:
                items = [(n, r) for n, r in enumerate(csv.DictReader(io.StringIO(read_utf8(path), newline="")), 2)]
            except (ValueError, csv.Error) as e:
                problems.append(f"{path}: {e}" if str(path) not in str(e) else str(e))
                continue
        for n, row in items:
            key = row.get("file_name") if isinstance(row, dict) else None
            if not key:
                problems.append(f"{path}:{n}: row has no 'file_name' naming its audio file")
                continue
            if not isinstance(key, str):
                problems.append(f"{path}:{n}: file_name must be the audio file's path as text, got {key!r}")
                continue
            if isinstance(row.get("audio_tokens"), str):  # csv cell: a JSON list
                try:
                    row["audio_tokens"] = json.loads(row["audio_tokens"])
                except json.JSONDecodeError:
                    problems.append(f"{path}:{n}: audio_tokens is not a JSON list")
                    continue
            row["_where"] = f"{path}:{n}"
            rows[Path(key).as_posix()] = row
    return rows


def _tokens_from_row(row: dict, base: Path, where: str, inside: bool = False) -> np.ndarray:
    """The row's token array. inside: the path must stay within `base` (a downloaded dataset names files of its
    own; an absolute or `..` path would read anything on this machine)."""
    if row.get("audio_tokens") is not None:
        return row["audio_tokens"]
    if row.get("audio_tokens_path"):
        if not isinstance(row["audio_tokens_path"], str):
            raise ValueError(f"{where}: audio_tokens_path must be a file path as text, got "
                             f"{row['audio_tokens_path']!r}")
        p = Path(row["audio_tokens_path"])
        if inside and (p.is_absolute() or ".." in p.parts or str(p).startswith("~")):
            raise ValueError(f"audio_tokens_path {str(p)!r} leaves the downloaded dataset folder (absolute and "
                             f"'..' paths are refused in hub datasets)")
        p = p.expanduser()
        return read_token_file(p if p.is_absolute() else base / p)
    raise ValueError(f"{where} has neither audio_tokens nor audio_tokens_path")


def sample_muq_embedding(row: dict, base: Path, beside: Path | None, dim: int) -> np.ndarray | None:
    """A sample's optional reference-audio embedding: NAME.muq.npy beside the audio, else the row's `muq_embedding`
    (a list) or `muq_embedding_path` (relative to `base`); None when there is none. ValueError names the file."""
    from .reference import check_muq_embedding, read_muq_embedding
    if beside is not None and beside.is_file():
        return read_muq_embedding(beside, dim)
    if row.get("muq_embedding") is not None:
        value = row["muq_embedding"]
        if isinstance(value, str):  # csv cell: a JSON list
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError("muq_embedding is not a JSON list") from None
        return check_muq_embedding(value, dim, f"muq_embedding of {row.get('_where', 'this row')}")
    if row.get("muq_embedding_path"):
        p = Path(row["muq_embedding_path"]).expanduser()
        return read_muq_embedding(p if p.is_absolute() else base / p, dim)
    return None


def load_local_backend(backend: dict, base: Path, cfg: ModelConfig, problems: list[str]) -> list[Sample]:
    bid = backend.get("id", "?")
    if "instance_data_dir" not in backend:
        problems.append(f"backend {bid!r}: 'instance_data_dir' is required for type local")
        return []
    folder = _resolve(backend["instance_data_dir"], base)
    if not folder.is_dir():
        problems.append(f"backend {bid!r}: instance_data_dir {folder} is not a folder")
        return []
    for key, allowed in (("caption_strategy", ("textfile",)), ("metadata_backend", ("discovery",))):
        if backend.get(key, allowed[0]) not in allowed:
            problems.append(f"backend {bid!r}: {key} {backend[key]!r} is not supported for local audio "
                            f"(use {allowed[0]!r})")
            return []
    metadata = _read_metadata(folder, problems)
    audio_files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
                         and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not audio_files:
        problems.append(f"backend {bid!r}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in {folder}")
    samples = []
    for audio in audio_files:
        stem = audio.with_suffix("")
        row = metadata.get(audio.relative_to(folder).as_posix(), {})
        token_files = [p for p in (Path(f"{stem}{s}") for s in TOKEN_SUFFIXES) if p.is_file()]
        where = str(audio)
        try:
            tags = _read_text(Path(f"{stem}.txt"))
            if tags is None and row:
                tags = _text_field(row, "tags", row["_where"])
            lyrics = _read_text(Path(f"{stem}.lyrics"))
            if lyrics is None and row:
                lyrics = _text_field(row, "lyrics", row["_where"])
            if tags is None:
                problems.append(f"{audio}: no tags ({stem.name}.txt is missing)")
                continue
            if token_files:
                where = f"{audio} (tokens {token_files[0].name})"
                raw = read_token_file(token_files[0])
            elif row:
                where = f"{audio} (tokens from {row['_where']})"
                raw = _tokens_from_row(row, folder, row["_where"])
            else:
                raise ValueError(f"no tokens: expected {stem.name}.tokens.npy, {stem.name}.tokens.npz or a "
                                 f"{' / '.join(METADATA_FILES)} row with audio_tokens_path or audio_tokens")
            tokens = check_audio_tokens(raw, cfg.audio_num_codebooks, cfg.codebook_size)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        try:
            muq = sample_muq_embedding(row, folder, Path(f"{stem}{MUQ_SUFFIX}"), cfg.muq_dim)
        except ValueError as e:
            problems.append(f"{audio}: {e}")
            continue
        samples.append(Sample(str(audio), tags, lyrics or "", tokens, muq))
    return samples


def _names_split(relative: str, split: str) -> bool:
    """`data/train-00000.parquet`, `train.jsonl`, `train/x.jsonl` all name the split "train"."""
    return split in re.split(r"[/\\._-]", relative)


def _dataset_files(root: Path, split: str = "train") -> list[Path]:
    """The split's .parquet/.jsonl files under root; every file when no file names any split (one-split data).
    As in the `datasets` library, the hub's shard layout `data/SPLIT-00000-of-00001.*` wins over other files."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl") and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    shards = [p for p in files if HUB_SHARD.fullmatch(p.relative_to(root).as_posix())]
    files = shards or files
    chosen = [p for p in files if _names_split(p.relative_to(root).as_posix(), split)]
    if chosen:
        return chosen
    if any(_names_split(p.relative_to(root).as_posix(), s) for p in files for s in SPLIT_NAMES):
        return []  # the files are split, just not into this split
    return files


def _dataset_rows(path: Path, problems: list[str]):
    if path.suffix == ".jsonl":
        for n, row in _jsonl_rows(path, problems):
            yield f"{path}:{n}", row
        return
    try:
        import pyarrow.parquet as pq
    except ImportError:
        problems.append(f"reading {path} needs pyarrow (`pip install pyarrow`), or provide the dataset as "
                        f".jsonl files")
        return
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's ArrowInvalid and friends: a damaged or non-parquet file
        problems.append(f"{path}: not a readable parquet file ({type(e).__name__}: {e})")
        return
    for n, row in enumerate(rows):
        yield f"{path}:row {n}", row


def _fetch_dataset(name: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, repo_type="dataset", revision=revision,
                                      allow_patterns=["*.parquet", "*.jsonl", "*.npy", "*.npz"]))
    except Exception as e:  # offline, missing repo, no auth...
        raise FileNotFoundError(f"dataset {name!r} is neither a local folder nor reachable on the Hugging Face hub "
                                f"({type(e).__name__}: {e})") from e


def _datasets_library():
    """The `datasets` package when installed (an optional dependency), else None."""
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def hf_options(backend: dict) -> dict:
    """dataset_name, split, revision, subset of a huggingface backend; top-level keys win over SimpleTuner's
    `huggingface` block. `config_name` is another name for `subset`."""
    block = backend.get("huggingface") or {}

    def get(key):
        return backend.get(key, block.get(key) if isinstance(block, dict) else None)
    return {"name": get("dataset_name"), "split": get("split") or "train", "revision": get("revision"),
            "subset": get("subset") or get("config_name")}


def _rows_from_files(root: Path, opts: dict, bid: str, problems: list[str]):
    """The dependency-free reader: the split's jsonl/parquet files (under the `subset` folder when given)."""
    if opts["subset"]:
        if not (root / opts["subset"]).is_dir():
            have = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            problems.append(f"backend {bid!r}: subset {opts['subset']!r} is not a folder of {root} (folders: {have})")
            return
        root = root / opts["subset"]
    files = _dataset_files(root, opts["split"])
    if not files:
        problems.append(f"backend {bid!r}: no .parquet or .jsonl files for split {opts['split']!r} in {root}")
    for path in files:
        yield from _dataset_rows(path, problems)


def _rows_from_datasets(datasets, source: str, local: bool, opts: dict, bid: str, problems: list[str]):
    """Rows read by the `datasets` library (its split/config resolution and cache). For a local folder the
    subset is a sub-folder, as in the plain reader; on the hub it is the dataset's config name."""
    where = f"{source}[{opts['split']}]"
    try:
        if local:
            ds = datasets.load_dataset(source, data_dir=opts["subset"], split=opts["split"])
        else:
            ds = datasets.load_dataset(source, opts["subset"], split=opts["split"], revision=opts["revision"])
    except Exception as e:  # missing split/config, unreachable hub, malformed files...
        problems.append(f"backend {bid!r}: the datasets library could not load {where}: {type(e).__name__}: {e}")
        return
    for n, row in enumerate(ds):
        yield f"{where} row {n}", row


def load_hf_backend(backend: dict, base: Path, cfg: ModelConfig, problems: list[str]) -> list[Sample]:
    bid = backend.get("id", "?")
    opts = hf_options(backend)
    name = opts["name"]
    if not name:
        problems.append(f"backend {bid!r}: 'dataset_name' is required for type huggingface")
        return []
    local = _resolve(name, base)
    datasets = _datasets_library()
    root: Path | None = local if local.is_dir() else None
    if root is None and datasets is None:
        try:
            root = _fetch_dataset(name, opts["revision"])
        except FileNotFoundError as e:
            problems.append(f"backend {bid!r}: {e}")
            return []
    options = backend.get("config") or {}
    caption_fields = options.get("audio_caption_fields") or ["tags"]
    if isinstance(caption_fields, str):
        caption_fields = [caption_fields]
    lyrics_column = options.get("lyrics_column") or "lyrics"
    if datasets is not None:
        rows = _rows_from_datasets(datasets, str(local) if local.is_dir() else name, local.is_dir(), opts, bid,
                                   problems)
    else:
        rows = _rows_from_files(root, opts, bid, problems)
    samples = []
    for where, row in rows:
        if not isinstance(row, dict):
            problems.append(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            continue
        missing = [c for c in caption_fields if row.get(c) is None]
        if len(missing) == len(caption_fields):
            problems.append(f"{where}: no tags (column(s) {caption_fields} missing or empty)")
            continue
        parts = [row[c] for c in caption_fields if row.get(c) is not None]
        bad = [c for c, p in zip(caption_fields, parts) if not isinstance(p, str) and not
               (isinstance(p, list) and all(isinstance(x, str) for x in p))]
        if bad:
            problems.append(f"{where}: {bad[0]} must be text or a list of texts, got {row[bad[0]]!r}")
            continue
        tags = ", ".join(", ".join(p) if isinstance(p, list) else p for p in parts)
        lyrics = row.get(lyrics_column) or ""
        if not isinstance(lyrics, str):
            problems.append(f"{where}: {lyrics_column} must be text, got {type(lyrics).__name__} {lyrics!r}")
            continue
        try:
            if root is None and row.get("audio_tokens") is None and row.get("audio_tokens_path"):
                root = _fetch_dataset(name, opts["revision"])  # the hub rows name token files: fetch those
            tokens = check_audio_tokens(_tokens_from_row(row, root, where, inside=not local.is_dir()),
                                        cfg.audio_num_codebooks, cfg.codebook_size)
        except (ValueError, FileNotFoundError) as e:
            problems.append(f"{where}: {e}")
            continue
        try:
            muq = sample_muq_embedding(row, root, None, cfg.muq_dim)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        samples.append(Sample(where, tags, lyrics, tokens, muq))
    return samples


BACKEND_LOADERS: dict[str, Callable] = {"local": load_local_backend, "huggingface": load_hf_backend}


def check_backend_keys(backend: dict, bid: str, base: Path, log: Callable[[str], None], problems: list[str]) -> int:
    """Unknown keys (typos) are problems, SimpleTuner's keys that do nothing here one note. Returns `repeats`."""
    ours = BACKEND_KEYS[backend["type"]]
    unknown = sorted(k for k in backend if k not in ours and k not in SIMPLETUNER_BACKEND_KEYS)
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(ours | SIMPLETUNER_BACKEND_KEYS), n=1, cutoff=0.75)
        problems.append(f"backend {bid!r}: unknown key {key!r}" + (f": did you mean {close[0]!r}?" if close else ""))
    ignored = sorted(k for k in backend if k not in ours and k in SIMPLETUNER_BACKEND_KEYS)
    if ignored:
        log(f"note: backend {bid!r}: ignoring SimpleTuner option(s) that do nothing for HeartMuLa here: "
            f"{', '.join(ignored)}")
    opts = hf_options(backend) if backend["type"] == "huggingface" else {}
    if opts.get("revision") and opts.get("name") and _resolve(opts["name"], base).is_dir():
        log(f"note: backend {bid!r}: revision applies to hub datasets; {opts['name']} is a local folder")
    repeats = backend.get("repeats", 0)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        problems.append(f"backend {bid!r}: repeats must be a whole number >= 0 (0 = each clip once per epoch), "
                        f"got {repeats!r}")
        return 0
    return repeats


def read_backends(config: str | os.PathLike | list, cfg: ModelConfig, log: Callable[[str], None] = print,
                  problems: list[str] | None = None) -> list[Sample]:
    """All samples of the enabled audio backends of a multidatabackend.json (path or already-parsed list).
    Raises DatasetError listing every problem, or appends them to `problems` when given."""
    raise_now = problems is None
    problems = [] if problems is None else problems
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"data backend config {path} does not exist")
        try:
            backends = json.loads(read_utf8(path))
        except json.JSONDecodeError as e:
            raise DatasetError([f"{path}: not valid JSON ({e})"]) from None
        except ValueError as e:
            raise DatasetError([str(e)]) from None
        base, where = path.parent, str(path)
    else:
        backends, base, where = config, Path.cwd(), "data backend config"
    if isinstance(backends, dict):
        backends = [backends]
    if not isinstance(backends, list) or not all(isinstance(b, dict) for b in backends):
        raise DatasetError([f"{where}: expected a JSON list of backend objects"])
    samples: list[Sample] = []
    for i, backend in enumerate(backends):
        bid = backend.get("id", f"#{i}")
        if backend.get("disabled", backend.get("disable", False)):  # SimpleTuner accepts both spellings
            continue
        kind = str(backend.get("dataset_type", "audio")).lower()
        if kind == "text_embeds":
            log(f"note: skipping backend {bid!r} (dataset_type text_embeds): HeartMuLa has no text encoder")
            continue
        if kind != "audio":
            problems.append(f"backend {bid!r}: dataset_type {kind!r} is not supported: HeartMuLa trains on "
                            f"dataset_type 'audio' (precomputed audio tokens)")
            continue
        btype = backend.get("type")
        if btype not in BACKEND_LOADERS:
            problems.append(f"backend {bid!r}: type {btype!r} is not supported (use one of {list(BACKEND_LOADERS)})")
            continue
        repeats = check_backend_keys(backend, bid, base, log, problems)
        found = BACKEND_LOADERS[btype](backend, base, cfg, problems)
        if repeats and found:
            log(f"backend {bid!r}: {len(found)} clips, each seen {repeats + 1} times per epoch (repeats {repeats})")
        samples += found * (repeats + 1)
    if not problems and not samples:
        problems.append(f"{where}: no enabled audio backend with samples")
    if problems and raise_now:
        raise DatasetError(problems)
    return samples


# ---------------------------------------------------------------- dataset
class AudioTokenDataset:
    """Samples with their prompts tokenised once; example(i, epoch) crops over-long clips deterministically."""

    def __init__(self, samples: list[Sample], tokenizer: PromptTokenizer, cfg: ModelConfig, seed: int = 0,
                 log: Callable[[str], None] = print, problems: list[str] | None = None):
        self.samples, self.seed, self.empty_id = samples, seed, tokenizer.gen.empty_id
        self.max_len = cfg.backbone.max_seq_len
        self.prompts, cropped = [], []
        problems = list(problems or [])  # earlier ones (files) are reported together with the prompt checks
        for s in samples:
            tokens, mask, muq_idx = tokenizer.prompt(s.tags, s.lyrics)
            top = int(tokens[:, -1].max())
            if top >= cfg.text_vocab_size:
                problems.append(f"{s.source}: text id {top} >= the model's text_vocab_size {cfg.text_vocab_size} "
                                f"(tokenizer and model do not match)")
            if len(tokens) + 1 > self.max_len:
                problems.append(f"{s.source}: the prompt alone has {len(tokens)} rows; the model's context is "
                                f"{self.max_len} rows, which leaves no room for audio (shorten tags/lyrics)")
            elif len(tokens) + len(s.audio_tokens) > self.max_len:
                cropped.append(s)
            self.prompts.append((tokens, mask, muq_idx))
        if problems:
            raise DatasetError(problems)
        if cropped:
            log(f"warning: {len(cropped)} of {len(samples)} clip(s) exceed the model's context of {self.max_len} "
                f"rows (prompt + frames), e.g. {cropped[0].source} ({len(cropped[0].audio_tokens)} frames): "
                f"each epoch trains on a random window of them")
        # Row counts (after cropping) for length bucketing.
        self.lengths = [min(len(p[0]) + len(s.audio_tokens), self.max_len) for p, s in zip(self.prompts, samples)]

    def __len__(self) -> int:
        return len(self.samples)

    def frames(self, i: int) -> int:
        return self.lengths[i] - len(self.prompts[i][0])

    def example(self, i: int, epoch: int = 0) -> dict:
        tokens, mask, muq_idx = self.prompts[i]
        audio = self.samples[i].audio_tokens
        keep = self.max_len - len(tokens)
        if len(audio) > keep:  # random window, a pure function of (seed, epoch, i): resumes crop the same way
            start = int(np.random.default_rng([self.seed % 2**63, epoch, i]).integers(0, len(audio) - keep + 1))
            audio = audio[start:start + keep]
        return build_example(tokens, mask, muq_idx, audio, self.empty_id, self.samples[i].muq_embedding)

    def batch(self, indices: Sequence[int], epoch: int = 0, pad_to: int | None = None) -> dict:
        return collate([self.example(i, epoch) for i in indices], pad_to=pad_to, empty_id=self.empty_id)

    def summary(self) -> str:
        frames = sum(self.frames(i) for i in range(len(self)))
        instrumental = sum(1 for s in self.samples if not s.lyrics.strip())
        return (f"{len(self)} clips, {frames} audio frames ({frames / FRAME_RATE / 60:.1f} min), "
                f"{instrumental} instrumental, longest {max(self.lengths)} rows")


def load_dataset(config: str | os.PathLike | list, tokenizer: PromptTokenizer, cfg: ModelConfig, seed: int = 0,
                 log: Callable[[str], None] = print) -> AudioTokenDataset:
    """multidatabackend.json -> validated, pre-tokenised dataset (DatasetError lists every problem)."""
    problems: list[str] = []
    samples = read_backends(config, cfg, log, problems)
    return AudioTokenDataset(samples, tokenizer, cfg, seed=seed, log=log, problems=problems)


# ---------------------------------------------------------------- batches
class BucketBatchSampler:
    """Seeded shuffling per epoch, batches of similar lengths, and a resumable position.

    Epoch e's batches are a pure function of (seed, e): shuffle, cut into chunks of `bucket_batches` batches,
    sort each chunk by length (jittered by up to ±length_jitter, so batch membership changes between epochs even
    when one chunk holds the whole dataset), split it into batches, shuffle the batch order. The state is
    (epoch, index of the next batch), so load_state_dict() of a saved state replays exactly the batches an
    uninterrupted run sees.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 bucket_batches: int = 16, length_jitter: float = 0.1, drop_last: bool = False):
        # bucket_batches 0: no length bucketing (plain shuffled batches)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(lengths) == 0 or (drop_last and len(lengths) < batch_size):
            raise ValueError(f"{len(lengths)} sample(s) cannot fill a batch of {batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.float64)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.bucket_batches, self.length_jitter, self.drop_last = bucket_batches, length_jitter, drop_last
        self.epoch, self.index = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n, bs = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed % 2**63, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        jitter = self.length_jitter if self.shuffle else 0.0
        keys = self.lengths * rng.uniform(1 - jitter, 1 + jitter, size=n)
        chunk = bs * self.bucket_batches if self.bucket_batches > 0 else n
        out = []
        for c in range(0, n, chunk):
            part = order[c:c + chunk]
            if self.bucket_batches > 0:
                part = part[np.argsort(keys[part], kind="stable")]
            out += [part[i:i + bs].tolist() for i in range(0, len(part), bs)]
        if self.drop_last:
            out = [b for b in out if len(b) == bs]
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        self._cache = (epoch, out)
        return out

    def next_batch(self) -> tuple[int, list[int]]:
        """(epoch, indices) of the next batch; rolls over to the next epoch."""
        batches = self.batches(self.epoch)
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
            batches = self.batches(self.epoch)
        b = batches[self.index]
        self.index += 1
        return self.epoch, b

    def __iter__(self):
        """The remaining batches of the current epoch, then the position moves to the next epoch."""
        batches = self.batches(self.epoch)
        while self.index < len(batches):
            self.index += 1
            yield batches[self.index - 1]
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "num_samples": len(self.lengths)}

    def load_state_dict(self, state: dict, log: Callable[[str], None] = print):
        same = (state.get("seed"), state.get("batch_size"), state.get("num_samples")) == \
            (self.seed, self.batch_size, len(self.lengths))
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if not same:
            # Different data, seed or batch size: the old order cannot be replayed; keep the epoch and skip the
            # same share of it.
            old = state.get("batch_size") or self.batch_size
            self.index = min(self.index * old // self.batch_size, len(self))
            log(f"warning: the data position was saved with seed {state.get('seed')}, batch size "
                f"{state.get('batch_size')}, {state.get('num_samples')} samples; now {self.seed}, "
                f"{self.batch_size}, {len(self.lengths)}: resuming at epoch {self.epoch}, batch {self.index} of a "
                f"new order")
