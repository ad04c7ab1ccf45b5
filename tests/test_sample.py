"""sample.py end to end on the built-in tiny model and codec (CPU)."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sample  # noqa: E402

TINY_CODEBOOK = 64


def run(args, capsys):
    rc = sample.main(args)
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_demo_writes_48k_stereo_of_the_requested_duration(tmp_path, capsys):
    sf = pytest.importorskip("soundfile")
    out = tmp_path / "demo.wav"
    rc, log = run(["--demo", "--duration", "2", "--seed", "3", "--out", str(out)], capsys)
    assert rc == 0, log
    data, sr = sf.read(str(out))
    assert sr == 48000 and data.ndim == 2 and data.shape[1] == 2
    assert data.shape[0] == int(25 / 12.5 * 48000)  # 25 frames = 2 s
    assert np.isfinite(data).all() and np.abs(data).max() > 0
    assert "frames/s" in log and "real time" in log and str(out) in log
    # where the time went, one line at the end: every phase named, and a total
    times = next(line for line in log.splitlines() if line.startswith("time: "))
    for phase in ("start-up", "loading the model", "generation", "decoding and writing audio", "total"):
        assert phase in times, times


def test_several_songs_are_numbered_and_nothing_is_overwritten(tmp_path, capsys):
    sf = pytest.importorskip("soundfile")
    mine = tmp_path / "song-1.flac"
    mine.write_bytes(b"my own file")
    rc, log = run(["--demo", "--duration", "0.8", "--num", "2", "--seed", "1", "--out", str(tmp_path / "song.flac"),
                   "--save-tokens"], capsys)
    assert rc == 0, log
    assert mine.read_bytes() == b"my own file"
    written = sorted(p.name for p in tmp_path.glob("*.flac"))
    assert written == ["song-1-2.flac", "song-1.flac", "song-2.flac"]
    for name in ("song-1-2.flac", "song-2.flac"):
        data, sr = sf.read(str(tmp_path / name))
        assert sr == 48000 and data.shape == (int(10 / 12.5 * 48000), 2)
    tokens = np.load(tmp_path / "song-2.npy")
    assert tokens.shape == (10, 8) and tokens.max() < TINY_CODEBOOK and tokens.min() >= 0


def tokens_of(tmp_path, capsys, name, extra=()):
    path = tmp_path / f"{name}.npy"
    rc, log = run(["--demo", "--duration", "1.2", "--seed", "5", "--tokens-only", "--save-tokens", str(path),
                   *extra], capsys)
    assert rc == 0, log
    return np.load(path)


def test_seed_reproducible_and_lora_changes_tokens(tmp_path, capsys):
    from hmtiny.checkpoint import load_heartmula
    from hmtiny.lora import inject_lora, lora_layers, save_lora
    a = tokens_of(tmp_path, capsys, "a")
    b = tokens_of(tmp_path, capsys, "b")
    assert np.array_equal(a, b)
    model = load_heartmula(sample.TINY / "model")
    inject_lora(model, rank=2)
    zero = save_lora(model, tmp_path / "zero.safetensors")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_(0, 0.3, generator=gen)
    strong = save_lora(model, tmp_path / "strong" / "pytorch_lora_weights.safetensors")
    assert np.array_equal(a, tokens_of(tmp_path, capsys, "zero", ["--lora", str(zero)]))
    changed = tokens_of(tmp_path, capsys, "strong", ["--lora", f"{strong.parent}:1.0"])  # a folder, with a scale
    assert not np.array_equal(a, changed)
    off = tokens_of(tmp_path, capsys, "off", ["--lora", f"{strong}:0"])  # scale 0 = no change
    assert np.array_equal(a, off)


def test_int8_base_with_an_unmerged_lora(tmp_path, capsys):
    """--int8 quantises the stacks (torch path on CPU) and applies LoRAs unmerged: valid tokens; a zero LoRA
    changes nothing on the int8 base, a strong one changes the tokens."""
    from hmtiny.checkpoint import load_heartmula
    from hmtiny.lora import inject_lora, lora_layers, save_lora
    base = tokens_of(tmp_path, capsys, "int8", ["--int8"])
    assert base.shape[1] == 8 and base.max() < TINY_CODEBOOK and base.min() >= 0
    model = load_heartmula(sample.TINY / "model")
    inject_lora(model, rank=2)
    zero = save_lora(model, tmp_path / "zero.safetensors")
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    strong = save_lora(model, tmp_path / "strong.safetensors")
    assert np.array_equal(base, tokens_of(tmp_path, capsys, "int8-zero", ["--int8", "--lora", str(zero)]))
    assert not np.array_equal(base, tokens_of(tmp_path, capsys, "int8-strong", ["--int8", "--lora", str(strong)]))
    _, log = run(["--demo", "--duration", "0.4", "--int8", "--tokens-only", "--lora", str(strong),
                  "--save-tokens", str(tmp_path / "x.npy")], capsys)
    assert "int8 stacks" in log and "unmerged" in log, log


@pytest.mark.parametrize("args, message", [
    (["--demo", "--duration", "-1"], "--duration must be > 0"),
    (["--demo", "--cfg", "0.5"], "--cfg must be >= 1"),
    (["--demo", "--temperature", "0"], "--temperature must be > 0"),
    (["--demo", "--topk", "-1"], "--topk must be an integer >= 0 (0 = no top-k"),
    (["--demo", "--cfg", "nan"], "--cfg must be a finite number"),
    (["--demo", "--device", "gpu0"], "--device gpu0: 'gpu0' is not a device"),
    (["--demo", "--num", "0"], "--num must be >= 1"),
    (["--demo", "--out", "song.m4a"], "unsupported audio extension '.m4a'"),
    (["--demo", "--lora", "missing/lora.safetensors"], "does not exist"),
    (["--demo", "--duration", "60"], "context"),
    (["--model", "/nonexistent/ckpt", "--tags", "pop"], "hf download HeartMuLa/HeartMuLa-oss-3B "
                                                         "--local-dir ckpt/HeartMuLa-oss-3B"),
    (["--model", "/nonexistent/ckpt"], "give --tags"),
    (["--demo", "--model", "x"], "--demo uses the built-in tiny model"),
    (["--demo", "--device", "cpu", "--mode", "graph"], "--mode graph needs a CUDA device"),
])
def test_bad_arguments_fail_clearly(tmp_path, capsys, args, message):
    rc, log = run(args + (["--out", str(tmp_path / "x.wav")] if "--out" not in args else []), capsys)
    assert rc == 1
    assert message in log
    assert not list(tmp_path.iterdir())


def test_missing_model_folder_says_what_to_download(tmp_path, capsys):
    """A ckpt/ folder with the text files but no model: the download help names every piece."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("tokenizer.json", "gen_config.json"):
        (ckpt / name).write_bytes((sample.TINY / name).read_bytes())
    (ckpt / "HeartCodec-oss").mkdir()
    (ckpt / "HeartCodec-oss" / "config.json").write_text("{}")
    rc, log = run(["--model", str(ckpt), "--tags", "pop", "--out", str(tmp_path / "x.wav")], capsys)
    assert rc == 1
    assert "no HeartMuLa model" in log
    for repo in ("HeartMuLa/HeartMuLa-oss-3B", "HeartMuLa/HeartCodec-oss", "HeartMuLa/HeartMuLaGen"):
        assert f"hf download {repo}" in log


