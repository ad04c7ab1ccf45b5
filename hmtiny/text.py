"""Text side of a HeartMuLa prompt: tags and lyrics -> the [P, 9] prompt rows.

Layout (docs/model.md, as HeartMuLaGenPipeline.preprocess): tag ids, one MuQ row, lyric ids. Only the text column (8) is
live on every prompt row, the MuQ row included; the MuQ row carries text id empty_id (0) and the model overwrites
its embedding with muq_linear(0). Tags are lower-cased and wrapped as `<tag>...</tag>`; lyrics are lower-cased;
both get BOS prepended / EOS appended when the tokenizer did not put them there (the Llama-3 tokenizer adds BOS
itself, never EOS). Surrounding whitespace is stripped, as SimpleTuner does (tag/lyric files end with a newline).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .config import GenConfig

TEXT_COLUMN = 8  # columns 0..7 are the audio codebooks
TAGS_OPEN, TAGS_CLOSE = "<tag>", "</tag>"
GEN_REPO = "HeartMuLa/HeartMuLaGen"  # where the official tokenizer.json and gen_config.json live


def normalize_tags(tags: str) -> str:
    tags = tags.strip().lower()
    if not tags.startswith(TAGS_OPEN):
        tags = TAGS_OPEN + tags
    if not tags.endswith(TAGS_CLOSE):
        tags = tags + TAGS_CLOSE
    return tags


def normalize_lyrics(lyrics: str) -> str:
    return lyrics.strip().lower()


class PromptTokenizer:
    """Turns (tags, lyrics) into prompt rows. `encode` maps a string to token ids; tests inject a fake one."""

    def __init__(self, encode: Callable[[str], list[int]], gen: GenConfig, vocab_size: int | None = None,
                 decode: Callable[[list[int]], str] | None = None):
        self._encode = encode
        self._decode = decode
        self.gen = gen
        self.vocab_size = vocab_size

    @classmethod
    def load(cls, tokenizer_json: str | os.PathLike, gen_config: "str | os.PathLike | dict | GenConfig | None" = None
             ) -> "PromptTokenizer":
        """From a `tokenizers` tokenizer.json and HeartMuLaGen's gen_config (path, dict or GenConfig;
        None = the official ids)."""
        from tokenizers import Tokenizer
        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"tokenizer file {tokenizer_json} does not exist")
        if gen_config is None:
            gen = GenConfig()
        elif isinstance(gen_config, GenConfig):
            gen = gen_config
        elif isinstance(gen_config, dict):
            gen = GenConfig.from_dict(gen_config)
        else:
            try:
                gen = GenConfig.from_file(gen_config)
            except (ValueError, KeyError, TypeError, OSError) as e:  # not JSON, not UTF-8, missing ids
                raise ValueError(f"{gen_config} is not a readable gen_config.json ({type(e).__name__}: {e})") from None
        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the tokenizers library raises a bare Exception for a damaged file
            raise ValueError(f"{tokenizer_json} is not a readable tokenizer.json ({e})") from None
        for name in ("text_bos_id", "text_eos_id"):
            if tok.id_to_token(getattr(gen, name)) is None:
                raise ValueError(f"gen_config {name}={getattr(gen, name)} is not an id of {tokenizer_json} "
                                 f"({tok.get_vocab_size()} ids): tokenizer and gen_config do not belong together")
        return cls(lambda s: tok.encode(s).ids, gen, vocab_size=tok.get_vocab_size(),
                   decode=lambda ids: tok.decode(ids, skip_special_tokens=False))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> "PromptTokenizer":
        """Find tokenizer.json + gen_config.json (see find_text_assets) and load them."""
        return cls.load(*find_text_assets(name_or_path))

    def _with_bos_eos(self, ids: list[int]) -> list[int]:
        ids = list(ids)
        if not ids or ids[0] != self.gen.text_bos_id:
            ids = [self.gen.text_bos_id] + ids
        if ids[-1] != self.gen.text_eos_id:
            ids = ids + [self.gen.text_eos_id]
        return ids

    def encode_tags(self, tags: str) -> list[int]:
        return self._with_bos_eos(self._encode(normalize_tags(tags)))

    def encode_lyrics(self, lyrics: str) -> list[int]:
        """Empty lyrics (instrumental) give [BOS, EOS]."""
        return self._with_bos_eos(self._encode(normalize_lyrics(lyrics)))

    def decode(self, ids: list[int]) -> str:
        if self._decode is None:
            raise ValueError("this PromptTokenizer was built without a decode function")
        return self._decode(list(ids))

    def prompt(self, tags: str, lyrics: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> tokens [P, 9] int64, tokens_mask [P, 9] bool, muq_idx (= number of tag ids)."""
        return prompt_rows(self.encode_tags(tags), self.encode_lyrics(lyrics), self.gen.empty_id)


def prompt_rows(tag_ids: list[int], lyric_ids: list[int], empty_id: int = 0,
                num_columns: int = TEXT_COLUMN + 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompt rows from already-encoded tag and lyric ids (BOS/EOS included)."""
    muq_idx = len(tag_ids)
    ids = list(tag_ids) + [empty_id] + list(lyric_ids)
    tokens = torch.zeros(len(ids), num_columns, dtype=torch.long)
    tokens[:, -1] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(len(ids), num_columns, dtype=torch.bool)
    mask[:, -1] = True  # the MuQ row too: harmless, its embedding is overwritten
    return tokens, mask, muq_idx


def find_text_assets(name_or_path: str | os.PathLike) -> tuple[Path, Path]:
    """(tokenizer.json, gen_config.json) for a model location.

    Accepts the tokenizer.json file itself, heartlib's `ckpt/` folder (the files at its top level), the model
    folder inside it (`ckpt/HeartMuLa-oss-3B`: the files are in its parent), a folder holding a `HeartMuLaGen/`
    subfolder, or a Hugging Face repo id (if that repo lacks them, HeartMuLa/HeartMuLaGen is fetched, their
    official home)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        gen = p.parent / "gen_config.json"
        if not gen.is_file():
            raise FileNotFoundError(f"found {p} but no gen_config.json beside it")
        return p, gen
    if p.is_dir():
        candidates = [p, p.parent, p / "HeartMuLaGen", p.parent / "HeartMuLaGen"]
        for c in candidates:
            if (c / "tokenizer.json").is_file() and (c / "gen_config.json").is_file():
                return c / "tokenizer.json", c / "gen_config.json"
        raise FileNotFoundError(f"no tokenizer.json + gen_config.json for {p}: looked in "
                                f"{[str(c) for c in candidates]}. Download {GEN_REPO} and put its two files "
                                f"there (heartlib's ckpt/ layout).")
    from .checkpoint import resolve_folder
    patterns = ["tokenizer.json", "gen_config.json"]
    root = resolve_folder(name_or_path, allow_patterns=patterns)
    if not ((root / "tokenizer.json").is_file() and (root / "gen_config.json").is_file()):
        root = resolve_folder(GEN_REPO, allow_patterns=patterns)
    return root / "tokenizer.json", root / "gen_config.json"
