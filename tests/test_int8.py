"""int8 weight-only base model: kernels vs torch references, Int8Linear, a quantised tiny HeartMuLa.

The Triton kernels run on CPU through Triton's interpreter in a subprocess (TRITON_INTERPRET=1 must be set before
triton is imported, and another test may already have imported it here); on CUDA they also run for real.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmtiny.quant import DEFAULT_TARGETS, Int8Linear, quantize_model, quantize_weight  # noqa: E402
from kernels import int8_matmul as K  # noqa: E402

FIXTURES = Path(os.environ.get("HMTINY_FIXTURES", ROOT.parent / "shared" / "fixtures")) / "heartmula"
needs_fixture = pytest.mark.skipif(not (FIXTURES / "model.safetensors").exists(), reason="no HeartMuLa fixture")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (M, N, K): none a multiple of the tiles; M = 1 / 3 (decode), 17 (just past decode), 300 (several row tiles)
SMALL_SHAPES = [(1, 40, 70), (3, 33, 48), (17, 20, 35), (300, 24, 40)]
# tiles for the interpreter: plain, weight-as-LHS, split along the reduction (fp32 atomics)
SMALL_CONFIGS = [dict(BLOCK_M=16, BLOCK_P=16, BLOCK_R=16), dict(BLOCK_M=32, BLOCK_P=16, BLOCK_R=32, B_AS_LHS=True),
                 dict(BLOCK_M=16, BLOCK_P=32, BLOCK_R=16, SPLIT_R=2)]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative Frobenius error of one rounding to the output dtype


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_int8_weight(n: int, k: int, device="cpu", gen=None):
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).to(device)
    scale = (torch.rand(n, generator=gen) * 0.02 + 1e-3).to(device)
    return wq, scale


def kernel_errors(device: str, shapes, configs, dtypes=(torch.bfloat16, torch.float16), seed=0) -> list[dict]:
    """Run forward and dx kernels on fresh random inputs (non-contiguous rows, NaN-poisoned outputs) and return
    their relative errors against float64 references of the same rounded inputs."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for m, n, k in shapes:
        for cfg in configs:
            for dt in dtypes:
                wq, s = random_int8_weight(n, k, device, gen)
                x = torch.randn(m, k + 5, generator=gen).to(device, dt)[:, :k]  # row stride != K
                dy = torch.randn(m, n + 3, generator=gen).to(device, dt)[:, :n]
                y = torch.full((m, n), float("nan"), device=device, dtype=dt)
                dx = torch.full((m, k), float("nan"), device=device, dtype=dt)
                K.int8_matmul(x, wq, s, config=cfg, out=y)
                K.int8_matmul_dx(dy, wq, s, config=cfg, out=dx)
                rows.append(dict(shape=[m, n, k], config=str(cfg), dtype=str(dt).split(".")[-1],
                                 fwd=rel_err(y, K.int8_matmul_ref(x.double(), wq, s.double())),
                                 dx=rel_err(dx, K.int8_matmul_dx_ref(dy.double(), wq, s.double())),
                                 tol=TOL[dt], y_dtype=str(y.dtype),
                                 finite=bool(y.isfinite().all() and dx.isfinite().all())))
    return rows


def int8_linear_triton_vs_torch(device: str) -> list[float]:
    """Int8Linear forward + backward through the Triton path vs the torch path (bf16), as relative errors."""
    torch.manual_seed(1)
    lin = Int8Linear.from_linear(nn.Linear(45, 37).to(device))
    x = torch.randn(2, 9, 45, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 9, 37, device=device, dtype=torch.bfloat16)
    y = lin(x)
    y.backward(g)
    w = lin.dequantize(torch.float64)
    y_ref = x.detach().double() @ w.T + lin.bias.double()
    dx_ref = g.double() @ w
    return [rel_err(y, y_ref), rel_err(x.grad, dx_ref)]


def check_kernel_rows(rows):
    assert rows
    for r in rows:
        assert r["finite"], r
        assert r["y_dtype"].endswith(r["dtype"]), r
        assert r["fwd"] < r["tol"] and r["dx"] < r["tol"], r


