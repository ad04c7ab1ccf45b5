"""Model configuration: HeartMuLa's `config.json` and the Llama-3.2 flavours it names."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class StackConfig:
    """One Llama-3.2 transformer stack (the backbone or the depth decoder)."""
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    # Llama-3 frequency scaling. The official builder passes only scale_factor; the other three are
    # torchtune's defaults and apply to BOTH stacks (the decoder too, although its max_seq_len is 2048).
    scale_factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    old_context_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @classmethod
    def from_dict(cls, d: dict) -> "StackConfig":
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim",
                               "max_seq_len") if k not in d]
        if missing:
            raise ValueError(f"stack config is missing {missing}")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if "head_dim" in d and d["head_dim"] != cfg.head_dim:
            raise ValueError(f"head_dim {d['head_dim']} != embed_dim/num_heads = {cfg.head_dim}")
        return cfg


# The official flavours (torchtune llama3_2 arguments used by heartlib).
FLAVOURS: dict[str, StackConfig] = {
    "llama-3B": StackConfig(num_layers=28, num_heads=24, num_kv_heads=8, embed_dim=3072,
                            intermediate_dim=8192, max_seq_len=8192),
    "llama-300M": StackConfig(num_layers=3, num_heads=8, num_kv_heads=4, embed_dim=3072,
                              intermediate_dim=8192, max_seq_len=2048),
    "llama-7B": StackConfig(num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                            intermediate_dim=14336, max_seq_len=8192),
    "llama-400M": StackConfig(num_layers=4, num_heads=8, num_kv_heads=4, embed_dim=3072,
                              intermediate_dim=8192, max_seq_len=2048),
}


@dataclass
class GenConfig:
    """Special ids (HeartMuLaGen's gen_config.json)."""
    text_bos_id: int = 128000
    text_eos_id: int = 128001
    audio_eos_id: int = 8193
    empty_id: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "GenConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> "GenConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class ModelConfig:
    backbone: StackConfig
    decoder: StackConfig
    text_vocab_size: int = 128256
    audio_vocab_size: int = 8197
    audio_num_codebooks: int = 8
    muq_dim: int = 512
    backbone_flavor: str = "llama-3B"
    decoder_flavor: str = "llama-300M"
    gen: GenConfig = field(default_factory=GenConfig)

    @property
    def dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def codebook_size(self) -> int:
        """Ids the codec can decode: 0..codebook_size-1 (8192 for the real model; the vocab adds 5 specials,
        of which audio_eos_id = codebook_size + 1)."""
        return self.audio_vocab_size - 5

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Read HeartMuLa's config.json (a PretrainedConfig dump: extra metadata keys are ignored)."""
        required = ("backbone_flavor", "decoder_flavor", "text_vocab_size", "audio_vocab_size",
                    "audio_num_codebooks", "muq_dim")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"model config.json is missing required field(s) {missing}")

        def stack(name_key: str, dict_key: str) -> StackConfig:
            if isinstance(d.get(dict_key), dict):  # explicit dims (tiny test models)
                return StackConfig.from_dict(d[dict_key])
            name = d[name_key]
            if name not in FLAVOURS:
                raise ValueError(f"unknown {name_key} {name!r}: known flavours are {sorted(FLAVOURS)} "
                                 f"(or give an explicit '{dict_key}' dict)")
            return StackConfig(**vars(FLAVOURS[name]))

        backbone, decoder = stack("backbone_flavor", "backbone"), stack("decoder_flavor", "decoder")
        if backbone.embed_dim != decoder.embed_dim:
            raise ValueError("backbone and decoder must share embed_dim")
        gen = GenConfig.from_dict(d["gen_config"]) if isinstance(d.get("gen_config"), dict) else GenConfig()
        return cls(backbone=backbone, decoder=decoder, text_vocab_size=int(d["text_vocab_size"]),
                   audio_vocab_size=int(d["audio_vocab_size"]), audio_num_codebooks=int(d["audio_num_codebooks"]),
                   muq_dim=int(d["muq_dim"]), backbone_flavor=d["backbone_flavor"],
                   decoder_flavor=d["decoder_flavor"], gen=gen)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        """The config.json we write: official fields, plus explicit stacks for non-official flavours."""
        d = {"model_type": "heartmula", "architectures": ["HeartMuLa"],
             "backbone_flavor": self.backbone_flavor, "decoder_flavor": self.decoder_flavor,
             "text_vocab_size": self.text_vocab_size, "audio_vocab_size": self.audio_vocab_size,
             "audio_num_codebooks": self.audio_num_codebooks, "muq_dim": self.muq_dim}
        for key, name, st in (("backbone", self.backbone_flavor, self.backbone),
                              ("decoder", self.decoder_flavor, self.decoder)):
            if FLAVOURS.get(name) != st:
                d[key] = dict(vars(st), head_dim=st.head_dim)
        if self.gen != GenConfig():
            d["gen_config"] = vars(self.gen).copy()
        return d

    @classmethod
    def official_3b(cls) -> "ModelConfig":
        return cls.from_dict({"backbone_flavor": "llama-3B", "decoder_flavor": "llama-300M",
                              "text_vocab_size": 128256, "audio_vocab_size": 8197,
                              "audio_num_codebooks": 8, "muq_dim": 512})
