"""Bad input and interrupted runs, driven as a user drives them: `python train.py ...` / `python sample.py ...` in a
subprocess. Every bad input ends in exit code 1 and `error: ...` naming the file, key or flag, with no traceback
and the user's files untouched; a training run killed at any moment resumes from its last complete checkpoint and
ends with the LoRA of an uninterrupted run."""
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "hmtiny" / "assets" / "tiny"


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def make_run(folder: Path, tracks=("01", "02", "03"), **overrides) -> Path:
    """A user's run folder: data/ (a few tiny tracks), multidatabackend.json and config.json (absolute paths)."""
    data = folder / "data"
    data.mkdir(parents=True)
    for t in tracks:
        for f in TINY.glob(f"dataset/track_{t}.*"):
            shutil.copy(f, data / f.name)
    (folder / "multidatabackend.json").write_text(json.dumps([
        {"id": "tiny", "type": "local", "dataset_type": "audio", "instance_data_dir": str(data)}]))
    cfg = {"pretrained_model_name_or_path": str(TINY / "model"),
           "data_backend_config": str(folder / "multidatabackend.json"), "output_dir": str(folder / "out"),
           "mixed_precision": "no", "seed": 3, "train_batch_size": 1,
           "learning_rate": 3e-3, "lr_scheduler": "constant", "max_train_steps": 2, "num_train_epochs": 0,
           "lora_rank": 4, "lora_dropout": 0.0, "gradient_checkpointing": False, "checkpointing_steps": 1,
           "checkpoints_total_limit": None, "validation_prompt": None}
    cfg.update(overrides)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "config.json"


def script(name: str, args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def tiny_lora(path: Path, alpha: str | None = None, nan: bool = False) -> Path:
    """A rank-2 LoRA for the tiny model, optionally with a NaN weight or another lora_alpha in its metadata."""
    from hmtiny.checkpoint import load_heartmula
    from hmtiny.lora import inject_lora, save_lora
    model = load_heartmula(TINY / "model")
    inject_lora(model, rank=2)
    save_lora(model, path)
    if alpha is not None or nan:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        if nan:
            key = sorted(tensors)[0]
            tensors[key][0, 0] = float("nan")
        if alpha is not None:
            meta["lora_alpha"] = alpha
            meta.pop("lora_adapter_metadata", None)
        save_file(tensors, str(path), metadata=meta)
    return path


def truncated_copy(src: Path, dst: Path, garbage: bool = False) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"this is not a safetensors file" * 8 if garbage else data[: len(data) // 2])
    return dst


# ---------------------------------------------------------------- the table: (script, case builder, expected)
def bad_data(d: Path):
    """Several bad files at once: every one is named in the one error."""
    cfg = make_run(d)
    data = d / "data"
    (data / "track_01.txt").write_bytes(b"pop, \xff\xfe happy")  # Latin-1/UTF-16 bytes, not UTF-8
    (data / "track_02.lyrics").write_bytes(b"\xe9t\xe9 \xe0 la plage")
    for name in ("a", "b", "c", "d"):
        shutil.copy(data / "track_03.wav", data / f"{name}.wav")
    np.save(data / "tok.npy", np.load(data / "track_03.tokens.npy"))
    rows = [{"file_name": 5, "audio_tokens_path": "tok.npy"},
            {"file_name": "a.wav", "tags": 5, "audio_tokens_path": "tok.npy"},
            {"file_name": "b.wav", "tags": "pop", "lyrics": ["a"], "audio_tokens_path": "tok.npy"},
            {"file_name": "c.wav", "tags": "pop", "audio_tokens_path": 7}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [str(cfg)], ["track_01.txt", "track_02.lyrics", "UTF-8", "file_name must be", "tags must be text",
                        "lyrics must be text", "audio_tokens_path must be", "d.wav"]


def model_files(garbage: bool):
    def build(d: Path):
        truncated_copy(TINY / "model", d / "model", garbage)
        cfg = make_run(d, pretrained_model_name_or_path=str(d / "model"))
        return [str(cfg)], ["pretrained_model_name_or_path", str(d / "model" / "model.safetensors")]
    return build


def finished(d: Path, **overrides) -> Path:
    """A finished 2-step run (checkpoint-1, checkpoint-2) whose config the case then changes."""
    cfg = make_run(d)
    shutil.copytree(FINISHED, d / "out")
    if overrides:
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **overrides}))
    return cfg


def corrupt_optimizer(d: Path):
    cfg = finished(d, max_train_steps=3)
    opt = d / "out" / "checkpoint-2" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    return [str(cfg)], ["checkpoint-2", "optimizer.safetensors", "resume_from_checkpoint"]