# ----------------------------------------------------------------------------- kernels
def test_kernels_under_triton_interpreter(run_interpreted):
    result = run_interpreted(__file__, HMTINY_INT8_TRITON="1")
    assert result["interpret"] is True
    check_kernel_rows(result["kernels"])
    assert len(result["kernels"]) == len(SMALL_SHAPES) * len(SMALL_CONFIGS) * 2
    assert result["int8_linear_used_triton"] and max(result["int8_linear"]) < 1e-2, result
    assert result["dequantize_equal"] and result["dequantize_bf16"] < 1e-2
    assert max(result["regimes"]) < 1e-2, result["regimes"]
    assert len(result["gemv"]) == 8 and max(result["gemv"]) < 1e-2, result["gemv"]


def regime_errors(device: str, shape, regimes, calls=2, seed=0) -> list[float]:
    """Each regime's forward and dx error on fresh inputs, `calls` times per regime (the second call goes
    through the launch cache on CUDA)."""
    gen = torch.Generator().manual_seed(seed)
    m, n, k = shape
    errs = []
    for regime in regimes:
        for _ in range(calls):
            wq, s = random_int8_weight(n, k, device, gen)
            x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
            dy = torch.randn(m, n, generator=gen).to(device, torch.bfloat16)
            errs.append(rel_err(K.int8_matmul(x, wq, s, regime=regime), K.int8_matmul_ref(x.double(), wq, s.double())))
            errs.append(rel_err(K.int8_matmul_dx(dy, wq, s, regime=regime),
                                K.int8_matmul_dx_ref(dy.double(), wq, s.double())))
    return errs


def gemv_errors(device: str, shapes=((1, 40, 70), (2, 33, 64), (2, 20, 35), (1, 7, 300)), config=None, seed=0):
    """The M <= 2 kernel (forward only) on fresh inputs with NaN-poisoned outputs."""
    gen = torch.Generator().manual_seed(seed)
    errs = []
    for m, n, k in shapes:
        wq, s = random_int8_weight(n, k, device, gen)
        x = torch.randn(m, k + 3, generator=gen).to(device, torch.bfloat16)[:, :k]
        y = torch.full((m, n), float("nan"), device=device, dtype=torch.bfloat16)
        K.int8_matmul(x, wq, s, regime="gemv", config=config, out=y)
        errs.append(rel_err(y, K.int8_matmul_ref(x.double(), wq, s.double())))
    return errs


@pytest.fixture
def one_config_per_regime():
    """Awkward shapes each need their own tuning: test them with each regime's first config, then restore."""
    K.set_autotune(False)
    yield
    K.set_autotune(None)  # as HMTINY_INT8_AUTOTUNE says (default: autotune)


@cuda
def test_kernels_cuda(one_config_per_regime):
    shapes = SMALL_SHAPES + [(1, 1000, 3000), (16, 3072, 1000), (300, 1500, 3072), (2100, 1030, 770)]
    check_kernel_rows(kernel_errors("cuda", shapes, [None]))
    check_kernel_rows(kernel_errors("cuda", shapes, [None], (torch.bfloat16,), seed=1))  # again: cached launches
    for shape in [(3, 1030, 3000), (17, 520, 1030), (1100, 1030, 770)]:
        errs = regime_errors("cuda", shape, ["decode", "decode_split", "train", "dequant"])
        assert max(errs) < 1e-2, (shape, errs)
    assert max(gemv_errors("cuda") + gemv_errors("cuda", [(2, 1000, 3000)])) < 1e-2


@cuda
def test_kernels_cuda_autotuned_and_decode_choice():
    for m in (1, 2, 16):  # the default dispatch times the decode kernels once per shape, then remembers
        errs = [e for seed in (0, 1) for e in regime_errors("cuda", (m, 3072, 1024), [None], calls=1, seed=seed)]
        assert max(errs) < 1e-2, (m, errs)
    assert {key[2] for key in K.CACHE.decode_choice} >= {1, 2, 16}


# ----------------------------------------------------------------------------- "tiles": kernels/gemv.py's GEMV
needs_triton = pytest.mark.skipif(K.triton is None, reason="triton not installed")
# M masked inside gemv's 16-row tile; N, K divided by its tiles (bn 32, bk 128) but not powers of two
TILES_SHAPES = [(1, 96, 384), (2, 96, 384), (3, 96, 384), (16, 96, 384), (2, 1024, 3072)]


