"""The built-in tiny default: a random-weight HeartMuLa, HeartCodec, tokenizer and dataset small enough to ship.

`python -m hmtiny.tiny` regenerates `hmtiny/assets/tiny/` deterministically from a seed:

    hmtiny/assets/tiny/
      config.json            training config for `python train.py` (SimpleTuner keys; paths relative to this file)
      multidatabackend.json  one `type: local` audio backend on dataset/
      model/                 tiny HeartMuLa: config.json (explicit backbone/decoder dims, gen_config) +
                             model.safetensors (bf16). 69 audio ids per codebook = 64 codec ids + 5 specials.
      codec/                 tiny HeartCodec with the fixture codec's dims (64-entry codebooks), random weights
      tokenizer.json         byte-level BPE trained on the dataset's text; specials <|pad|>=0 (the empty id),
                             <|begin_of_text|>=1, <|end_of_text|>=2, <tag>, </tag>; adds BOS like Llama-3's
      gen_config.json        text_bos_id 1, text_eos_id 2, audio_eos_id 65, empty_id 0
      dataset/               track_NN.wav (a 5 ms silent-ish stub: the audio is never read), track_NN.txt (tags),
                             track_NN.lyrics (absent = instrumental), track_NN.tokens.npy ([frames, 8] int16,
                             2-6 s at 12.5 frames/s)

It is laid out like heartlib's `ckpt/` folder (model, codec, tokenizer.json, gen_config.json side by side), with
the model in `model/` and the codec in `codec/`. The training config names the model folder
(`pretrained_model_name_or_path: "model"`); tokenizer.json/gen_config.json are found beside it
(hmtiny.text.find_text_assets) and the codec in its sibling `codec/`.

The tokens have a structure a model can learn: codebook 0 repeats a short motif chosen by the genre tag with a
period set by the mood tag, and codebook k is a fixed function of codebook 0 (and the genre).
"""
from __future__ import annotations

import argparse
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import torch

from .checkpoint import save_heartmula
from .codec.config import FRAME_RATE
from .config import GenConfig, ModelConfig, StackConfig

ASSETS = Path(__file__).resolve().parent / "assets" / "tiny"


def is_builtin(model_path) -> bool:
    """The built-in tiny model's folder (or the folder holding it): its weights are random, so its EOS means nothing
    and generation should run to the asked length."""
    try:
        return Path(model_path).expanduser().resolve() in (ASSETS, ASSETS / "model")
    except OSError:
        return False
SEED = 20260125
NUM_TRACKS = 12
CODEBOOK_SIZE = 64  # the tiny codec's codebook size
NUM_CODEBOOKS = 8
SPECIALS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<tag>", "</tag>"]
GEN = GenConfig(text_bos_id=1, text_eos_id=2, audio_eos_id=CODEBOOK_SIZE + 1, empty_id=0)

GENRES = ["pop", "rock", "jazz", "ambient", "folk", "electronic"]
MOODS = ["happy", "sad", "calm", "energetic"]
INSTRUMENTS = ["piano", "guitar", "synth", "drums", "strings", "bass"]
PERIODS = [4, 6, 8, 5]  # motif period per mood
WORDS = ["la", "the", "sun", "is", "bright", "night", "falls", "we", "sing", "again", "my", "heart", "sea", "blue",
         "dance", "all", "day", "rain", "on", "road", "home", "light", "stay", "with", "me"]


def tiny_model_config(text_vocab_size: int) -> ModelConfig:
    def stack(layers: int, max_seq_len: int) -> StackConfig:
        return StackConfig(num_layers=layers, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
                           max_seq_len=max_seq_len)
    return ModelConfig(backbone=stack(3, 256), decoder=stack(2, 16), text_vocab_size=text_vocab_size,
                       audio_vocab_size=CODEBOOK_SIZE + 5, audio_num_codebooks=NUM_CODEBOOKS, muq_dim=8,
                       backbone_flavor="tiny-backbone", decoder_flavor="tiny-decoder", gen=GEN)


def make_tracks(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    motifs = rng.integers(0, CODEBOOK_SIZE, size=(len(GENRES), max(PERIODS)))
    tracks = []
    for n in range(NUM_TRACKS):
        g, m = n % len(GENRES), int(rng.integers(len(MOODS)))
        instruments = rng.choice(INSTRUMENTS, size=2, replace=False)
        tags = ", ".join([GENRES[g], MOODS[m], *instruments])
        if n % 3 == 2:  # every third track is instrumental: no .lyrics file
            lyrics = None
        else:
            lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) for _ in range(int(rng.integers(2, 5)))]
            lyrics = "[verse]\n" + "\n".join(lines[:2]) + ("\n[chorus]\n" + "\n".join(lines[2:]) if lines[2:] else "")
            if n % 2:
                lyrics = lyrics.title()  # mixed case: the prompt builder lower-cases
        frames = int(rng.integers(int(2 * FRAME_RATE), int(6 * FRAME_RATE) + 1))
        t = np.arange(frames) + int(rng.integers(PERIODS[m]))
        c0 = motifs[g, t % PERIODS[m]]
        codes = [(c0 * (2 * k + 1) + 7 * k + g) % CODEBOOK_SIZE for k in range(NUM_CODEBOOKS)]
        tokens = np.stack(codes, axis=1).astype(np.int16)  # [frames, 8]
        tracks.append({"name": f"track_{n + 1:02d}", "tags": tags, "lyrics": lyrics, "tokens": tokens})
    return tracks


