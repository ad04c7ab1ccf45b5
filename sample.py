"""Make songs with HeartMuLa (plus your LoRA) and decode them to audio with HeartCodec.

    python sample.py --demo                      # the built-in tiny model: hear the pipeline work, no download
    python sample.py --model ckpt --lora out/pytorch_lora_weights.safetensors \\
        --tags "pop, upbeat, bright synths" --lyrics lyrics.txt --duration 30 --out song.wav
    python sample.py --config config/my-run/config.json   # model, prompt, lyrics, guidance and LoRA of a training run

--model takes a Hugging Face repo id, a model folder, or heartlib's ckpt/ folder (HeartMuLa-oss-3B/,
HeartCodec-oss/, tokenizer.json, gen_config.json side by side). --tags/--lyrics take text or a file path.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: the closing breakdown counts them as start-up

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hmtiny import runtime  # noqa: E402
from hmtiny.runtime import FRAME_RATE  # noqa: E402
from hmtiny.tiny import ASSETS as TINY, is_builtin  # noqa: E402

DEFAULT_MODEL = "HeartMuLa/HeartMuLa-oss-3B"
DOWNLOAD_HELP = """Download the official files (heartlib's ckpt/ layout) with:
  hf download HeartMuLa/HeartMuLa-oss-3B --local-dir ckpt/HeartMuLa-oss-3B
  hf download HeartMuLa/HeartCodec-oss --local-dir ckpt/HeartCodec-oss
  hf download HeartMuLa/HeartMuLaGen --local-dir ckpt        # tokenizer.json + gen_config.json
(`hf` comes with huggingface_hub >= 0.34: pip install -U huggingface_hub)
then run:  python sample.py --model ckpt --tags "pop, piano" --lyrics lyrics.txt --out song.wav
(or try the built-in tiny model first:  python sample.py --demo)"""


class UsageError(Exception):
    """A problem with the command line or the files it names: printed without a traceback."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Generate songs with HeartMuLa (+ LoRA) and decode them with HeartCodec.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help=f"repo id, model folder or heartlib ckpt/ folder (default {DEFAULT_MODEL})")
    ap.add_argument("--config", help="a training config.json: model, validation prompt/lyrics/guidance/duration, "
                                     "and output_dir's LoRA unless --lora is given")
    ap.add_argument("--codec",
                    help="HeartCodec folder or repo id (default: beside the model, else HeartMuLa/HeartCodec-oss)")
    ap.add_argument("--tokenizer",
                    help="tokenizer.json or its folder (gen_config.json beside it; default: found from the model)")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="LoRA weights: a .safetensors file, or a folder (a PEFT adapter or one holding "
                         "pytorch_lora_weights.safetensors); repeatable")
    ap.add_argument("--tags", help="comma-separated tags, or a file holding them")
    ap.add_argument("--lyrics", help="lyrics text, or a file holding them (default: none, instrumental)")
    ap.add_argument("--duration", type=float, help="maximum length in seconds (default 30; the song may end sooner)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale, >= 1 (default 1.5; 1 = off)")
    ap.add_argument("--topk", type=int,
                    help="sample among the k most likely tokens (default 50; 1 = greedy, 0 = no top-k)")
    ap.add_argument("--temperature", type=float, help="sampling temperature > 0 (default 1.0)")
    ap.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    ap.add_argument("--num", type=int, default=1, help="songs to make in one batch (default 1)")
    ap.add_argument("--out", help="output .wav, .flac, .mp3, .ogg or .opus (numbered when several; never "
                                  "overwrites) (default song.wav)")
    ap.add_argument("--save-tokens", nargs="?", const="", metavar="PATH.npy",
                    help="also save the audio tokens [frames, 8] as .npy (default: beside the audio)")
    ap.add_argument("--ref-embedding", metavar="FILE.npy",
                    help="a reference song's MuQ-MuLan embedding (512 numbers) for the prompt's MuQ row")
    ap.add_argument("--ref-audio", metavar="SONG.wav", help="compute that embedding from a song with MuQ-MuLan "
                                                            "(needs pip install -e \".[ref]\")")
    ap.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    ap.add_argument("--dtype", choices=list(runtime.DTYPES),
                    help="model precision (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--int8", action="store_true", help="int8 weight-only stacks (less memory; LoRAs stay unmerged)")
    ap.add_argument("--demo", action="store_true", help="use the built-in tiny random model and codec (no download)")
    ap.add_argument("--tokens-only", action="store_true", help="skip the codec: save the tokens (.npy) only")
    ap.add_argument("--ignore-eos", action="store_true", help="never stop early: always make --duration seconds")
    ap.add_argument("--mode", choices=["auto", *runtime.GENERATION_MODES], default="auto",
                    help="how to generate (default auto: graph on CUDA, plain elsewhere): plain = the readable loop "
                         "of hmtiny/generate.py, eager = the fast engine without CUDA graphs, graph = the fast "
                         "engine's CUDA graphs (CUDA only)")
    ap.add_argument("--codec-steps", type=int, default=10, help="HeartCodec flow-matching steps (default 10)")
    ap.add_argument("--codec-guidance", type=float, default=1.25, help="HeartCodec guidance (default 1.25)")
    ap.add_argument("--codec-dtype", choices=["fp32", "tf32", "bf16"],
                    help="HeartCodec precision (default: --config's validation_codec_dtype, else tf32 on CUDA; "
                         "fp32 on CPU or with --dtype fp32; bf16: fastest, least exact; README gives the figures)")
    return ap.parse_args(argv)