@needs_triton
def test_tiles_regime_rejects_what_gemv_does_not_take():
    wq, s = random_int8_weight(96, 384)
    x = torch.randn(2, 384, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="tiles"):  # CPU tensors: kernels.gemv runs on CUDA only
        K.int8_matmul(x, wq, s, regime="tiles")
    with pytest.raises(ValueError, match="config"):
        K.int8_matmul(x, wq, s, regime="tiles", config=dict(BLOCK_N=32))
    with pytest.raises(ValueError, match="forward only"):
        K.int8_matmul_dx(torch.randn(2, 96, dtype=torch.bfloat16), wq, s, regime="tiles")


@needs_triton
def test_tiles_regime_plumbing_and_out(monkeypatch):
    """With gemv stubbed by the reference (CPU): the call reaches gemv.plan/linear_tiled and honours out=."""
    calls = []
    monkeypatch.setattr(K.gemv, "plan", lambda x, w, split=True, scale=None: calls.append(split) or (32, 128, 1, 4))
    monkeypatch.setattr(K.gemv, "linear_tiled", lambda x, w, cfg, scale: K.int8_matmul_ref(x, w, scale))
    wq, s = random_int8_weight(96, 384)
    x = torch.randn(2, 3, 384, dtype=torch.bfloat16)
    out = torch.full((2, 3, 96), float("nan"), dtype=torch.bfloat16)
    y = K.int8_matmul(x, wq, s, regime="tiles", out=out)
    assert calls == [False]  # K kept whole
    assert y.shape == (2, 3, 96) and y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, K.int8_matmul_ref(x, wq, s))


@needs_triton
def test_decode_choice_is_the_fastest_candidate_that_runs(monkeypatch):
    """The selection logic (CPU, timing stubbed): candidates by M and gemv.usable, fastest wins, a candidate that
    fails is skipped, the choice is remembered per shape."""
    monkeypatch.setattr(K.CACHE, "decode_choice", {})
    monkeypatch.setattr(K.gemv, "usable", lambda x, w, scale=None: True)
    fake = {"decode": 3.0, "decode_split": 2.0, "gemv": 1.5, "tiles": 1.0}
    timed = []

    def time_regime(x2, wq, scale, regime):
        timed.append(regime)
        if fake[regime] is None:
            raise RuntimeError("out of shared memory")
        return fake[regime]

    monkeypatch.setattr(K, "_time_regime", time_regime)
    wq, s = random_int8_weight(96, 384)
    x1, x3 = torch.randn(1, 384, dtype=torch.bfloat16), torch.randn(3, 384, dtype=torch.bfloat16)
    assert K._decode_candidates(x1, wq, s) == ["decode", "decode_split", "gemv", "tiles"]
    assert K._decode_candidates(x3, wq, s) == ["decode", "decode_split", "tiles"]  # the CUDA-core gemv: M <= 2
    assert K._decode_regime(x1, wq, s) == "tiles" and timed == ["decode", "decode_split", "gemv", "tiles"]
    assert K._decode_regime(x1, wq, s) == "tiles" and len(timed) == 4  # remembered
    fake["tiles"] = None  # e.g. a tile this card cannot run
    assert K._decode_regime(x3, wq, s) == "decode_split"
    monkeypatch.setattr(K.gemv, "usable", lambda x, w, scale=None: False)
    assert "tiles" not in K._decode_candidates(x3, wq, s)


class FakeTuner:
    """Stands in for a regime's triton.autotune on CPU: counts its tunings, picks configs[1]."""

    def __init__(self, configs):
        self.configs, self.tunings = configs, 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.tunings += 1
            self.best_config = self.configs[1] if len(self.configs) > 1 else self.configs[0]
            return "tuned launch"
        return run


def new_process(monkeypatch, regimes=("train",), single=False):
    """A fresh LaunchCache (what a new process starts with) whose tuners are FakeTuners; direct launches of a kept
    config are recorded in the returned list."""
    monkeypatch.setattr(K, "CACHE", K.LaunchCache())
    K.CACHE._tuned = {r: FakeTuner(K._CONFIGS[r][:1] if single else K._CONFIGS[r]) for r in regimes}
    direct = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: direct.append(kwargs) or "direct launch"

    monkeypatch.setattr(K, "_kernel", Kernel())
    return K.CACHE._tuned, direct


