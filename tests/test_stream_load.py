"""hmtiny.stream_load: the chunk plan covers every byte once, the threaded chunked read gives tensors bit-identical
to safetensors' own load (tiny model, codec, and a file of awkward sizes and dtypes), damaged files fail naming the
file, and load_heartmula through it equals the host read (CPU here; on CUDA with pinned buffers and a side stream)."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from hmtiny import stream_load  # noqa: E402
from hmtiny.checkpoint import load_heartmula  # noqa: E402
from hmtiny.stream_load import plan_chunks, read_chunk, read_header, split_range, stream_tensors  # noqa: E402
from hmtiny.tiny import ASSETS as TINY  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def awkward_tensors() -> dict[str, torch.Tensor]:
    """Odd byte counts, every common dtype, empty and 0-d tensors, NaN and inf, one tensor over many chunks."""
    g = torch.Generator().manual_seed(3)
    floats = torch.randn(1001, generator=g)
    floats[[0, 500, 1000]] = torch.tensor([float("nan"), float("inf"), -0.0])
    t = {"f64": torch.randn(3, generator=g, dtype=torch.float64), "f32": torch.randn(7, 5, generator=g),
         "f16": torch.randn(13, generator=g).half(), "bf16_big": floats.bfloat16(), "f32_special": floats,
         "i64_scalar": torch.tensor(-5, dtype=torch.int64), "i32_empty": torch.zeros(0, 4, dtype=torch.int32),
         "i16": torch.randint(-999, 999, (3, 3, 3), generator=g, dtype=torch.int16),
         "i8": torch.randint(-128, 127, (17,), generator=g, dtype=torch.int8),
         "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8), "bool": torch.rand(9, generator=g) > 0.5,
         "one_byte": torch.tensor([7], dtype=torch.uint8)}
    if hasattr(torch, "float8_e4m3fn"):
        t["f8"] = torch.randn(11, generator=g).to(torch.float8_e4m3fn)
    return t


@pytest.fixture
def awkward_file(tmp_path) -> Path:
    path = tmp_path / "awkward.safetensors"
    save_file(awkward_tensors(), str(path), metadata={"format": "pt"})
    return path


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN equals NaN, -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8))


def check_same_as_safetensors(path: Path, device="cpu", **options):
    want = load_file(str(path))
    got = dict(stream_tensors([path], device, **options))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].device.type == torch.device(device).type, k
        assert bit_equal(got[k], want[k]), k


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1000, 4096, 1 << 20])
def test_plan_covers_every_byte_once(awkward_file, chunk_bytes):
    entries = read_header(awkward_file)
    chunks = plan_chunks(entries, chunk_bytes)
    filled = {i: [] for i, e in enumerate(entries) if e.end > e.begin}
    done = []
    for prev, c in zip([None] + chunks, chunks):
        assert 0 < c.end - c.begin <= chunk_bytes and (prev is None or prev.end == c.begin)
        for i, at, to, length in c.pieces:
            assert length > 0 and at + length <= c.end - c.begin
            assert c.begin + at == entries[i].begin + to  # the same file byte
            filled[i].append((to, to + length))
        done += c.done
    for i, ranges in filled.items():  # each tensor's pieces tile it in order
        assert ranges[0][0] == 0 and ranges[-1][1] == entries[i].end - entries[i].begin
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert done == sorted(filled)  # each tensor completed once, in file order


def test_split_range():
    assert split_range(10, 3, 1) == [(0, 3), (3, 6), (6, 10)]
    assert split_range(10, 4, 4) == [(0, 5), (5, 10)]  # parts of at least 4 bytes
    assert split_range(3, 4, 4) == [(0, 3)]
    assert split_range(0, 4, 1) == []


@pytest.mark.parametrize("chunk_bytes, buffers, threads", [(1 << 20, 3, 4), (1000, 2, 3), (7, 1, 1), (333, 4, 2)])
def test_awkward_file_bit_identical_to_safetensors(awkward_file, monkeypatch, chunk_bytes, buffers, threads):
    monkeypatch.setattr(stream_load, "MIN_READ_BYTES", 5)  # chunks split among the threads even when small
    check_same_as_safetensors(awkward_file, chunk_bytes=chunk_bytes, buffers=buffers, threads=threads)


@pytest.mark.parametrize("what", ["model", "codec"])
@pytest.mark.parametrize("chunk_bytes", [stream_load.CHUNK_BYTES, 65537])
def test_tiny_checkpoints_bit_identical_to_safetensors(monkeypatch, what, chunk_bytes):
    monkeypatch.setattr(stream_load, "MIN_READ_BYTES", 4096)
    check_same_as_safetensors(TINY / what / "model.safetensors", chunk_bytes=chunk_bytes, buffers=2, threads=3)


def test_several_files_share_the_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_load, "MIN_READ_BYTES", 16)
    files, want = [], {}
    for n, tensors in enumerate([awkward_tensors(), {"x": torch.arange(300.0)}, {"y": torch.ones(2, 2)}]):
        tensors = {f"{n}.{k}": v for k, v in tensors.items()}
        files.append(tmp_path / f"part{n}.safetensors")
        save_file(tensors, str(files[-1]))
        want.update(tensors)
    got = list(stream_tensors(files, "cpu", chunk_bytes=500, buffers=2, threads=2))
    assert [k for k, _ in got if k.startswith("1.") or k.startswith("2.")] == ["1.x", "2.y"]  # file by file
    assert {k for k, _ in got} == set(want)
    assert all(bit_equal(v, want[k]) for k, v in got)


def test_staged_heartmula_equals_the_host_read():
    for dtype in (torch.float32, torch.bfloat16):
        plain = load_heartmula(TINY / "model", dtype=dtype, staged=False).state_dict()
        staged = load_heartmula(TINY / "model", dtype=dtype, staged=True).state_dict()
        assert plain.keys() == staged.keys()
        assert all(bit_equal(staged[k], plain[k]) for k in plain)


def damaged_copies(src: Path, folder: Path) -> dict[str, Path]:
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    variants = {"truncated data": data[:-100], "truncated header": data[: 8 + n // 2], "too short": data[:5],
                "huge header length": (2**40).to_bytes(8, "little") + data[8:],
                "not JSON": data[:8] + b"\xff" * n + data[8 + n:],
                "bad dtype": data.replace(b'"BF16"', b'"XX16"', 1)}
    paths = {}
    for name, content in variants.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.safetensors"
        paths[name].write_bytes(content)
    return paths


def test_damaged_files_fail_naming_the_file(tmp_path):
    for name, path in damaged_copies(TINY / "model" / "model.safetensors", tmp_path).items():
        with pytest.raises(ValueError, match="not a readable safetensors file") as e:
            list(stream_tensors([path], "cpu"))
        assert str(path) in str(e.value), name


def test_truncated_model_folder_fails_before_loading(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TINY / "model", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated") as e:
        load_heartmula(folder, staged=True)
    assert str(weights) in str(e.value)


def test_file_shrinking_after_its_header_was_read_fails_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_load, "MIN_READ_BYTES", 64)
    path = tmp_path / "w.safetensors"
    shutil.copy(TINY / "model" / "model.safetensors", path)
    chunks = plan_chunks(read_header(path), 1 << 20)
    path.write_bytes(path.read_bytes()[: chunks[-1].end - 10])
    buf = memoryview(bytearray(chunks[-1].end - chunks[-1].begin))
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool, pytest.raises(ValueError, match=f"{path}.*it ends at byte"):
        read_chunk(path, chunks[-1], buf, pool, 3)



def reader_threads() -> list[str]:
    import threading
    return [t.name for t in threading.enumerate() if t.name.startswith("hmtiny-read")]


def test_no_reader_thread_outlives_an_early_stop_or_a_failure(tmp_path, monkeypatch):
    """A caller that stops early, and a read that fails mid-load, leave no reader thread behind (on CUDA the same
    `finally` also waits for the side stream's copies before the pinned buffers are freed)."""
    monkeypatch.setattr(stream_load, "MIN_READ_BYTES", 64)
    path = tmp_path / "w.safetensors"
    shutil.copy(TINY / "model" / "model.safetensors", path)
    loads = stream_tensors([path], "cpu", chunk_bytes=65536, buffers=2, threads=3)
    next(loads)
    assert reader_threads()
    loads.close()
    assert not reader_threads()
    loads = stream_tensors([path], "cpu", chunk_bytes=65536, buffers=2, threads=3)
    next(loads)  # the header was checked: now the file shrinks under the read
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="it ends at byte"):
        for _ in loads:
            pass
    assert not reader_threads()

