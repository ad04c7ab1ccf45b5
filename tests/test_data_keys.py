"""SimpleTuner's per-backend keys: repeats, disabled, split/revision/subset, unknown keys; hub token paths; the
`datasets` library and the plain reader agreeing."""
import json

import numpy as np
import pytest

import hmtiny.data as data
from hmtiny.data import DatasetError, read_backends
from test_data import local_backend, small_cfg, tokens, track


def hf_backend(root, **keys) -> dict:
    return {"id": "hf", "type": "huggingface", "dataset_type": "audio", "dataset_name": str(root),
            "metadata_backend": "huggingface", "caption_strategy": "huggingface", **keys}


@pytest.fixture
def plain_reader(monkeypatch):
    """The dependency-free jsonl/parquet reader, whether or not `datasets` is installed."""
    monkeypatch.setattr(data, "_datasets_library", lambda: None)


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def split_dataset(root):
    """train/validation files in the hub's shard layout, and a 'live' subset folder with its own train file."""
    write_rows(root / "data" / "train-00000-of-00001.jsonl",
               [{"tags": "jazz", "lyrics": "la", "audio_tokens": tokens(10).tolist()},
                {"tags": "rock", "audio_tokens_path": "tok/a.npy"}])
    write_rows(root / "data" / "validation-00000-of-00001.jsonl",
               [{"tags": "folk", "audio_tokens": tokens(11, seed=2).tolist()}])
    write_rows(root / "live" / "train.jsonl", [{"tags": "live", "audio_tokens": tokens(12, seed=3).tolist()}])
    (root / "tok").mkdir()
    np.save(root / "tok" / "a.npy", tokens(13, seed=4))


def test_repeats_disabled_and_simpletuner_keys(tmp_path, plain_reader):
    track(tmp_path / "a", "one", toks=tokens(9))
    track(tmp_path / "a", "two", toks=tokens(10, seed=1))
    notes = []
    backends = [local_backend(tmp_path / "a", repeats=2, crop=True, cache_dir_vae="cache/vae"),
                local_backend(tmp_path / "b-missing", id="off", disabled=True),
                local_backend(tmp_path / "c-missing", id="off2", disable=True)]
    samples = read_backends(backends, small_cfg(), log=notes.append)
    assert [s.source.rsplit("/", 1)[-1] for s in samples] == ["one.wav", "two.wav"] * 3
    assert any("each seen 3 times" in n for n in notes)
    assert any("'local'" in n and "cache_dir_vae, crop" in n for n in notes)


@pytest.mark.parametrize("bad, message", [
    ({"repeat": 3}, "unknown key 'repeat': did you mean 'repeats'?"),
    ({"instance_data_dri": "x"}, "unknown key 'instance_data_dri': did you mean 'instance_data_dir'?"),
    ({"repeats": -1}, "repeats must be a whole number >= 0"),
    ({"repeats": "2"}, "repeats must be a whole number >= 0"),
])
def test_backend_typos_are_errors_naming_the_backend(tmp_path, bad, message):
    track(tmp_path / "a", "one", toks=tokens(9))
    with pytest.raises(DatasetError) as e:
        read_backends([local_backend(tmp_path / "a", id="my-songs", **bad)], small_cfg())
    assert any(p.startswith("backend 'my-songs'") and message in p for p in e.value.problems)


def test_hf_split_and_subset_choose_files(tmp_path, plain_reader):
    root = tmp_path / "ds"
    split_dataset(root)
    cfg = small_cfg()
    train = read_backends([hf_backend(root)], cfg)
    assert [(s.tags, len(s.audio_tokens)) for s in train] == [("jazz", 10), ("rock", 13)]
    val = read_backends([hf_backend(root, split="validation")], cfg)
    assert [(s.tags, len(s.audio_tokens)) for s in val] == [("folk", 11)]
    for key in ("subset", "config_name"):
        live = read_backends([hf_backend(root, **{key: "live"})], cfg)
        assert [(s.tags, len(s.audio_tokens)) for s in live] == [("live", 12)]
    with pytest.raises(DatasetError, match="split 'test'"):
        read_backends([hf_backend(root, split="test")], cfg)
    with pytest.raises(DatasetError, match="subset 'nope' is not a folder"):
        read_backends([hf_backend(root, subset="nope")], cfg)


def test_hub_revision_is_passed_and_token_paths_stay_inside(tmp_path, monkeypatch, plain_reader):
    root = tmp_path / "snapshot"
    split_dataset(root)
    write_rows(root / "data" / "train-00000-of-00001.jsonl",
               [{"tags": "ok", "audio_tokens_path": "tok/a.npy"},
                {"tags": "up", "audio_tokens_path": "../secret.npy"},
                {"tags": "abs", "audio_tokens_path": str(root / "tok" / "a.npy")}])
    np.save(tmp_path / "secret.npy", tokens(9))  # exists, but outside the snapshot
    asked = []

    def fetch(name, revision=None):
        asked.append((name, revision))
        return root

    monkeypatch.setattr(data, "_fetch_dataset", fetch)
    with pytest.raises(DatasetError) as e:
        read_backends([hf_backend("org/songs", revision="v1.0")], small_cfg())
    assert asked == [("org/songs", "v1.0")]
    problems = e.value.problems
    f = root / "data" / "train-00000-of-00001.jsonl"
    assert len(problems) == 2
    assert problems[0].startswith(f"{f}:2:") and "'../secret.npy' leaves the downloaded dataset folder" in problems[0]
    assert problems[1].startswith(f"{f}:3:") and "leaves the downloaded dataset folder" in problems[1]
    # a local folder may point anywhere, as before
    assert [s.tags for s in read_backends([hf_backend(root)], small_cfg())] == ["ok", "up", "abs"]


def test_datasets_library_and_plain_reader_give_the_same_samples(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "ds"
    split_dataset(root)
    cfg = small_cfg()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    for keys in ({}, {"split": "validation"}, {"subset": "live"}):
        with_library = read_backends([hf_backend(root, **keys)], cfg)
        monkeypatch.setattr(data, "_datasets_library", lambda: None)
        plain = read_backends([hf_backend(root, **keys)], cfg)
        monkeypatch.undo()
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
        assert [(s.tags, s.lyrics) for s in with_library] == [(s.tags, s.lyrics) for s in plain]
        assert all(np.array_equal(a.audio_tokens, b.audio_tokens) for a, b in zip(with_library, plain))
        assert "row 0" in with_library[0].source