@needs_triton
def test_tuned_config_is_kept_on_disk_and_used_without_tuning(monkeypatch, tmp_path):
    """The autotuner's pick is written to the cache file; a new process launches that config directly (no tuner
    call); forward and dx are kept apart; another card or Triton version tunes again; a single config is not kept."""
    path = tmp_path / "tiles.json"
    monkeypatch.setenv("HMTINY_TILE_CACHE", str(path))
    monkeypatch.setattr(K.gemv, "card_name", lambda device: "card A")
    wq, s = random_int8_weight(48, 64)
    x, dy = torch.randn(40, 64, dtype=torch.bfloat16), torch.randn(40, 48, dtype=torch.bfloat16)

    tuners, direct = new_process(monkeypatch)
    K.int8_matmul(x, wq, s, regime="train")
    K.int8_matmul(x, wq, s, regime="train")  # this process: the stored pick, in memory
    K.int8_matmul_dx(dy, wq, s, regime="train")
    assert tuners["train"].tunings == 2 and len(direct) == 1
    table = json.loads(path.read_text())
    assert len(table) == 2 and all(name.startswith(f"card A|triton {K.triton.__version__}|int8|train|")
                                   for name in table)
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.json"]  # written atomically: no temporary file left

    tuners, direct = new_process(monkeypatch)
    K.int8_matmul(x, wq, s, regime="train")
    K.int8_matmul_dx(dy, wq, s, regime="train")
    K.int8_matmul(x[:33], wq, s, regime="train")  # another M of the same power-of-two bucket: the same pick
    assert tuners["train"].tunings == 0 and len(direct) == 3
    want = K._config_dict(K.TRAIN_CONFIGS[1])
    assert all({k: d[k] for k in want} == want for d in direct)

    monkeypatch.setattr(K.gemv, "card_name", lambda device: "card B")
    tuners, direct = new_process(monkeypatch)
    K.int8_matmul(x, wq, s, regime="train")
    assert tuners["train"].tunings == 1 and not direct and len(json.loads(path.read_text())) == 3

    monkeypatch.setattr(K.triton, "__version__", "0.0-other")
    tuners, direct = new_process(monkeypatch)
    K.int8_matmul(x, wq, s, regime="train")
    assert tuners["train"].tunings == 1 and not direct and len(json.loads(path.read_text())) == 4

    tuners, direct = new_process(monkeypatch, single=True)  # HMTINY_INT8_AUTOTUNE=0: nothing to keep
    K.int8_matmul(x[:5], wq, s, regime="train")
    assert tuners["train"].tunings == 1 and len(json.loads(path.read_text())) == 4

    monkeypatch.setenv("HMTINY_TILE_CACHE", "0")  # no file: tuned in every process
    for _ in range(2):
        tuners, direct = new_process(monkeypatch)
        K.int8_matmul(x, wq, s, regime="train")
        assert tuners["train"].tunings == 1 and not direct


def test_shipped_picks_spare_a_known_card_the_tuning(monkeypatch, tmp_path):
    """A pick in the repository's table (gemv.SHIPPED) is used when this machine's cache file has none, also with
    the cache file turned off; the machine's own file wins over it."""
    monkeypatch.setattr(K.gemv, "card_name", lambda device: "card S")
    wq, s = random_int8_weight(48, 64)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    monkeypatch.setenv("HMTINY_TILE_CACHE", str(tmp_path / "mine.json"))
    tuners, direct = new_process(monkeypatch)
    K.int8_matmul(x, wq, s, regime="train")  # tuned here: its name and pick, kept in mine.json
    (name, pick), = json.loads((tmp_path / "mine.json").read_text()).items()
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({name: pick}))
    monkeypatch.setattr(K.gemv, "SHIPPED", shipped)
    for cache in (str(tmp_path / "empty.json"), "0"):
        monkeypatch.setenv("HMTINY_TILE_CACHE", cache)
        tuners, direct = new_process(monkeypatch)
        K.int8_matmul(x, wq, s, regime="train")
        assert tuners["train"].tunings == 0 and len(direct) == 1
    shipped.write_text(json.dumps({name: "not a pick"}))  # this machine's own file is read first
    monkeypatch.setattr(K.gemv, "_warned", set())
    monkeypatch.setenv("HMTINY_TILE_CACHE", str(tmp_path / "mine.json"))
    tuners, direct = new_process(monkeypatch)
    K.int8_matmul(x, wq, s, regime="train")
    assert tuners["train"].tunings == 0 and len(direct) == 1


