"""Generation interleaved with training on CUDA (the graph engine): what a run with validation does.

A captured graph keeps reading the memory it was captured on. These tests train between generations, free the
allocator's cache (as the codec's own graph capture does) and check that a reused engine still gives what a freshly
built one gives, and that train.py runs several validations in one process.
"""
import json
import subprocess
import sys

import pytest
import torch

from hmtiny.checkpoint import load_heartmula
from hmtiny.engine import Engine
from hmtiny.lora import inject_lora, lora_parameters, mark_only_lora_trainable
from hmtiny.text import prompt_rows

from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")]


def lora_model(fixtures, dtype):
    model = load_heartmula(fixtures / "heartmula", dtype=dtype, device="cuda")
    inject_lora(model, rank=4, alpha=8, dropout=0.1)
    mark_only_lora_trainable(model)
    return model


def train_steps(model, opt, n, gen):
    """n LoRA steps on random clips (prompt rows then audio frames), bf16 autocast as train.py runs them."""
    cfg = model.cfg
    for _ in range(n):
        B, P, F = 2, 6, 12
        tokens = torch.zeros(B, P + F, cfg.audio_num_codebooks + 1, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, :P, -1] = torch.randint(0, 400, (B, P), generator=gen, device="cuda")
        mask[:, :P, -1] = True
        tokens[:, P:, :-1] = torch.randint(0, cfg.codebook_size, (B, F, cfg.audio_num_codebooks), generator=gen,
                                           device="cuda")
        mask[:, P:, :-1] = True
        frame_mask = torch.zeros(B, P + F, dtype=torch.bool, device="cuda")
        frame_mask[:, P:] = True
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.loss(tokens, mask, frame_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def sample(model, engine, prompts):
    """As validation runs it: eval mode (no dropout), under the training's autocast."""
    model.eval()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return engine.generate(prompts, 16, cfg_scale=1.5, topk=20,
                                   generator=torch.Generator("cuda").manual_seed(3))
    finally:
        model.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reused_engine_after_optimizer_steps_equals_a_fresh_one(fixtures, dtype):
    model = lora_model(fixtures, dtype)
    opt = torch.optim.AdamW(lora_parameters(model), lr=5e-2, fused=True)
    gen = torch.Generator("cuda").manual_seed(0)
    prompts = [prompt_rows([500, 272, 410, 62, 501], [500, 137, 278, 184, 501]),
               prompt_rows([500, 17, 501], [500, 501])]
    engine = Engine(model, "graph")
    train_steps(model, opt, 2, gen)
    first = sample(model, engine, prompts)
    graph = engine._graph
    for _ in range(2):  # train, free everything the allocator caches, generate again with the same graphs
        train_steps(model, opt, 3, gen)
        model.drop_caches()
        torch.cuda.empty_cache()
        again = sample(model, engine, prompts)
        torch.cuda.synchronize()
        fresh = sample(model, Engine(model, "graph"), prompts)
        assert engine._graph is graph  # replayed, not captured again
        assert all(torch.equal(a, b) for a, b in zip(again, fresh))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, again)), "LoRA had no effect"


def test_train_py_validates_several_times_on_cuda(tmp_path):
    """The tiny default on CUDA with bf16 autocast: a validation every 2 steps (codec decoding on the GPU from the
    host copy), checkpoints, the final validation after the LoRA is saved; then a resume that validates again."""
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "train.py"), f"--output_dir={out}", "--mixed_precision=bf16",
            "--max_train_steps=6", "--validation_step_interval=2", "--checkpointing_steps=2", "--lora_dropout=0.1"]
    for steps in (6, 8):
        proc = subprocess.run(args + [f"--max_train_steps={steps}"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr
    clips = sorted(p.name for p in (out / "validation").iterdir())
    assert clips == [f"step-{s}-0.wav" for s in (2, 4, 6, 8)], clips
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(l == l for l in losses)


def test_codec_kept_on_the_host_decodes_as_on_the_gpu():
    """Validation's codec stays in pinned host memory and copies each stage's weights to the GPU for the stage: the
    audio equals a codec that lives on the GPU, every time, and the host copy is left as it was."""
    from hmtiny.codec import HeartCodec
    from hmtiny.tiny import ASSETS, CODEBOOK_SIZE
    on_gpu = HeartCodec.load(ASSETS / "codec", device="cuda", dtype=torch.bfloat16)
    host = HeartCodec.load(ASSETS / "codec", device="cpu", dtype=torch.bfloat16).pin_memory_()
    codes = torch.randint(0, CODEBOOK_SIZE, (8, 100), generator=torch.Generator().manual_seed(0))
    want = on_gpu.decode(codes, steps=3, seed=0)
    for _ in range(2):  # the second decode captures a new estimator graph on new copies
        assert torch.equal(host.decode(codes, steps=3, seed=0, device="cuda"), want)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in host.parameters())


def test_reference_embedding_through_the_graph_engine(fixtures):
    """A prompt's reference (MuQ) embedding reaches the captured prefill: graph == eager, and it changes the song."""
    model = load_heartmula(fixtures / "heartmula", dtype=torch.float32, device="cuda")
    prompt = prompt_rows([500, 272, 410, 62, 501], [500, 137, 278, 184, 501])
    emb = torch.randn(model.cfg.muq_dim, generator=torch.Generator().manual_seed(0)) * 4
    kw = dict(max_frames=12, cfg_scale=1.5, topk=1)
    graph = Engine(model, "graph")
    with_ref = graph.generate([prompt + (emb,)], **kw)
    assert torch.equal(with_ref[0], Engine(model, "eager").generate([prompt + (emb,)], **kw)[0])
    assert not torch.equal(with_ref[0], graph.generate([prompt], **kw)[0])