TEXT_FILE_SUFFIXES = (".txt", ".lyrics", ".lrc", ".md")


def text_or_file(value: str | None, flag: str) -> str:
    """A value naming an existing file means its content. A one-line value that looks like a file path (a text
    file's suffix, or starting with / ./ ../ ~/) but names no file is an error, not text to sing."""
    if value is None:
        return ""
    p = Path(value).expanduser()
    one_line = "\n" not in value and len(value) < 4096
    try:
        is_file = one_line and p.is_file()
    except OSError:  # e.g. a name too long to be a file: it is text
        is_file = False
    if is_file:
        from hmtiny.data import read_utf8
        try:
            return read_utf8(p)
        except ValueError as e:  # not UTF-8, unreadable: the message names the file
            raise UsageError(f"{flag}: {e}") from None
    if one_line and (p.suffix.lower() in TEXT_FILE_SUFFIXES or value.startswith(("/", "./", "../", "~/"))):
        raise UsageError(f"{flag} {value}: no such file (looks like a path; give the text itself or an existing file)")
    return value


def parse_lora(spec: str):
    """PATH[:SCALE] -> (LoRAWeights, scale): the file is read and checked now, before any model loads."""
    from hmtiny.lora import lora_file, split_lora_spec
    path, scale = split_lora_spec(spec)
    if not math.isfinite(scale):
        raise UsageError(f"--lora {spec}: the scale must be a finite number, got {scale}")
    try:
        p = lora_file(path)  # a folder: its PEFT adapter_model.safetensors, else pytorch_lora_weights
    except FileNotFoundError as e:
        raise UsageError(f"--lora {spec}: {e}") from None
    return read_checked_lora(p, f"--lora {spec}"), scale


def read_checked_lora(path: Path, what: str):
    from hmtiny.lora import read_lora
    try:
        return read_lora(path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"{what}: {e}") from None