@needs_triton
def test_decode_choice_is_kept_on_disk(monkeypatch, tmp_path):
    """A new process takes the decode kernel chosen by an earlier one without timing; a damaged file is said once,
    ignored (timed again) and rewritten; an entry that is no candidate here is ignored."""
    path = tmp_path / "tiles.json"
    monkeypatch.setenv("HMTINY_TILE_CACHE", str(path))
    timed = []
    monkeypatch.setattr(K, "_time_regime", lambda x2, w, sc, regime: timed.append(regime) or
                        {"decode": 2.0, "decode_split": 1.0}.get(regime, 3.0))
    wq, s = random_int8_weight(96, 384)
    x = torch.randn(3, 384, dtype=torch.bfloat16)

    monkeypatch.setattr(K, "CACHE", K.LaunchCache())
    assert K._decode_regime(x, wq, s) == "decode_split" and timed
    n = len(timed)
    monkeypatch.setattr(K, "CACHE", K.LaunchCache())
    assert K._decode_regime(x, wq, s) == "decode_split" and len(timed) == n
    assert list(json.loads(path.read_text()).values()) == ["decode_split"]

    path.write_text("{not json")
    monkeypatch.setattr(K.gemv, "_warned", set())
    monkeypatch.setattr(K, "CACHE", K.LaunchCache())
    with pytest.warns(UserWarning, match="damaged") as caught:
        assert K._decode_regime(x, wq, s) == "decode_split" and len(timed) == 2 * n
        assert K._decode_regime(x[:1], wq, s) == "decode_split" and len(timed) > 2 * n  # another shape: no warning
    assert len(caught) == 1
    assert len(json.loads(path.read_text())) == 2  # rewritten whole

    path.write_text(json.dumps({name: "no such kernel" for name in json.loads(path.read_text())}))
    monkeypatch.setattr(K, "CACHE", K.LaunchCache())
    before = len(timed)
    assert K._decode_regime(x, wq, s) == "decode_split" and len(timed) == before + n


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiles_regime_cuda_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    for m, n, k in TILES_SHAPES:
        wq, s = random_int8_weight(n, k, "cuda", gen)
        x = torch.randn(m, k + 5, generator=gen).to("cuda", dtype)[:, :k]  # row stride != K
        ref = K.int8_matmul_ref(x.double(), wq, s.double())
        assert rel_err(K.int8_matmul(x, wq, s, regime="tiles"), ref) < TOL[dtype], (m, n, k)
        y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        assert K.int8_matmul(x, wq, s, regime="tiles", out=y).data_ptr() == y.data_ptr()
        assert rel_err(y, ref) < TOL[dtype], (m, n, k)
    wq, s = random_int8_weight(40, 70, "cuda", gen)  # tiles do not divide 40 x 70
    with pytest.raises(ValueError, match="tiles"):
        K.int8_matmul(torch.randn(2, 70, device="cuda", dtype=dtype), wq, s, regime="tiles")
    wq, s = random_int8_weight(96, 384, "cuda", gen)
    with pytest.raises(ValueError, match="tiles"):  # more rows than gemv.MAX_ROWS
        K.int8_matmul(torch.randn(17, 384, device="cuda", dtype=dtype), wq, s, regime="tiles")


@cuda
def test_default_decode_dispatch_cuda_correct_whichever_regime(monkeypatch):
    """The default dispatch for M <= 16, timed for real, then forced to pick each candidate in turn."""
    gen = torch.Generator().manual_seed(0)
    for m, n, k in TILES_SHAPES:
        wq, s = random_int8_weight(n, k, "cuda", gen)
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        ref = K.int8_matmul_ref(x.double(), wq, s.double())
        assert "tiles" in K._decode_candidates(x, wq, s)
        assert rel_err(K.int8_matmul(x, wq, s), ref) < 1e-2, (m, n, k)  # timed choice
        for want in K._decode_candidates(x, wq, s):
            with monkeypatch.context() as mp:
                mp.setenv("HMTINY_TILE_CACHE", "0")  # else the choice timed above comes back from the disk
                mp.setattr(K.CACHE, "decode_choice", {})
                mp.setattr(K, "_time_regime", lambda x2, w, sc, regime: 0.0 if regime == want else 1.0)
                y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                K.int8_matmul(x, wq, s, out=y)
                assert list(K.CACHE.decode_choice.values()) == [want]
                assert rel_err(y, ref) < 1e-2, (m, n, k, want)