def test_tiny_config_makes_the_asked_duration(tmp_path, capsys, monkeypatch):
    """`--config` of the built-in tiny default: its random model's EOS means nothing and is ignored, so the clip
    has the asked length (with EOS honoured this seed stops after 10 frames)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.npy"
    rc, log = run(["--config", str(sample.TINY / "config.json"), "--duration", "1.2", "--seed", "0", "--tokens-only",
                   "--save-tokens", str(path)], capsys)
    assert rc == 0, log
    assert np.load(path).shape == (15, 8) and "random weights" in log


# imported by none of sample.py's start-up and model loading (no LoRA, no int8, a local model): triton (~0.2 s; on
# CUDA runtime.warm_triton imports it in a thread meanwhile, elsewhere only the engine needs it), sympy (~0.4 s: torch
# imports it for meta ops' checks, which build_empty's _NoInit answers itself), torch._dynamo (~1 s; the first
# custom-op call imports it, on CUDA warm_triton's thread during the load), huggingface_hub (downloads only)
NOT_AT_START_UP = ("triton", "sympy", "torch._dynamo", "huggingface_hub")


def test_start_up_and_loading_import_nothing_heavy():
    """sample.py's own steps up to a loaded model (settings, tokenizer, file checks, load_heartmula) import none of
    NOT_AT_START_UP; a module this torch imports by itself is not counted."""
    import subprocess
    code = ("import sys, torch\n"
            f"heavy = [m for m in {NOT_AT_START_UP!r} if m not in sys.modules]\n"
            "import sample\n"
            "a = sample.parse_args(['--model', str(sample.TINY / 'model'), '--tags', 'pop', '--device', 'cpu'])\n"
            "sample.load_everything(sample.settings(a), a, torch.device('cpu'), torch.float32)\n"
            "print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "[]", (out.stdout[-500:], out.stderr[-2000:])


def test_generation_line_splits_warm_up_and_loop(tmp_path, capsys):
    path = tmp_path / "t.npy"
    assert sample.main(["--demo", "--duration", "0.8", "--seed", "5", "--tokens-only", "--mode", "eager",
                        "--save-tokens", str(path)]) == 0
    out = capsys.readouterr().out
    assert "split: warm-up " in out and "loop " in out
    assert "generation (warm-up " in out.split("time: ")[-1]


def test_batch_prints_its_frames_per_second_beside_the_per_song_rate(tmp_path, capsys):
    """--num N: the loop's rate per song (frame steps / s) and for the batch (all songs' frames / loop seconds)."""
    path = tmp_path / "t.npy"
    assert sample.main(["--demo", "--duration", "0.8", "--seed", "5", "--tokens-only", "--mode", "eager", "--num", "3",
                        "--save-tokens", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "split: warm-up" in x)
    m = re.search(r"loop ([\d.]+) s \((\d+) frames, ([\d.]+) frames/s per song; (\d+) frames of 3 songs, "
                  r"([\d.]+) frames/s together", line)
    assert m, line
    steps, per_song, made, together = int(m[2]), float(m[3]), int(m[4]), float(m[5])
    assert (steps, made) == (10, 30)  # --demo never stops early: 10 frames each
    assert together == pytest.approx(per_song * 3, rel=0.02, abs=0.2)


def test_generation_split_rates():
    t = {"loop_s": 2.0, "build_s": 0.1, "plan_s": 0.2, "capture_s": 0.3, "frames": 375}
    one = sample.generation_split(t, 3.0, [375])["long"]
    assert "(375 frames, 187.5 frames/s)" in one and "together" not in one
    batch = sample.generation_split(t, 3.0, [375, 375, 100])["long"]
    assert "(375 frames, 187.5 frames/s per song; 850 frames of 3 songs, 425.0 frames/s together)" in batch


def test_script_exits_with_its_code_and_complete_outputs(tmp_path):
    """Run as a script, sample.py leaves through os._exit once its files are written: the exit code is main's, the
    closing lines reach a pipe, the song file is complete; a usage error still exits 1 with its message."""
    import subprocess
    out = tmp_path / "song.npy"
    done = subprocess.run([sys.executable, "sample.py", "--demo", "--duration", "0.8", "--seed", "1", "--tokens-only",
                           "--mode", "eager", "--save-tokens", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(line.startswith("time: ") for line in done.stdout.splitlines()), done.stdout[-2000:]  # flushed
    assert np.load(out).shape[1] == 8
    bad = subprocess.run([sys.executable, "sample.py", "--demo", "--duration", "-1"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "error:" in bad.stderr