def other_run(d: Path):
    cfg = finished(d, learning_rate=1e-2, max_train_steps=4)
    return [str(cfg)], ["learning_rate", "0.003", "0.01", "--resume_anyway=true"]


def output_dir_under_a_file(d: Path):
    cfg = make_run(d)
    (d / "notes.txt").write_text("my notes")
    return [str(cfg), f"--output_dir={d / 'notes.txt' / 'run'}"], ["output_dir", "notes.txt", "is a file"]


def nan_init_lora(d: Path):
    cfg = make_run(d)
    lora = tiny_lora(d / "nan.safetensors", nan=True)
    return [str(cfg), f"--init_lora={lora}"], ["init_lora", "nan.safetensors", "NaN"]


def config_not_utf8(d: Path):
    cfg = make_run(d)
    cfg.write_bytes(cfg.read_bytes().replace(b'"seed"', b'"s\xe9ed"'))
    return [str(cfg)], [str(cfg), "UTF-8"]


def train_flag(flag: str, *expected: str):
    def build(d: Path):
        return [str(make_run(d)), flag], list(expected)
    return build


def sample_args(*args: str, expected=()):
    def build(d: Path):
        return ["--demo", "--out", str(d / "song.wav"), *args], list(expected)
    return build


def sample_with_file(make, flag: str, expected=()):
    """--FLAG FILE where make(folder) writes the file."""
    def build(d: Path):
        path = make(d)
        return ["--demo", "--out", str(d / "song.wav"), flag, str(path)], [str(path), *expected]
    return build


def sample_model(garbage: bool, part: str):
    def build(d: Path):
        shutil.copy(TINY / "tokenizer.json", d / "tokenizer.json")
        shutil.copy(TINY / "gen_config.json", d / "gen_config.json")
        for name in ("model", "codec"):
            if name == part:
                truncated_copy(TINY / name, d / name, garbage)
            else:
                shutil.copytree(TINY / name, d / name)
        return (["--model", str(d / "model"), "--tags", "pop", "--duration", "0.4", "--out", str(d / "song.wav")],
                [str(d / part / "model.safetensors")])
    return build


def bytes_file(name: str, content: bytes):
    def make(d: Path) -> Path:
        (d / name).write_bytes(content)
        return d / name
    return make


CASES = {
    "train: bad data files": ("train.py", bad_data),
    "train: truncated model.safetensors": ("train.py", model_files(garbage=False)),
    "train: damaged optimizer.safetensors": ("train.py", corrupt_optimizer),
    "train: another run's output_dir": ("train.py", other_run),
    "train: output_dir under a file": ("train.py", output_dir_under_a_file),
    "train: init_lora holding NaN": ("train.py", nan_init_lora),
    "train: config not UTF-8": ("train.py", config_not_utf8),
    "train: codec guidance": ("train.py", train_flag("--validation_codec_guidance=-5", "validation_codec_guidance")),
    "sample: --duration inf": ("sample.py", sample_args("--duration", "inf", expected=["--duration", "finite"])),
    "sample: --codec-guidance -5": ("sample.py", sample_args("--codec-guidance", "-5", expected=["--codec-guidance"])),
    "sample: --lyrics names no file": ("sample.py", sample_args("--lyrics", "/no/such/lyrics.txt",
                                                               expected=["--lyrics", "/no/such/lyrics.txt"])),
    "sample: --tags file not UTF-8": ("sample.py", sample_with_file(bytes_file("tags.txt", b"pop, caf\xe9"), "--tags",
                                                                   ["UTF-8"])),
    "sample: --lora scale nan": ("sample.py", sample_with_file(lambda d: f"{tiny_lora(d / 'l.safetensors')}:nan",
                                                               "--lora", ["finite"])),
    "sample: LoRA holding NaN": ("sample.py", sample_with_file(lambda d: tiny_lora(d / "l.safetensors", nan=True),
                                                               "--lora", ["NaN"])),
    "sample: LoRA alpha 0": ("sample.py", sample_with_file(lambda d: tiny_lora(d / "l.safetensors", alpha="0"),
                                                           "--lora", ["alpha"])),
    "sample: LoRA not safetensors": ("sample.py", sample_with_file(bytes_file("l.safetensors", b"\x00" * 64), "--lora",
                                                                   ["safetensors"])),
    "sample: --out under a file": ("sample.py", lambda d: (["--demo", "--out", str(d / "notes.txt" / "song.wav")],
                                                           [bytes_file("notes.txt", b"mine")(d).name, "--out"])),
    "sample: truncated model.safetensors": ("sample.py", sample_model(False, "model")),
    "sample: garbage codec model.safetensors": ("sample.py", sample_model(True, "codec")),
}
FINISHED: Path


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Build every case, then run them all, two at a time (each is a fresh Python process)."""
    global FINISHED
    import train
    root = tmp_path_factory.mktemp("bad")
    base = make_run(root / "finished")
    assert train.main([str(base)]) == 0
    FINISHED = root / "finished" / "out"
    cases = {}
    for i, (name, (which, build)) in enumerate(CASES.items()):
        folder = root / f"case{i}"
        folder.mkdir()
        args, expected = build(folder)
        cases[name] = (which, args, expected, folder)

    def run(item):
        name, (which, args, expected, folder) = item
        before = tree_hash(folder)
        proc = script(which, args, folder)
        return name, (proc, expected, before, tree_hash(folder))

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, cases.items()))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_an_error_naming_it(results, name):
    proc, expected, before, after = results[name]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in: {proc.stderr}"
    assert after == before  # nothing written, nothing removed


def test_help_and_resume_anyway(tmp_path):
    """train.py --help is a usage text; the refused other run continues when asked to."""
    proc = script("train.py", ["--help"], tmp_path)
    assert proc.returncode == 0 and "usage: python train.py" in proc.stdout and "env=NAME" in proc.stdout
    import train
    cfg = make_run(tmp_path, max_train_steps=1)
    assert train.main([str(cfg)]) == 0
    assert train.main([str(cfg), "--learning_rate=0.01", "--max_train_steps=2"]) == 1
    assert train.main([str(cfg), "--learning_rate=0.01", "--max_train_steps=2", "--resume_anyway"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# ---------------------------------------------------------------- kill -9 at random moments
KILL_IN_SAVE = """
import os, signal, sys
import hmtiny.trainer as trainer
real, calls = trainer.save_file, []
def save_then_die(*args, **kwargs):  # checkpoint-2's optimizer file written, its rng file not yet
    real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