def test_dequantize_kernel_matches_reference_in_interpreter_or_cuda():
    if not torch.cuda.is_available():
        pytest.skip("covered by test_kernels_under_triton_interpreter")
    wq, s = random_int8_weight(1030, 770, "cuda")
    assert torch.equal(K.dequantize(wq, s, torch.bfloat16), K.dequantize_ref(wq, s, torch.bfloat16))


@cuda
def test_int8_linear_cuda_matches_dequantised_reference():
    assert max(int8_linear_triton_vs_torch("cuda")) < 1e-2


def test_references_agree_with_dense_math():
    wq, s = random_int8_weight(7, 12)
    x, dy = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    w = wq.double() * s.double()[:, None]
    torch.testing.assert_close(K.int8_matmul_ref(x, wq, s.double()), x @ w.T)
    torch.testing.assert_close(K.int8_matmul_dx_ref(dy, wq, s.double()), dy @ w)


# ----------------------------------------------------------------------------- quantisation and Int8Linear
@pytest.mark.parametrize("group_size", [None, 8])
def test_quantize_weight_rounds_to_nearest_level(group_size):
    w = torch.randn(6, 32)
    w[2] = 0.0  # an all-zero channel must not divide by zero
    q, s = quantize_weight(w, group_size)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert s.shape == ((6,) if group_size is None else (6, 32 // group_size))
    deq = K.dequantize_ref(q, s)
    step = s.reshape(6, -1).repeat_interleave(32 // s.reshape(6, -1).shape[1], dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-7).all()
    assert (deq[2] == 0).all()
    # the largest magnitude of each channel/group is represented exactly by +-127
    assert (q.view(6, -1, group_size or 32).abs().amax(-1)[[0, 1, 3, 4, 5]] == 127).all()


def test_int8_linear_forward_backward_match_dequantised_linear():
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    q = Int8Linear.from_linear(lin)
    assert (q.in_features, q.out_features) == (24, 10) and list(q.parameters()) == []
    assert q.weight.dtype == torch.int8 and q.scale.dtype == torch.float32
    w = q.dequantize()
    assert rel_err(w, lin.weight.detach()) < 1e-2  # int8 is close to the original weight...
    x = torch.randn(3, 4, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 4, 10)
    y = q(x)
    y.backward(g)
    y_ref = F.linear(x_ref, w, lin.bias.detach())
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref)  # ...and the layer computes exactly with the dequantised weight
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_int8_linear_group_size_and_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    nn.init.normal_(lin.weight, std=0.05)  # gaussian: a group's max is smaller than its channel's
    per_channel, grouped = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, group_size=32)
    w = lin.weight.detach()
    assert rel_err(grouped.dequantize(), w) < 0.9 * rel_err(per_channel.dequantize(), w)  # finer scales help
    x = torch.randn(5, 256)
    torch.testing.assert_close(grouped(x), F.linear(x, grouped.dequantize()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = per_channel(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, per_channel(x)) < 1e-2


# ----------------------------------------------------------------------------- a quantised tiny HeartMuLa
def _fixture_batch():
    from safetensors.torch import load_file
    c = load_file(str(FIXTURES / "cases.safetensors"))
    return c["forward.tokens"], c["forward.tokens_mask"], c["forward.audio_frame_mask"], c["forward.muq_idx"]


@needs_fixture
def test_quantized_tiny_model_logits_close():
    from hmtiny.checkpoint import load_heartmula
    tokens, mask, _, muq_idx = _fixture_batch()
    dense = load_heartmula(FIXTURES)
    quant = quantize_model(load_heartmula(FIXTURES))
    n_int8 = sum(isinstance(m, Int8Linear) for m in quant.modules())
    assert n_int8 == 7 * (dense.cfg.backbone.num_layers + dense.cfg.decoder.num_layers)
    for keep in ("projection", "codebook0_head", "muq_linear"):
        assert type(quant.get_submodule(keep)) is nn.Linear
    with torch.no_grad():
        ref, out = dense(tokens, mask, muq_idx), quant(tokens, mask, muq_idx)
    errs = [rel_err(o, r) for o, r in zip(out, ref)]  # hidden, codebook-0 logits, decoder logits
    # measured: 1.1%, 1.1%, 2.0% (tiny random model, per-channel int8)
    assert all(1e-4 < e < 0.04 for e in errs), errs


@needs_fixture
def test_load_heartmula_quantize_matches_quantize_model():
    from hmtiny.checkpoint import load_heartmula
    tokens, mask, _, muq_idx = _fixture_batch()
    loaded = load_heartmula(FIXTURES, quantize=True)
    after = quantize_model(load_heartmula(FIXTURES))
    sd_a, sd_b = loaded.state_dict(), after.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert sd_a[key].dtype == sd_b[key].dtype and torch.equal(sd_a[key], sd_b[key]), key
    assert sd_a["backbone.layers.0.mlp.w1.weight"].dtype == torch.int8
    assert "backbone.layers.0.mlp.w1.scale" in sd_a
    with torch.no_grad():
        assert torch.equal(loaded(tokens, mask, muq_idx)[1], after(tokens, mask, muq_idx)[1])


def test_quantize_model_rejects_unknown_targets():
    from hmtiny.config import ModelConfig
    if not (FIXTURES / "config.json").exists():
        pytest.skip("no fixture config")
    from hmtiny.model import HeartMuLa
    model = HeartMuLa(ModelConfig.from_file(FIXTURES / "config.json"))
    with pytest.raises(ValueError, match="match no linear"):
        quantize_model(model, targets=("backbone.layers.*.attn.qkv_proj",))
    quantize_model(model, targets=DEFAULT_TARGETS + ("projection",))
    assert isinstance(model.projection, Int8Linear)


def _train_adapters(model, steps=20, seed=0):
    from hmtiny.lora import inject_lora
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, rank=2, alpha=4, targets=["q_proj", "v_proj", "w2"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    tokens, mask, frames, muq_idx = _fixture_batch()
    model.train()
    losses = []
    for _ in range(steps):
        loss, _ = model.loss(tokens, mask, frames, muq_idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@needs_fixture
def test_lora_like_training_on_int8_base_tracks_dense_base():
    from hmtiny.checkpoint import load_heartmula
    dense = _train_adapters(load_heartmula(FIXTURES))
    quant = _train_adapters(quantize_model(load_heartmula(FIXTURES)))
    assert quant[-1] < 0.9 * quant[0], quant  # it learns (measured: 19.57 -> 13.86 in 20 steps)...
    # (measured: the two curves differ by at most 0.018)
    assert abs(quant[0] - dense[0]) < 0.01 * dense[0]  # ...from the same start...
    assert max(abs(q - d) for q, d in zip(quant, dense)) < 0.005 * dense[0], (dense, quant)  # ...along the same curve


if __name__ == "__main__":  # the interpreter half of test_kernels_under_triton_interpreter
    rows = kernel_errors("cpu", SMALL_SHAPES, SMALL_CONFIGS)
    from hmtiny.quant import use_triton
    wq, s = random_int8_weight(37, 70)
    print(json.dumps(dict(interpret=K.switches.interpreting(), kernels=rows,
                          int8_linear=int8_linear_triton_vs_torch("cpu"),
                          int8_linear_used_triton=use_triton(torch.zeros(1, dtype=torch.bfloat16), None),
                          # fp32 exactly; (the interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest)
                          dequantize_equal=torch.equal(K.dequantize(wq, s, torch.float32), K.dequantize_ref(wq, s)),
                          dequantize_bf16=rel_err(K.dequantize(wq, s), K.dequantize_ref(wq, s)),
                          regimes=regime_errors("cpu", (20, 37, 70), ["train", "dequant"], calls=1),
                          gemv=gemv_errors("cpu") + gemv_errors("cpu", config=dict(BLOCK_N=8, BLOCK_K=16)))))