def numbered(path: Path, n: int, i: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{i + 1}{path.suffix}")


def free_path(path: Path, taken: set) -> Path:
    """`path`, or path-2, path-3 ... when a file (or an earlier output of this run) is already there."""
    candidate, k = path, 1
    while candidate.exists() or candidate in taken:
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate


def settings(a) -> dict:
    """Merge defaults, --demo, --config and explicit options (explicit wins)."""
    s = {"model": DEFAULT_MODEL, "codec": None, "tokenizer": None, "tags": None, "lyrics": "", "duration": 30.0,
         "cfg": 1.5, "topk": 50, "temperature": 1.0, "seed": None, "loras": [], "int8": a.int8, "out": "song.wav",
         "stop_on_eos": not a.ignore_eos, "tokenizer_obj": None, "codec_dtype": a.codec_dtype}
    if a.demo and (a.model or a.config):
        raise UsageError("--demo uses the built-in tiny model: drop --model/--config")
    if a.demo:
        s.update(model=str(TINY / "model"), codec=str(TINY / "codec"), tokenizer=str(TINY / "tokenizer.json"),
                 tags="pop, happy, piano, synth", lyrics="[verse]\nthe sun is bright\nwe sing again",
                 duration=4.0, out="demo.wav", stop_on_eos=False)  # a random model: EOS means nothing
    if a.config:
        from hmtiny.train_config import ConfigError, load_config, resolve_input
        from hmtiny.runtime import find_codec_folder, load_tokenizer
        try:
            cfg = load_config(a.config)
            s["tokenizer_obj"] = None if a.tokenizer else load_tokenizer(cfg)
        except ConfigError as e:
            raise UsageError(f"--config {a.config}: {e}") from None
        s.update(model=str(resolve_input(cfg, "pretrained_model_name_or_path", must_exist=False)),
                 codec=find_codec_folder(cfg), lyrics=cfg.validation_lyrics or "", cfg=cfg.validation_cfg_scale,
                 duration=cfg.validation_audio_duration, topk=cfg.validation_topk,
                 temperature=cfg.validation_temperature, seed=cfg.validation_seed, int8=a.int8 or cfg.int8_base,
                 codec_dtype=a.codec_dtype or cfg.validation_codec_dtype)
        if cfg.validation_prompt:
            s["tags"] = cfg.validation_prompt
        trained = Path(cfg.output_dir) / "pytorch_lora_weights.safetensors"
        if not a.lora and trained.is_file():
            print(f"using the run's LoRA {trained} (pass --lora to choose another)")
            s["loras"] = [(read_checked_lora(trained, f"--config {a.config}: the run's LoRA"), 1.0)]
    for key in ("model", "codec", "tokenizer", "duration", "cfg", "topk", "temperature", "seed", "out"):
        if getattr(a, key) is not None:
            s[key] = getattr(a, key)
    if a.tags is not None:
        s["tags"] = text_or_file(a.tags, "--tags")
    if a.lyrics is not None:
        s["lyrics"] = text_or_file(a.lyrics, "--lyrics")
    if a.lora:
        s["loras"] = [parse_lora(x) for x in a.lora]
    if s["stop_on_eos"] and is_builtin(s["model"]):
        s["stop_on_eos"] = False
        print("note: the built-in tiny model has random weights, its EOS means nothing: every song is --duration long")

    if not s["tags"] or not s["tags"].strip():
        raise UsageError("give --tags (e.g. --tags \"pop, piano, happy\"), or --config with a validation_prompt")
    for flag, value in (("--duration", s["duration"]), ("--codec-guidance", a.codec_guidance)):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    if not s["duration"] > 0:
        raise UsageError(f"--duration must be > 0 seconds, got {s['duration']}")
    try:
        runtime.check_sampling(s["topk"], s["temperature"], s["cfg"], names=("--topk", "--temperature", "--cfg"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.num < 1:
        raise UsageError(f"--num must be >= 1, got {a.num}")
    if a.codec_steps < 1:
        raise UsageError(f"--codec-steps must be >= 1, got {a.codec_steps}")
    if a.codec_guidance < 1:
        raise UsageError(f"--codec-guidance must be >= 1 (1 turns the codec's guidance off), got {a.codec_guidance}")
    out = Path(s["out"]).expanduser()
    if not a.tokens_only:
        from hmtiny.codec.audio import check_audio_format
        try:
            check_audio_format(out)  # before generating: this machine's libsndfile may lack mp3/opus
        except ValueError as e:
            raise UsageError(f"--out: {e}") from None
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder: give a file name such as {out / 'song.wav'}")
    s["out"] = out
    return s


def check_writable(path: Path, flag: str):
    from hmtiny.checkpoint import writable_folder_problem
    problem = writable_folder_problem(path.parent)
    if problem:
        raise UsageError(f"{flag} {path}: cannot write there ({problem})")


def check_files(s, need_codec: bool):
    """Model, LoRAs and codec checked without loading them (config files, weight headers, LoRA layers against a
    weightless model): a bad file is named before minutes of loading and generating. -> the codec folder."""
    from hmtiny.checkpoint import (CODEC_SUBFOLDERS, build_empty, check_weight_files, find_codec_beside,
                                   find_model_folder, resolve_folder)
    from hmtiny.codec.config import HeartCodecConfig
    from hmtiny.config import ModelConfig
    from hmtiny.model import HeartMuLa
    try:
        folder = find_model_folder(resolve_folder(s["model"]))
        model_cfg = ModelConfig.from_file(folder / "config.json")
    except FileNotFoundError as e:
        raise UsageError(f"no HeartMuLa model at {s['model']}: {e}\n\n{DOWNLOAD_HELP}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--model {s['model']}: {folder / 'config.json'} is not a HeartMuLa config ({e})") from None
    try:
        check_weight_files(folder)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model {s['model']}: {e}\n\n{DOWNLOAD_HELP}") from None
    if s["loras"]:
        from hmtiny.lora import apply_loras  # (imports Triton: only when there are LoRAs)
        try:
            with torch.device("meta"):
                apply_loras(build_empty(HeartMuLa, model_cfg), s["loras"], merge=False)
        except ValueError as e:
            raise UsageError(f"--lora: {e}") from None
    codec_where = s["codec"] or find_codec_beside(s["model"])
    if not need_codec:
        return None
    if codec_where is None:
        raise UsageError(f"no HeartCodec found beside {s['model']}: pass --codec.\n\n{DOWNLOAD_HELP}")
    try:
        codec_folder = find_model_folder(resolve_folder(codec_where), CODEC_SUBFOLDERS)
        HeartCodecConfig.from_file(codec_folder / "config.json")
        check_weight_files(codec_folder)
    except FileNotFoundError as e:
        raise UsageError(f"no HeartCodec at {codec_where}: {e}\n\n{DOWNLOAD_HELP}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--codec {codec_where}: {e}") from None
    return codec_folder


def load_everything(s, a, device, dtype, need_codec=True):
    from hmtiny.checkpoint import load_heartmula
    from hmtiny.text import PromptTokenizer, find_text_assets

    tok = s["tokenizer_obj"]
    try:
        if tok is None:
            tok = PromptTokenizer.load(*find_text_assets(s["tokenizer"] or s["model"]))
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"no tokenizer for {s['tokenizer'] or s['model']}: {e}\n\n{DOWNLOAD_HELP}") from None
    codec_where = check_files(s, need_codec)
    t0 = time.time()
    try:
        model = load_heartmula(s["model"], dtype=dtype, device=device, quantize=s["int8"])
    except ValueError as e:  # keys or shapes that do not match config.json
        raise UsageError(f"--model {s['model']}: {e}") from None
    print(f"model {s['model']} loaded in {time.time() - t0:.1f} s ({device}, {str(dtype).replace('torch.', '')}"
          f"{', int8 stacks' if s['int8'] else ''})")
    if s["loras"]:
        from hmtiny.lora import apply_loras
        apply_loras(model, s["loras"], merge=False if s["int8"] else None)
        names = ", ".join(f"{Path(w.path).name}:{sc:g}" for w, sc in s["loras"])
        print(f"LoRA {names} {'applied unmerged (int8 base)' if s['int8'] else 'merged into the weights'}")
    return tok, model, codec_where


def reference_embedding(a, device):
    """(raw embedding, where it came from) of --ref-embedding / --ref-audio, or None; checked once the model's
    muq_dim is known."""
    from hmtiny.reference import embed_audio, load_npy
    if a.ref_embedding and a.ref_audio:
        raise UsageError("give --ref-embedding or --ref-audio, not both")
    try:
        if a.ref_embedding:
            path = Path(a.ref_embedding).expanduser()
            return load_npy(path), str(path)
        if a.ref_audio:
            t0 = time.time()
            emb = embed_audio(Path(a.ref_audio).expanduser(), device=device)
            print(f"reference embedding of {a.ref_audio} computed with MuQ-MuLan in {time.time() - t0:.1f} s")
            return emb, f"MuQ-MuLan embedding of {a.ref_audio}"
    except (ValueError, ImportError) as e:
        raise UsageError(str(e)) from None
    return None


class Clock:
    """Where a run's time goes: laps named as they end, printed as one line at the end."""

    def __init__(self, start: float):
        self.last, self.laps = start, []

    def lap(self, name: str):
        now = time.perf_counter()
        self.laps.append((name, now - self.last))
        self.last = now

    def summary(self) -> str:
        total = sum(t for _, t in self.laps)
        parts = ", ".join(f"{name} {t:.1f} s" for name, t in self.laps)
        return f"time: {parts}; total {total:.1f} s"


def generation_split(t: dict, total: float, song_frames: list[int] | None = None) -> dict | None:
    """Where generation's seconds went, from the engine's last_timing (None for the plain loop): 'short' for the
    closing time line, 'long' for the generation report. warm-up = everything before the first frame's replay
    (engine build, tile plan, warm-up runs and captures); loop = the frames. With several songs (song_frames: each
    one's frames) the loop's rate is given per song (frame steps / s) and for the batch (all frames / s)."""
    if not t:
        return None
    warm, loop = total - t["loop_s"], t["loop_s"]
    other = warm - t["build_s"] - t["plan_s"] - t["capture_s"]
    gpu = f"; GPU {t['ms_per_frame_step']:.2f} ms per frame step" if "ms_per_frame_step" in t else ""
    per_second = 1 / loop if loop > 0 else 0.0
    rate = f"{t['frames']} frames, {t['frames'] * per_second:.1f} frames/s"
    if song_frames and len(song_frames) > 1:
        made = sum(song_frames)
        rate += f" per song; {made} frames of {len(song_frames)} songs, {made * per_second:.1f} frames/s together"
    return {"short": f"warm-up {warm:.1f} s + loop {loop:.1f} s",
            "long": f"split: warm-up {warm:.2f} s (engine build {t['build_s']:.2f}, tile plan {t['plan_s']:.2f}, "
                    f"warm-up runs + capture {t['capture_s']:.2f}, other {other:.2f}), loop {loop:.2f} s "
                    f"({rate}{gpu})"}


def main(argv=None) -> int:
    # run as a script, the start-up counts from the first line (imports included); called in-process, from here
    started = STARTED if argv is None else time.perf_counter()
    a = parse_args(argv)
    try:
        return run(a, Clock(started))
    except (UsageError, OSError) as e:  # OSError: a full disk, a folder gone while writing
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; songs already written are complete files, the others were not written",
              file=sys.stderr)
        return 1


def run(a, clock: Clock) -> int:
    s = settings(a)
    try:
        device = runtime.pick_device(a.device)
    except ValueError as e:
        raise UsageError(f"--device {a.device}: {e}") from None
    dtype = runtime.DTYPES[a.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    mode = runtime.default_mode(device) if a.mode == "auto" else a.mode
    if mode == "graph" and device.type != "cuda":
        raise UsageError(f"--mode graph needs a CUDA device, not {device}")
    seed = s["seed"] if s["seed"] is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    max_frames = max(1, round(s["duration"] * FRAME_RATE))
    # choose every output name now, so a long run never ends in a name clash
    taken: set = set()
    outs = []
    for i in range(a.num):
        want = numbered(s["out"], a.num, i)
        got = free_path(want, taken)
        if got != want:
            print(f"note: {want} exists: this run writes {got}")
        taken.add(got)
        outs.append(got)
        if not a.tokens_only:
            check_writable(got, "--out")
    token_paths = None
    if a.tokens_only and a.save_tokens is None:
        a.save_tokens = ""
    if a.save_tokens is not None:
        base = Path(a.save_tokens) if a.save_tokens else None
        token_paths = [free_path(numbered(base, a.num, i) if base else o.with_suffix(".npy"), taken)
                       for i, o in enumerate(outs)]
        taken.update(token_paths)
        for p in token_paths:
            check_writable(p, "--save-tokens")

    clock.lap("start-up (Python, imports, checks)")
    # Triton's per-process set-up (import, cache keys) in a thread while the model loads; joined before generating
    triton_job = runtime.Background(runtime.warm_triton) if mode != "plain" and device.type == "cuda" else None
    ref = reference_embedding(a, device)  # before the model: a missing `muq` fails fast
    if ref is not None:
        clock.lap("reference embedding")
    tok, model, codec_where = load_everything(s, a, device, dtype, need_codec=not a.tokens_only)
    clock.lap("loading the model")
    prompt = tok.prompt(s["tags"], s["lyrics"])
    if ref is not None:
        from hmtiny.reference import check_muq_embedding
        try:
            ref = check_muq_embedding(ref[0], model.cfg.muq_dim, ref[1])
        except ValueError as e:
            raise UsageError(str(e)) from None
        prompt = (*prompt, torch.from_numpy(ref))
        print(f"reference: the MuQ row is muq_linear of {a.ref_embedding or a.ref_audio}'s embedding")
    print(f"prompt: {prompt[0].shape[0]} rows (tags {s['tags']!r}, {'lyrics' if s['lyrics'].strip() else 'no lyrics'});"
          f" {a.num} song(s) up to {max_frames} frames ({max_frames / FRAME_RATE:.1f} s), cfg {s['cfg']:g}, "
          f"top-k {s['topk']}, temperature {s['temperature']:g}, seed {seed}")
    limit = model.cfg.backbone.max_seq_len - prompt[0].shape[0] - 1
    if max_frames > limit:
        raise UsageError(f"--duration {s['duration']:g} s is {max_frames} frames, more than this model's context "
                         f"allows after the prompt ({limit} frames, {limit / FRAME_RATE:.1f} s)")

    generator = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()

    counted = {"before": 0, "last": 0}  # the plain loop makes one song after another, each counting from 1
    codec_dtype = runtime.codec_dtype_name(device, s["codec_dtype"], dtype)
    codec_job = []  # the codec loading in the background (CUDA), started at the first progress report

    def progress(n, total):
        # by the first report the engine's graphs are captured: loading now cannot break a capture or skew the
        # tile timing, and its copies overlap the frame loop
        if not codec_job and not a.tokens_only and runtime.codec_in_background(device):
            codec_job.append(runtime.Background(runtime.load_codec_beside_model, codec_where, device, codec_dtype))
        if n < counted["last"]:
            counted["before"] += counted["last"]
        counted["last"] = n
        done, dt = counted["before"] + n, time.time() - t0
        song = f"song {counted['before'] // total + 1}/{a.num} " if a.num > 1 and mode == "plain" else ""
        print(f"\r  {song}frame {n}/{total}  {done / dt:6.1f} frames/s  {done / dt / FRAME_RATE:5.1f}x real time",
              end="", flush=True)

    print(f"generating ({mode})...")
    if triton_job is not None:
        triton_job.result()  # (warm_triton never raises)
    if mode == "graph":
        from kernels import gemv
        tiles = gemv.cache_file()
        if (tiles is None or not tiles.exists()) and not gemv.has_shipped_picks(device):
            kept = "not kept" if tiles is None else f"kept in {tiles}"
            print("  first run on this machine: the decode matmuls' tiles are timed and the kernels compiled before "
                  f"the first frame (a few minutes on a fresh H100); {kept} for later runs")
    # sample.py owns the model: the engine fuses its weights without a second copy (share)
    timing: dict = {}
    songs = runtime.generate(model, [prompt] * a.num, max_frames, s["cfg"], s["topk"], s["temperature"], generator,
                             mode=mode, stop_on_eos=s["stop_on_eos"], progress=progress,
                             engine_options={"share": True}, timing=timing)
    dt = time.time() - t0
    split = generation_split(timing, dt, [x.shape[0] for x in songs])
    clock.lap(f"generation ({split['short']})" if split else "generation")
    made = sum(x.shape[0] for x in songs)
    together = f" for the {a.num} songs together" if a.num > 1 else ""
    print(f"\n{made} frames ({made / FRAME_RATE:.1f} s of audio) in {dt:.1f} s: {made / dt:.1f} frames/s{together}, "
          f"{made / dt / FRAME_RATE:.1f}x real time{' (includes the graph capture)' if mode == 'graph' else ''}")
    if split:
        print(f"  {split['long']}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if token_paths:
        import numpy as np
        for frames, p in zip(songs, token_paths):
            p.parent.mkdir(parents=True, exist_ok=True)
            runtime.save_npy(p, frames.numpy().astype(np.int16))
            print(f"tokens: {p}")
    if a.tokens_only:
        clock.lap("writing tokens")
        print(clock.summary())
        return 0

    from hmtiny.codec import write_audio
    t0 = time.time()
    try:
        if codec_job:
            codec = codec_job[0].result()
            print(f"codec loaded in {codec_job[0].seconds:.1f} s, in the background during generation "
                  f"(waited {time.time() - t0:.1f} s for it)")
        else:
            codec = runtime.load_codec_for(codec_where, device, codec_dtype)
    except FileNotFoundError as e:
        raise UsageError(f"no HeartCodec at {codec_where}: {e}\n\n{DOWNLOAD_HELP}") from None
    except ValueError as e:  # keys or shapes that do not match its config.json
        raise UsageError(f"--codec {codec_where}: {e}") from None
    if codec.device.type != device.type:  # no room beside the model: kept pinned on the host until the model was freed
        codec = codec.to(device)
    clock.lap("loading the codec")
    for i, (frames, out) in enumerate(zip(songs, outs)):
        if frames.shape[0] == 0:
            print(f"song {i + 1}: the model ended it at once (EOS at the first frame): nothing to decode, no file")
            continue
        if frames.shape[0] < max_frames:
            print(f"song {i + 1}: the model ended it after {frames.shape[0] / FRAME_RATE:.1f} s (EOS)")
        t1 = time.time()
        wav = runtime.decode_frames(codec, frames, a.codec_steps, a.codec_guidance, seed + i, device)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_audio(out, wav, codec.sample_rate)
        print(f"decoded song {i + 1} in {time.time() - t1:.1f} s -> {out} ({wav.shape[1] / codec.sample_rate:.1f} s, "
              f"{codec.sample_rate} Hz, {wav.shape[0]} channels)")
    print(f"codec total {time.time() - t0:.1f} s")
    clock.lap("decoding and writing audio")
    print(clock.summary())
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved")
    return 0


if __name__ == "__main__":
    code = main()
    # everything is written (atomically) and closed: leave without the interpreter's teardown, which after a CUDA
    # run frees the graphs, the caching allocator's blocks and the context one by one (about a second)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
