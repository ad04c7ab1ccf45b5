"""Loading for sample.py's latency: the loader gives bit-identical weights and buffers to a plain safetensors read
into a normally built model, sample.py's tokens equal those of that plain path, the codec loaded in the background
decodes the same audio and its failures surface as clear errors."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sample  # noqa: E402
from hmtiny import runtime  # noqa: E402
from hmtiny.checkpoint import load_heartmula, weight_files  # noqa: E402
from hmtiny.codec import HeartCodec, HeartCodecConfig  # noqa: E402
from hmtiny.codec.weights import loader_hooks  # noqa: E402
from hmtiny.config import ModelConfig  # noqa: E402
from hmtiny.model import HeartMuLa  # noqa: E402
from hmtiny.text import PromptTokenizer, find_text_assets  # noqa: E402

TINY = sample.TINY


def plain_heartmula(dtype=torch.float32) -> HeartMuLa:
    """The model as a plain script loads it: built normally (random init), then load_state_dict of load_file's
    tensors cast to `dtype` (assign: the weights take that dtype, computed buffers keep theirs)."""
    folder = TINY / "model"
    model = HeartMuLa(ModelConfig.from_file(folder / "config.json"))
    state = {}
    for f in weight_files(folder):
        state.update({k: v.to(dtype) for k, v in load_file(str(f)).items()})
    model.load_state_dict(state, assign=True)
    return model.eval()


def same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].device == b[k].device, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heartmula_weights_and_buffers_equal_a_plain_load(dtype):
    mine, plain = load_heartmula(TINY / "model", dtype=dtype), plain_heartmula(dtype)
    same_tensors(mine.state_dict(), plain.state_dict())
    same_tensors(dict(mine.named_buffers()), dict(plain.named_buffers()))  # rope tables, offsets (not in the file)
    assert not any(t.is_meta for t in [*mine.parameters(), *mine.buffers()])


def test_codec_weights_equal_a_plain_load():
    folder = TINY / "codec"
    rename, transform, ignore = loader_hooks(folder)
    state = {}
    for key, t in load_file(str(weight_files(folder)[0])).items():
        name = None if ignore(key) else rename(key)
        if name is not None:
            state[name] = transform(name, t).float()
    plain = HeartCodec(HeartCodecConfig.from_file(folder / "config.json"))
    plain.load_state_dict(state)
    same_tensors(HeartCodec.load(folder).state_dict(), plain.state_dict())


def test_build_empty_placeholders_have_the_dtype_and_shape_of_the_real_results():
    """Arithmetic on meta inside build_empty returns placeholders: each must have the shape and dtype the real op
    gives (int / int is a float; a 0-d tensor does not promote a dimensioned one), as a plain meta build has."""
    import torch.nn as nn

    from hmtiny.checkpoint import build_empty

    class Buffers(nn.Module):
        def __init__(self):
            super().__init__()
            ints = torch.arange(4)
            for name, value in {"true_div": ints / 4, "div_tensors": ints / torch.arange(1, 5),
                                "times_float": ints * 0.5, "times_int": ints * 3, "plus_0d": ints + torch.tensor(1.5),
                                "bf16_times_0d": torch.ones(2, 3, dtype=torch.bfloat16) * torch.tensor(2.0),
                                "broadcast": torch.ones(3, 1) - torch.ones(4), "rdiv": 1.0 / (ints + 1),
                                "float_range": torch.arange(0, 2, 0.5), "int_range": torch.arange(1, 9, 3),
                                "range_dtype": torch.arange(5, dtype=torch.float16),
                                "linspace": torch.linspace(0, 1, 7, dtype=torch.float64)}.items():
                self.register_buffer(name, value, persistent=False)

    with torch.device("meta"):
        plain = dict(Buffers().named_buffers())
    empty = dict(build_empty(Buffers).named_buffers())
    assert plain.keys() == empty.keys()
    for k in plain:
        assert (empty[k].dtype, empty[k].shape, empty[k].is_meta) == (plain[k].dtype, plain[k].shape, True), k


def test_loading_does_not_import_dynamo_or_sympy():
    """Building on meta without random init keeps torch._dynamo (a second of imports) and sympy (~0.4 s: torch's
    meta ranges and broadcast_shapes import it) out of sample.py's start-up."""
    code = ("import sys, torch, sample\n"
            "heavy = [m for m in ('torch._dynamo', 'sympy') if m not in sys.modules]\n"
            "from hmtiny.checkpoint import load_heartmula\n"
            "from hmtiny.codec import HeartCodec\n"
            f"load_heartmula({str(TINY / 'model')!r}); HeartCodec.load({str(TINY / 'codec')!r})\n"
            "print(len(heavy), [m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("0 "):
        pytest.skip("this torch imports torch._dynamo and sympy by itself")
    assert out.stdout.split(" ", 1)[1].strip() == "[]", out.stdout


def test_sample_tokens_equal_the_plain_loading_path(tmp_path, capsys):
    path = tmp_path / "t.npy"
    assert sample.main(["--demo", "--duration", "1.2", "--seed", "5", "--tokens-only", "--device", "cpu",
                        "--save-tokens", str(path)]) == 0
    capsys.readouterr()
    tok = PromptTokenizer.load(*find_text_assets(TINY / "tokenizer.json"))
    prompt = tok.prompt("pop, happy, piano, synth", "[verse]\nthe sun is bright\nwe sing again")
    frames = runtime.generate(plain_heartmula(), [prompt], 15, 1.5, 50, 1.0, torch.Generator().manual_seed(5),
                              mode="plain", stop_on_eos=False)[0]
    assert np.array_equal(np.load(path), frames.numpy().astype(np.int16))


def test_int8_sample_tokens_equal_quantising_a_plain_load(tmp_path, capsys):
    from hmtiny.quant import quantize_model
    path = tmp_path / "t.npy"
    assert sample.main(["--demo", "--duration", "0.8", "--seed", "2", "--tokens-only", "--int8", "--device", "cpu",
                        "--save-tokens", str(path)]) == 0
    capsys.readouterr()
    tok = PromptTokenizer.load(*find_text_assets(TINY / "tokenizer.json"))
    prompt = tok.prompt("pop, happy, piano, synth", "[verse]\nthe sun is bright\nwe sing again")
    # quantised from the stored bf16 weights (as loading does), then the model in fp32
    model = quantize_model(plain_heartmula(torch.bfloat16)).float()
    frames = runtime.generate(model, [prompt], 10, 1.5, 50, 1.0, torch.Generator().manual_seed(2),
                              mode="plain", stop_on_eos=False)[0]
    assert np.array_equal(np.load(path), frames.numpy().astype(np.int16))


def test_background_returns_the_value_or_raises_the_error_here():
    job = runtime.Background(lambda x: x + 1, 41)
    assert job.result() == 42 and job.seconds is not None

    def fail():
        time.sleep(0.05)
        raise ValueError("bad codec file")
    job = runtime.Background(fail)
    with pytest.raises(ValueError, match="bad codec file"):
        job.result()
    assert job.thread.daemon  # never holds the process up at exit


def test_codec_in_background_decodes_the_same_audio(tmp_path, capsys, monkeypatch):
    """The same run with the codec loaded inline (a) and in the background thread (b), on the default device (on a
    GPU machine: the side stream of load_codec_beside_model). Tokens and audio are compared apart, so a failure
    says whether generation or decoding differs."""
    sf = pytest.importorskip("soundfile")
    args = ["--demo", "--duration", "0.8", "--seed", "4", "--codec-steps", "2"]
    outputs, threads = {}, []
    real = runtime.load_codec_beside_model
    monkeypatch.setattr(runtime, "load_codec_beside_model",
                        lambda *a: threads.append(threading.current_thread()) or real(*a))
    for run, background in (("a", False), ("b", True)):  # (on CUDA the background is the default: forced off in a)
        monkeypatch.setattr(runtime, "codec_in_background", lambda device, on=background: on)
        assert sample.main(args + ["--out", str(tmp_path / f"{run}.wav"),
                                   "--save-tokens", str(tmp_path / f"{run}.npy")]) == 0
        outputs[run] = capsys.readouterr().out
        assert ("in the background during generation" in outputs[run]) == background, outputs[run]
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    tokens = [np.load(tmp_path / f"{run}.npy") for run in "ab"]
    differ = np.argwhere(tokens[0] != tokens[1]) if tokens[0].shape == tokens[1].shape else None
    assert differ is not None and differ.size == 0, (
        f"the generated tokens differ between the runs (generation, not the codec): shapes {tokens[0].shape} / "
        f"{tokens[1].shape}, first differing [frame, codebook]: {None if differ is None else differ[:5].tolist()}")
    wav = [sf.read(str(tmp_path / f"{run}.wav"))[0] for run in "ab"]
    assert wav[0].shape == wav[1].shape, f"same tokens, audio of {wav[0].shape} vs {wav[1].shape} samples"
    diff = np.abs(wav[0] - wav[1])
    assert diff.max() == 0, (f"same tokens, different audio: max abs diff {diff.max():.3g} over "
                             f"{np.count_nonzero(diff)} of {diff.size} samples (decoding with the codec loaded in the "
                             f"background differs)")


@pytest.mark.parametrize("error, message", [(ValueError("shape mismatch in flow_matching"), "error: --codec"),
                                            (FileNotFoundError("gone"), "error: no HeartCodec at")])
def test_codec_thread_error_is_a_clear_error(tmp_path, capsys, monkeypatch, error, message):
    monkeypatch.setattr(runtime, "codec_in_background", lambda device: True)

    def broken(*a):
        raise error
    monkeypatch.setattr(runtime, "load_codec_beside_model", broken)
    t = time.time()
    rc = sample.main(["--demo", "--duration", "0.8", "--seed", "4", "--out", str(tmp_path / "c.wav")])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and str(error) in err, err
    assert "Traceback" not in err and not (tmp_path / "c.wav").exists()
    assert time.time() - t < 120
