"""Data pipeline: example layout, multidatabackend loading and validation, cropping, the batch sampler,
and the built-in tiny assets."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hmtiny.checkpoint import load_heartmula
from hmtiny.config import GenConfig, ModelConfig, StackConfig
from hmtiny.data import (AudioTokenDataset, BucketBatchSampler, DatasetError, Sample, build_example,
                         check_audio_tokens, collate, load_dataset, read_backends)
from hmtiny.text import PromptTokenizer

TINY = Path(__file__).resolve().parents[1] / "hmtiny" / "assets" / "tiny"
K = 8


def small_cfg(max_seq_len: int = 256, text_vocab_size: int = 64) -> ModelConfig:
    st = StackConfig(num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=8, intermediate_dim=16,
                     max_seq_len=max_seq_len)
    return ModelConfig(backbone=st, decoder=StackConfig(**{**vars(st), "max_seq_len": 16}),
                       text_vocab_size=text_vocab_size, audio_vocab_size=69, muq_dim=4,
                       gen=GenConfig(text_bos_id=1, text_eos_id=2, audio_eos_id=65))


def char_tokenizer(vocab: int = 64) -> PromptTokenizer:
    """One id per character (3 + ord % (vocab-3)): deterministic and dependency-free."""
    return PromptTokenizer(lambda s: [3 + ord(c) % (vocab - 3) for c in s], GenConfig(1, 2, 65, 0))


def tokens(frames: int, seed: int = 0, high: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=(frames, K)).astype(np.int64)


def write_backends(path: Path, backends: list) -> Path:
    path.write_text(json.dumps(backends))
    return path


def local_backend(folder, **extra) -> dict:
    return {"id": "local", "type": "local", "dataset_type": "audio", "instance_data_dir": str(folder),
            "caption_strategy": "textfile", "metadata_backend": "discovery", **extra}


def track(folder: Path, name: str, tags="pop, happy", lyrics=None, toks=None, ext=".wav", npz_key=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}{ext}").write_bytes(b"")  # the audio is never read
    if tags is not None:
        (folder / f"{name}.txt").write_text(tags + "\n")
    if lyrics is not None:
        (folder / f"{name}.lyrics").write_text(lyrics + "\n")
    if toks is not None:
        if npz_key:
            np.savez(folder / f"{name}.tokens.npz", **{npz_key: toks})
        else:
            np.save(folder / f"{name}.tokens.npy", toks)


# ---------------------------------------------------------------- example layout
def test_layout_matches_fixture_forward(fixtures):
    cases = json.loads((fixtures / "heartmula" / "cases.json").read_text())["cases"]["forward"]
    ref = load_file(str(fixtures / "heartmula" / "cases.safetensors"))
    examples = []
    for b, s in enumerate(cases["samples"]):
        # a fake tokenizer whose outputs are the sample's ids without the BOS/EOS the builder adds
        tag_body, lyric_body = s["tag_ids"][1:-1], s["lyric_ids"][1:-1]
        pt = PromptTokenizer(lambda t: tag_body if t.startswith("<tag>") else lyric_body, GenConfig(500, 501, 8193, 0))
        prompt, mask, muq_idx = pt.prompt("tags", "lyrics")
        P, n = len(prompt), s["n_audio_frames"]
        examples.append(build_example(prompt, mask, muq_idx, ref["forward.tokens"][b, P:P + n, :K].numpy()))
    batch = collate(examples)
    for key in ("tokens", "tokens_mask", "audio_frame_mask", "muq_idx"):
        assert torch.equal(batch[key], ref[f"forward.{key}"]), key


def test_collate_padding():
    pt = char_tokenizer()
    a = build_example(*pt.prompt("ab", ""), tokens(5))
    b = build_example(*pt.prompt("abcd", "xy"), tokens(2, seed=1))
    batch = collate([a, b], pad_to=24)
    S = batch["tokens"].shape[1]
    assert S == 24 and batch["lengths"].tolist() == [len(a["tokens"]), len(b["tokens"])]
    for i, e in enumerate((a, b)):
        n = len(e["tokens"])
        assert torch.equal(batch["tokens"][i, :n], e["tokens"])
        assert (batch["tokens"][i, n:] == 0).all() and not batch["tokens_mask"][i, n:].any()
        assert not batch["audio_frame_mask"][i, n:].any()
    rows = a["tokens_mask"][a["audio_frame_mask"]]
    assert rows[:, :K].all() and not rows[:, K].any()  # audio rows: codebooks live, text column not
    assert (a["tokens"][a["audio_frame_mask"], K] == 0).all()
    with pytest.raises(ValueError, match="pad_to"):
        collate([a, b], pad_to=3)


# ---------------------------------------------------------------- token arrays
def test_check_audio_tokens_shapes():
    t = tokens(10)
    assert np.array_equal(check_audio_tokens(t, K, 64), t)
    assert np.array_equal(check_audio_tokens(t.T, K, 64), t)  # [8, frames] is transposed
    assert check_audio_tokens(t.tolist(), K, 64).shape == (10, K)


@pytest.mark.parametrize("arr,match", [
    (np.zeros((8, 8), dtype=np.int64), "ambiguous"),
    (np.zeros((10, 4), dtype=np.int64), "neither axis has 8"),
    (np.zeros((10,), dtype=np.int64), "shape"),
    (np.full((10, 8), 64), "out of range"),
    (np.full((10, 8), -1), "out of range"),
    (np.zeros((10, 8), dtype=np.float32), "dtype float32"),
    (np.zeros((0, 8), dtype=np.int64), "empty"),
    ([[1, 2], [3]], "rectangular"),
])
def test_check_audio_tokens_rejects(arr, match):
    with pytest.raises(ValueError, match=match):
        check_audio_tokens(arr, K, 64)


# ---------------------------------------------------------------- local backend
def test_local_backend_sources(tmp_path):
    data = tmp_path / "data"
    track(data, "a", tags="Rock, Sad", lyrics="[Verse]\nHello", toks=tokens(12))
    track(data, "b.take2", lyrics="dots", toks=tokens(9).T, ext=".flac")  # [8, frames]; a dotted name
    track(data, "c", toks=tokens(10), npz_key="tokens", ext=".mp3")
    track(data, "d", toks=tokens(11), npz_key="codes", ext=".ogg")       # the only array of the npz
    track(data / "sub", "e", toks=tokens(13), ext=".opus")               # discovery recurses
    track(data, "f", ext=".m4a")                                          # tokens via metadata.jsonl path
    np.save(data / "f_codes.npy", tokens(14))
    track(data, "g", ext=".aac")                                          # tokens inline in metadata.jsonl
    (data / "metadata.jsonl").write_text(
        json.dumps({"file_name": "f.m4a", "audio_tokens_path": "f_codes.npy"}) + "\n\n"
        + json.dumps({"file_name": "g.aac", "audio_tokens": tokens(15).tolist(), "lyrics": "meta lyrics"}) + "\n")
    track(data, "h", tags=None, ext=".wma")                               # tags and tokens from metadata.csv
    with (data / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["file_name", "tags", "audio_tokens"])
        w.writeheader()
        w.writerow({"file_name": "h.wma", "tags": "csv tags", "audio_tokens": json.dumps(tokens(16).tolist())})
    (data / "notes.txt").write_text("not a sample")
    cfg_path = write_backends(tmp_path / "multidatabackend.json", [local_backend("data")])  # relative path
    samples = {Path(s.source).stem[0]: s for s in read_backends(cfg_path, small_cfg())}
    assert sorted(samples) == list("abcdefgh")
    assert samples["a"].tags == "Rock, Sad\n" and samples["a"].lyrics == "[Verse]\nHello\n"
    assert samples["b"].lyrics == "dots\n" and samples["c"].lyrics == ""  # no .lyrics file: instrumental
    assert samples["g"].lyrics == "meta lyrics" and samples["h"].tags == "csv tags"
    assert [len(samples[k].audio_tokens) for k in "abcdefgh"] == [12, 9, 10, 11, 13, 14, 15, 16]
    assert np.array_equal(samples["b"].audio_tokens, tokens(9))


def test_relative_paths_cwd_first_then_beside_the_config(tmp_path, monkeypatch):
    cfg_dir, cwd, elsewhere = tmp_path / "config", tmp_path / "work", tmp_path / "elsewhere"
    track(cfg_dir / "d", "a", toks=tokens(10))
    track(cwd / "d", "a", toks=tokens(10))
    track(cwd / "d", "b", toks=tokens(10))
    elsewhere.mkdir()
    path = write_backends(cfg_dir / "multidatabackend.json", [local_backend("d")])
    monkeypatch.chdir(cwd)
    assert len(read_backends(path, small_cfg())) == 2  # SimpleTuner semantics: the working directory
    monkeypatch.chdir(elsewhere)
    assert len(read_backends(path, small_cfg())) == 1  # not there: beside the multidatabackend.json
    track(elsewhere / "dataset", "x", toks=tokens(10))  # the built-in config ignores the working directory
    assert len(read_backends(TINY / "multidatabackend.json", small_cfg())) >= 8


def test_local_backend_reports_every_problem_with_its_file(tmp_path):
    data = tmp_path / "bad"
    track(data, "ok", toks=tokens(10))
    track(data, "no_tokens")
    track(data, "square", toks=np.zeros((8, 8), dtype=np.int64))
    track(data, "four_books", toks=np.zeros((10, 4), dtype=np.int64))
    track(data, "too_high", toks=np.full((10, 8), 64))
    track(data, "negative", toks=np.full((10, 8), -3))
    track(data, "floats", toks=np.zeros((10, 8), dtype=np.float64))
    track(data, "empty", toks=np.zeros((0, 8), dtype=np.int64))
    track(data, "no_tags", tags=None, toks=tokens(10))
    track(data, "pickled")
    np.save(data / "pickled.tokens.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    track(data, "torchfile")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "torchfile.wav", "audio_tokens_path": "t.pt"}))
    torch.save(torch.zeros(10, 8, dtype=torch.long), data / "t.pt")
    with pytest.raises(DatasetError) as err:
        read_backends([local_backend(data)], small_cfg())
    problems = err.value.problems
    bad = ["no_tokens", "square", "four_books", "too_high", "negative", "floats", "empty", "no_tags", "pickled",
           "torchfile"]
    assert len(problems) == len(bad)
    for name, match in zip(bad, ["no tokens", "ambiguous", "neither axis", "id 64 is out of range",
                                 "id -3 is out of range", "dtype float64", "empty", "no tags", "unpickling",
                                 "not .npy or .npz"]):
        hits = [p for p in problems if f"{data / name}." in p]
        assert len(hits) == 1 and match in hits[0], (name, problems)
    assert str(data / "ok.wav") not in str(err.value)


def test_backend_list_handling(tmp_path):
    data = tmp_path / "d"
    track(data, "a", toks=tokens(10))
    notes = []
    samples = read_backends([
        local_backend(data),
        {"id": "off", "type": "aws", "dataset_type": "audio", "disabled": True},     # disabled: never looked at
        {"id": "embeds", "type": "local", "dataset_type": "text_embeds", "cache_dir": "cache/text"},
    ], small_cfg(), log=notes.append)
    assert len(samples) == 1 and any("embeds" in n and "text_embeds" in n for n in notes)
    with pytest.raises(DatasetError) as err:
        read_backends([local_backend(data), {"id": "s3", "type": "aws", "dataset_type": "audio"},
                       {"id": "pics", "type": "local", "dataset_type": "image", "instance_data_dir": "x"},
                       local_backend(tmp_path / "missing"),
                       local_backend(data, caption_strategy="filename")], small_cfg())
    text = str(err.value)
    assert len(err.value.problems) == 4
    assert "'s3'" in text and "'aws'" in text and "'pics'" in text and "image" in text
    assert str(tmp_path / "missing") in text and "caption_strategy 'filename'" in text
    with pytest.raises(DatasetError, match="no enabled audio backend"):
        read_backends([{**local_backend(data), "disabled": True}], small_cfg())
    with pytest.raises(FileNotFoundError):
        read_backends(tmp_path / "nope.json", small_cfg())


# ---------------------------------------------------------------- huggingface backend (local folder)
@pytest.fixture(autouse=True)
def _plain_hf_reader(monkeypatch):
    """These tests describe the dependency-free jsonl/parquet reader: keep it where `datasets` is installed too."""
    import hmtiny.data as data
    monkeypatch.setattr(data, "_datasets_library", lambda: None)


def hf_backend(root, **config) -> dict:
    return {"id": "hf", "type": "huggingface", "dataset_type": "audio", "dataset_name": str(root),
            "metadata_backend": "huggingface", "caption_strategy": "huggingface", "config": config}


def test_hf_backend_jsonl(tmp_path):
    root = tmp_path / "hfdata"
    (root / "data").mkdir(parents=True)
    np.save(root / "data" / "x.npy", tokens(20).T)
    rows = [{"genre": "Jazz", "mood": ["calm", "slow"], "text": "La la", "audio_tokens": tokens(12).tolist()},
            {"genre": "Rock", "mood": None, "audio_tokens_path": "data/x.npy"},  # no lyrics column: instrumental
            {"genre": "Pop", "mood": "sad", "text": "x", "audio_tokens": np.zeros((8, 8), int).tolist()},
            {"genre": "Pop", "mood": "sad", "text": "x"}]
    (root / "data" / "train-00000.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n[1, 2]\n")
    (root / "data" / "test-00000.jsonl").write_text(json.dumps(rows[0]) + "\n")  # not the train split: ignored
    backend = hf_backend(root, audio_caption_fields=["genre", "mood"], lyrics_column="text")
    with pytest.raises(DatasetError) as err:
        read_backends([backend], small_cfg())
    f = root / "data" / "train-00000.jsonl"
    assert len(err.value.problems) == 4
    assert any(p.startswith(f"{f}:6:") and "JSON object" in p for p in err.value.problems)
    assert any(p.startswith(f"{f}:3:") and "ambiguous" in p for p in err.value.problems)
    assert any(p.startswith(f"{f}:4:") and "audio_tokens_path" in p for p in err.value.problems)
    assert any(p.startswith(f"{f}:5:") and "JSON" in p for p in err.value.problems)
    (f).write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    samples = read_backends([backend], small_cfg())
    assert [(s.tags, s.lyrics, len(s.audio_tokens)) for s in samples] == [("Jazz, calm, slow", "La la", 12),
                                                                          ("Rock", "", 20)]


def test_hf_backend_unreachable_repo_is_reported(tmp_path, monkeypatch):
    import hmtiny.data as data

    def offline(name, revision=None):
        raise FileNotFoundError(f"dataset {name!r} is neither a local folder nor reachable")

    monkeypatch.setattr(data, "_fetch_dataset", offline)
    with pytest.raises(DatasetError, match="your-org/tokens"):
        read_backends([hf_backend("your-org/tokens")], small_cfg())


def test_hf_backend_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    root = tmp_path / "pq"
    root.mkdir()
    table = pa.table({"tags": ["Folk", "Ambient"], "lyrics": ["hey", None],
                      "audio_tokens": [tokens(10).tolist(), tokens(11, seed=3).T.tolist()]})
    pq.write_table(table, root / "train.parquet")
    samples = read_backends([hf_backend(root)], small_cfg())
    assert [(s.tags, s.lyrics, s.audio_tokens.shape) for s in samples] == [("Folk", "hey", (10, 8)),
                                                                          ("Ambient", "", (11, 8))]
    assert np.array_equal(samples[1].audio_tokens, tokens(11, seed=3))


def test_hf_backend_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an import of pyarrow now fails, installed or not
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="pyarrow"):
        read_backends([hf_backend(tmp_path)], small_cfg())


# ---------------------------------------------------------------- dataset: prompts, cropping
def test_dataset_crops_long_clips(tmp_path):
    pt, cfg = char_tokenizer(), small_cfg(max_seq_len=40)
    long, short = tokens(100), tokens(5, seed=1)
    samples = [Sample("long.wav", "ab", "", long), Sample("short.wav", "ab", "cd", short)]
    notes = []
    ds = AudioTokenDataset(samples, pt, cfg, seed=7, log=notes.append)
    assert len(notes) == 1 and "long.wav" in notes[0] and "40" in notes[0]
    P = len(pt.prompt("ab", "")[0])
    assert ds.lengths == [40, len(pt.prompt("ab", "cd")[0]) + 5]
    windows = []
    for epoch in range(6):
        e = ds.example(0, epoch)
        assert len(e["tokens"]) == 40 and e["audio_frame_mask"].sum() == 40 - P
        audio = e["tokens"][P:, :K].numpy()
        start = next(s for s in range(len(long) - len(audio) + 1) if np.array_equal(long[s:s + len(audio)], audio))
        windows.append(start)
        assert torch.equal(ds.example(0, epoch)["tokens"], e["tokens"])  # a pure function of (seed, epoch, i)
    assert len(set(windows)) > 1  # a random window, not always the start
    assert torch.equal(ds.example(1, 3)["tokens"][-5:, :K], torch.as_tensor(short))
    batch = ds.batch([0, 1], epoch=2)
    assert batch["tokens"].shape == (2, 40, 9)


def test_dataset_rejects_prompt_problems():
    pt = char_tokenizer(vocab=64)
    too_long = Sample("wordy.wav", "x" * 50, "", tokens(5))
    big_ids = Sample("vocab.wav", "ab", "", tokens(5))
    with pytest.raises(DatasetError) as err:
        AudioTokenDataset([too_long, big_ids], pt, small_cfg(max_seq_len=40, text_vocab_size=10))
    assert len(err.value.problems) == 3  # wordy: too long + ids; vocab: ids
    assert any("wordy.wav" in p and "prompt alone" in p for p in err.value.problems)
    assert any("vocab.wav" in p and "text_vocab_size 10" in p for p in err.value.problems)


def test_load_dataset_reports_file_and_prompt_problems_together(tmp_path):
    data = tmp_path / "d"
    track(data, "bad", toks=np.zeros((8, 8), dtype=np.int64))
    track(data, "wordy", tags="x" * 60, toks=tokens(5))
    with pytest.raises(DatasetError) as err:
        load_dataset([local_backend(data)], char_tokenizer(), small_cfg(max_seq_len=40))
    assert len(err.value.problems) == 2


# ---------------------------------------------------------------- sampler
def test_sampler_epochs_are_seeded_permutations():
    lengths = list(range(10, 40))
    s = BucketBatchSampler(lengths, batch_size=4, seed=3)
    e0, e1 = s.batches(0), s.batches(1)
    assert len(s) == len(e0) == 8
    for epoch in (e0, e1):
        assert sorted(i for b in epoch for i in b) == list(range(30))
    assert e0 != e1
    assert BucketBatchSampler(lengths, 4, seed=3).batches(1) == e1
    assert BucketBatchSampler(lengths, 4, seed=4).batches(0) != e0
    assert all(len(b) == 4 for b in BucketBatchSampler(lengths, 4, seed=3, drop_last=True).batches(0))
    assert BucketBatchSampler(lengths, 4, shuffle=False, bucket_batches=0).batches(0)[0] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot fill"):
        BucketBatchSampler([5, 6], 4, drop_last=True)


def spread(lengths, batches):
    return np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])


def test_sampler_buckets_similar_lengths():
    lengths = np.random.default_rng(0).permutation(64).tolist()
    exact = BucketBatchSampler(lengths, 4, seed=1, bucket_batches=16, length_jitter=0).batches(0)
    assert spread(lengths, exact) == 3  # one chunk, sorted: consecutive lengths
    assert spread(lengths, BucketBatchSampler(lengths, 4, seed=1).batches(0)) < 10  # jittered buckets
    assert spread(lengths, BucketBatchSampler(lengths, 4, seed=1, bucket_batches=0).batches(0)) > 20  # none


def test_sampler_batch_membership_changes_between_epochs():
    lengths = [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]  # a small dataset: one bucket chunk
    s = BucketBatchSampler(lengths, 4, seed=0)
    groups = [sorted(map(sorted, s.batches(e))) for e in range(4)]
    assert any(g != groups[0] for g in groups[1:])


def test_sampler_resume_replays_the_same_batches():
    lengths = [5, 9, 3, 7, 7, 2, 8, 1, 6, 4]
    straight = BucketBatchSampler(lengths, 4, seed=11)
    run = [straight.next_batch() for _ in range(10)]  # 3 batches per epoch: crosses 3 epoch boundaries
    first = BucketBatchSampler(lengths, 4, seed=11)
    part = [first.next_batch() for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint files)
    resumed = BucketBatchSampler(lengths, 4, seed=11)
    resumed.load_state_dict(state)
    assert part + [resumed.next_batch() for _ in range(6)] == run
    # iterating epoch by epoch gives the same stream
    it = BucketBatchSampler(lengths, 4, seed=11)
    stream = [(it.epoch, b) for _ in range(4) for b in it]
    assert stream[:10] == run


def test_sampler_state_mismatch_warns():
    s = BucketBatchSampler(list(range(12)), 4, seed=0)
    for _ in range(2):
        s.next_batch()
    notes = []
    other = BucketBatchSampler(list(range(12)), 2, seed=0)
    other.load_state_dict(s.state_dict(), log=notes.append)
    assert notes and "batch size" in notes[0] and (other.epoch, other.index) == (0, 4)


# ---------------------------------------------------------------- the built-in tiny assets
def test_tiny_assets_load_and_train_step():
    model = load_heartmula(TINY / "model")
    cfg = model.cfg
    assert cfg.codebook_size == 64 and cfg.gen.audio_eos_id == 65 and cfg.audio_num_codebooks == K
    pt = PromptTokenizer.from_pretrained(TINY / "model")
    assert pt.gen == cfg.gen and pt.vocab_size == cfg.text_vocab_size
    train_cfg = json.loads((TINY / "config.json").read_text())
    assert train_cfg["model_family"] == "heartmula" and train_cfg["model_type"] == "lora"
    assert (TINY / train_cfg["pretrained_model_name_or_path"]).resolve() == (TINY / "model").resolve()
    notes = []
    ds = load_dataset(TINY / train_cfg["data_backend_config"], pt, cfg, seed=train_cfg["seed"], log=notes.append)
    assert 8 <= len(ds) <= 16 and not notes  # nothing cropped, no skipped backend
    assert any(s.lyrics == "" for s in ds.samples) and any(s.lyrics for s in ds.samples)
    assert all(25 <= len(s.audio_tokens) <= 75 for s in ds.samples)
    sampler = BucketBatchSampler(ds.lengths, train_cfg["train_batch_size"], seed=train_cfg["seed"])
    epoch, idx = sampler.next_batch()
    batch = ds.batch(idx, epoch)
    loss, _ = model.loss(batch["tokens"], batch["tokens_mask"], batch["audio_frame_mask"], batch["muq_idx"])
    assert torch.isfinite(loss)
    size = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert size < 2 * 1024 * 1024, f"built-in assets are {size / 1024:.0f} KiB"


def test_tiny_codec_loads():
    from hmtiny.codec import HeartCodec
    codec = HeartCodec.load(TINY / "codec")
    assert codec.cfg.codebook_size == load_heartmula(TINY / "model").cfg.codebook_size == 64
    assert codec.cfg.num_quantizers == K


def test_tiny_assets_are_what_the_script_makes(tmp_path):
    from hmtiny import tiny
    tiny.main(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert Path("codec/model.safetensors") in made and Path("model/model.safetensors") in made
    for rel in made:
        ours, theirs = (TINY / rel).read_bytes(), (tmp_path / rel).read_bytes()
        if rel.suffix == ".json":  # formatting may vary between library versions; content may not
            ours, theirs = json.loads(ours), json.loads(theirs)
        assert ours == theirs, f"{rel} differs: run python -m hmtiny.tiny"
    assert sorted(p.relative_to(TINY) for p in TINY.rglob("*") if p.is_file()) == made