@CUDA
@pytest.mark.parametrize("chunk_bytes, buffers", [(stream_load.CHUNK_BYTES, 3), (1000, 2), (333, 1)])
def test_cuda_awkward_file_bit_identical_to_safetensors(awkward_file, monkeypatch, chunk_bytes, buffers):
    monkeypatch.setattr(stream_load, "MIN_READ_BYTES", 64)
    check_same_as_safetensors(awkward_file, "cuda", chunk_bytes=chunk_bytes, buffers=buffers, threads=4)


@CUDA
@pytest.mark.parametrize("quantize", [False, True])
def test_cuda_staged_heartmula_equals_the_host_read(monkeypatch, quantize):
    """Many small chunks through 2 buffers: a buffer reused before its copies finished, or a cast reading a tensor
    before its copy landed, shows up as a difference."""
    monkeypatch.setattr(stream_load, "CHUNK_BYTES", 4099)
    monkeypatch.setattr(stream_load, "BUFFERS", 2)
    monkeypatch.setattr(stream_load, "MIN_READ_BYTES", 512)
    for dtype in (torch.float32, torch.bfloat16):
        plain = load_heartmula(TINY / "model", dtype=dtype, device="cuda", quantize=quantize, staged=False)
        staged = load_heartmula(TINY / "model", dtype=dtype, device="cuda", quantize=quantize)
        a, b = plain.state_dict(), staged.state_dict()
        assert a.keys() == b.keys()
        assert all(b[k].is_cuda and bit_equal(b[k], a[k]) for k in a)


def test_bench_load_tiny_smoke():
    import subprocess
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_load.py"), "--tiny", "--repeats", "1", "--check"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])["runs"]
    assert [r["path"] for r in runs] == ["host", "staged", "check"] and runs[-1]["equal"] is True
