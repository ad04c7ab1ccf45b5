"""kernels/custom_op.py: the kernels' entry points call their plain implementation outside torch.compile (so a
process that never compiles never imports torch._dynamo, ~1.5 s) and the registered custom op inside it (one
opaque call for the tracer). The import checks run in fresh subprocesses: pytest's own process may have imported
torch._dynamo already."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernels.custom_op import custom_op

REPO = Path(__file__).resolve().parents[1]
calls = []


@custom_op("hmtiny_test::counted", mutates_args=())
def counted(x: torch.Tensor) -> torch.Tensor:
    calls.append(1)  # a Python side effect: traced into, it would run at compile time only
    return x * 2


@counted.op.register_fake
def _(x):
    return torch.empty_like(x)


def run(code: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_eager_call_is_the_plain_function_and_compiled_call_the_op():
    calls.clear()
    x = torch.arange(4.0)
    assert torch.equal(counted(x), x * 2) and len(calls) == 1
    compiled = torch.compile(lambda t: counted(t) + 1, backend="eager", fullgraph=True)
    for _ in range(3):
        assert torch.equal(compiled(x), x * 2 + 1)
    assert len(calls) == 4  # the op ran at every compiled call: the tracer did not look inside
    assert counted.__name__ == "counted" and counted.op.__class__.__name__ == "CustomOpDef"


def test_no_dynamo_import_without_compile():
    """A custom op's eager call imports torch._dynamo; ours, called through kernels.custom_op, does not."""
    out = run("""
        import sys, torch
        from kernels.custom_op import custom_op

        @custom_op("hmtiny_test::plain", mutates_args=())
        def plain(x: torch.Tensor) -> torch.Tensor:
            return x + 1

        plain(torch.ones(2))
        print("ours", "torch._dynamo" in sys.modules)
        plain.op(torch.ones(2))
        print("op", "torch._dynamo" in sys.modules)
    """)
    assert out.split() == ["ours", "False", "op", "True"], out


@pytest.mark.skipif(__import__("kernels.rmsnorm").rmsnorm.triton is None, reason="needs triton")
def test_training_rmsnorm_kernel_without_dynamo_under_the_interpreter():
    """The training RMSNorm's kernels (forward and backward, through autograd) under Triton's interpreter on the
    CPU: the kernel path runs and torch._dynamo stays unimported."""
    out = run("""
        import sys, torch
        from kernels import rmsnorm
        x = torch.randn(5, 40, requires_grad=True)
        w = torch.randn(40, requires_grad=True)
        assert rmsnorm.usable(x, w)
        y = rmsnorm.rms_norm(x, w, 1e-5)
        y.sum().backward()
        torch.testing.assert_close(y, rmsnorm.rmsnorm_ref(x, w, 1e-5))
        print("dynamo", "torch._dynamo" in sys.modules, x.grad is not None)
    """, env={"TRITON_INTERPRET": "1"})
    assert out.split() == ["dynamo", "False", "True"], out


def wide_model(folder: Path):
    """A random bf16 model with widths the GEMV tiles divide, saved as a checkpoint folder: the subprocess loads it
    as sample.py does (build_random's random init would import torch._dynamo itself)."""
    import dataclasses
    from hmtiny.checkpoint import save_heartmula
    from hmtiny.model import build_random
    from hmtiny.tiny import tiny_model_config
    tiny = tiny_model_config(384)
    wide = lambda st, n: dataclasses.replace(st, num_layers=n, embed_dim=256, intermediate_dim=512, num_heads=4,
                                             num_kv_heads=2)
    cfg = dataclasses.replace(tiny, backbone=wide(tiny.backbone, 2), decoder=wide(tiny.decoder, 2))
    save_heartmula(build_random(cfg, device="cpu", dtype=torch.bfloat16, seed=1), folder)
    return folder


GENERATE = """
import sys, torch
from hmtiny.checkpoint import load_heartmula
from hmtiny.engine import Engine
from hmtiny.text import prompt_rows
from kernels import add_rmsnorm, decode_attention, gemv, topk_sample
used = set()
for mod, name in ((gemv, "tiled_op"), (gemv, "partials_op"), (add_rmsnorm, "add_rmsnorm_op"),
                  (add_rmsnorm, "rmsnorm_op"), (decode_attention, "decode_attention_op"),
                  (topk_sample, "topk_sample_op")):
    def spy(*a, _fn=getattr(mod, name), _name=name, **k):
        used.add(_name)
        return _fn(*a, **k)
    setattr(mod, name, spy)
gemv._candidates = lambda K, partial: [(32, 128, 1, 4), (32, 128, 2, 4)]  # instead of timing every tile
device, mode = sys.argv[1], sys.argv[2]
model = load_heartmula(sys.argv[3], dtype=torch.bfloat16, device=device)
prompt = prompt_rows([1, 5, 7, 2], [1, 9, 11, 2])
frames = Engine(model, mode).generate([prompt], 6, generator=torch.Generator(device).manual_seed(0))
assert frames[0].shape[-1] == 8, frames
print(" ".join(sorted(used)) or "-")
print("dynamo", "torch._dynamo" in sys.modules)
"""


def generate_in_a_process(device: str, mode: str, folder: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", GENERATE, device, mode, str(folder)], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_loading_and_generating_import_no_dynamo(tmp_path):
    """sample.py's path on the CPU (checkpoint load, the engine's eager mode; no kernel applies there): nothing in
    it imports torch._dynamo either."""
    lines = generate_in_a_process("cpu", "eager", wide_model(tmp_path / "model"))
    assert lines[-1] == "dynamo False", lines


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_graph_mode_generation_without_dynamo_on_cuda(tmp_path):
    """The engine's graph mode on CUDA as sample.py runs it (GEMV tiles, add_rmsnorm, decode attention, top-k
    sampling, captured in CUDA graphs) in a fresh process: the kernel entry points ran, torch._dynamo was never
    imported."""
    lines = generate_in_a_process("cuda", "graph", wide_model(tmp_path / "model"))
    assert lines[-1] == "dynamo False", lines
    for name in ("tiled_op", "add_rmsnorm_op", "decode_attention_op", "topk_sample_op"):
        assert name in lines[-2].split(), lines