def train_tokenizer(texts: list[str], vocab_size: int = 384):
    """Byte-level BPE (any text encodes, no unknown token) with Llama-3-like BOS handling."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS[:3]] == [GEN.empty_id, GEN.text_bos_id, GEN.text_eos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[1]} $A",
                                                       special_tokens=[(SPECIALS[1], GEN.text_bos_id)])
    return tok


def write_wav(path: Path, seconds: float = 0.005, rate: int = 48000):
    """A valid, tiny 16-bit mono wav: discovery needs an audio file per sample, training never reads it."""
    n = int(seconds * rate)
    samples = (np.sin(np.arange(n) * 2 * np.pi * 440 / rate) * 1000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def training_config() -> dict:
    return {
        "model_family": "heartmula",
        "model_type": "lora",
        "pretrained_model_name_or_path": "model",
        "data_backend_config": "multidatabackend.json",
        "output_dir": "out/tiny",
        "mixed_precision": "no",
        "base_model_precision": "no_change",
        "resolution": 0,
        "seed": 42,
        "train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-2,  # LoRA on a random tiny model needs a large step to show learning in 40 steps
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 4,
        "max_train_steps": 40,
        "num_train_epochs": 0,
        "lora_rank": 4,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,
        "checkpointing_steps": 20,
        "checkpoints_total_limit": 2,
        "validation_step_interval": 20,
        "validation_prompt": "pop, happy, piano, synth",
        "validation_lyrics": "[verse]\nthe sun is bright\nwe sing again",
        "validation_audio_duration": 2.0,
        "validation_guidance": 1.5,
        "num_validation_images": 1,
    }


def backend_config() -> list[dict]:
    return [{"id": "tiny-audio", "type": "local", "dataset_type": "audio", "instance_data_dir": "dataset",
             "caption_strategy": "textfile", "metadata_backend": "discovery", "disabled": False}]


def write_json(obj, path: Path):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def make_codec(folder: Path, seed: int) -> bool:
    """A random tiny HeartCodec through the codec package's API; False if that package is not there yet."""
    try:
        from .codec import HeartCodec, HeartCodecConfig
    except ImportError as e:
        print(f"note: hmtiny.codec is not available ({e}); the codec folder was not regenerated")
        return False
    HeartCodec.from_config(HeartCodecConfig.tiny(), seed=seed, dtype=torch.bfloat16).save(folder)
    return True


def main(out: Path = ASSETS, seed: int = SEED, codec: bool = True):
    out = Path(out)
    tracks = make_tracks(seed)

    dataset = out / "dataset"
    shutil.rmtree(dataset, ignore_errors=True)
    dataset.mkdir(parents=True)
    for t in tracks:
        write_wav(dataset / f"{t['name']}.wav")
        (dataset / f"{t['name']}.txt").write_text(t["tags"] + "\n")
        if t["lyrics"] is not None:
            (dataset / f"{t['name']}.lyrics").write_text(t["lyrics"] + "\n")
        np.save(dataset / f"{t['name']}.tokens.npy", t["tokens"])

    cfg = training_config()
    texts = [t["tags"].lower() for t in tracks] + [t["lyrics"].lower() for t in tracks if t["lyrics"]]
    texts += [cfg["validation_prompt"], cfg["validation_lyrics"]]
    tok = train_tokenizer(texts)
    tok.save(str(out / "tokenizer.json"))
    write_json(vars(GEN), out / "gen_config.json")

    torch.manual_seed(seed)
    model_cfg = tiny_model_config(tok.get_vocab_size())
    from .model import HeartMuLa
    model = HeartMuLa(model_cfg).to(torch.bfloat16)  # bf16 on disk keeps the repo small
    save_heartmula(model, out / "model")

    if codec:
        make_codec(out / "codec", seed + 1)
    write_json(cfg, out / "config.json")
    write_json(backend_config(), out / "multidatabackend.json")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1024:.0f} KiB): {len(tracks)} tracks, text vocab {tok.get_vocab_size()}, "
          f"{sum(p.numel() for p in model.parameters())} model parameters")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--no-codec", action="store_true", help="leave codec/ as it is")
    a = ap.parse_args()
    main(a.out, a.seed, codec=not a.no_codec)