trainer.save_file = save_then_die
import train
sys.exit(train.main([sys.argv[1]]))
"""


def complete_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "training_state.json").is_file())


def run_and_kill(cfg: Path, after_step: int, delay: float, sig=signal.SIGKILL) -> str:
    """Start training, send `sig` `delay` seconds after it logs `step N/`: lands in the step, the save or the log."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(cfg)], cwd=cfg.parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith(f"step {after_step}/"):
            time.sleep(delay)
            proc.send_signal(sig)
            break
    log = "".join(log) + proc.stdout.read()
    rc = proc.wait(timeout=60)
    if sig == signal.SIGINT and rc != 0:  # Ctrl-C (unless the run had finished): a message, no traceback
        assert rc == 1 and "error: interrupted" in log and "Traceback" not in log, log
    return log


def test_killed_runs_resume_from_the_last_complete_checkpoint(tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    common = dict(max_train_steps=6, checkpoints_total_limit=2)
    straight = make_run(tmp_path / "straight", **common)
    cfg = make_run(tmp_path / "killed", **common)
    out = tmp_path / "killed" / "out"

    def restart_resumes(log: str, step: int):
        assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in log, f"seed {seed}:\n{log}"

    # 1: killed inside the save of checkpoint-2: its temporary folder is left, checkpoint-1 is the last whole one
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(out.glob(".checkpoint-2.*.tmp")) and complete_checkpoints(out) == [1]
    # 2, 3: killed (kill -9, then Ctrl-C) at random moments after a step (in the save, the pruning, the metrics line
    # or the next step); a torn last metrics line (a kill mid-write) must not stop the resume
    for after_step, sig in ((3, signal.SIGKILL), (5, signal.SIGINT)):
        expected = complete_checkpoints(out)[-1]
        log = run_and_kill(cfg, after_step, rng.uniform(0, 0.05), sig)
        restart_resumes(log, expected)
        with (out / "metrics.jsonl").open("a") as f:
            f.write('{"step": 7, "loss": 1.2')
    expected = complete_checkpoints(out)[-1]
    proc = script("train.py", [str(cfg)], cfg.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    restart_resumes(proc.stdout, expected)
    assert not [p.name for p in out.rglob(".*")], f"seed {seed}: temporary files survived"
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    import train
    assert train.main([str(straight)]) == 0  # the uninterrupted run
    want = load_file(str(tmp_path / "straight" / "out" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), f"seed {seed}"
