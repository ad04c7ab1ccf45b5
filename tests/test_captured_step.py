"""The captured training step (hmtiny/captured_step.py) against the plain reference, model.loss: same loss and
same gradients on padded batches of several lengths, with decoder_fraction, caption dropout, scheduled-sampling
inputs, reference embeddings and LoRA dropout. On CPU the step runs uncaptured (the same code); the CUDA test
replays real graphs."""
import pytest
import torch

from hmtiny.captured_step import CapturedStep, pad_frozen_heads, plan_rows
from hmtiny.checkpoint import load_heartmula
from hmtiny.data import load_dataset
from hmtiny.fused import use_fused_kernels
from hmtiny.lora import FactorCopies, inject_lora, lora_layers, mark_only_lora_trainable, set_dropout_seed
from hmtiny.text import PromptTokenizer, find_text_assets
from hmtiny.train_config import BUILTIN_CONFIG

TINY = BUILTIN_CONFIG.parent


def tiny_lora(dropout=0.0, device="cpu", checkpointing=False, rank=4, alpha=8):
    torch.manual_seed(0)
    model = load_heartmula(TINY / "model", dtype=torch.float32).to(device)
    inject_lora(model, rank=rank, alpha=alpha, dropout=dropout)
    params = mark_only_lora_trainable(model)
    with torch.no_grad():
        for p in params:  # a trained-looking adapter, so its gradients are not trivially zero
            p.normal_(0, 0.05)
    model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = checkpointing
    return model.train(), params


@pytest.fixture(scope="module")
def data():
    tok = PromptTokenizer.load(*find_text_assets(TINY))
    model = load_heartmula(TINY / "model", dtype=torch.float32)
    return load_dataset(TINY / "multidatabackend.json", tok, model.cfg, seed=0, log=lambda m: None)


def reference(model, params, batch, scale=1.0, **kw):
    for p in params:
        p.grad = None
    loss, info = model.loss(batch["tokens"], batch["tokens_mask"], batch["audio_frame_mask"], batch["muq_idx"],
                            muq_embed=batch.get("muq_embed"), **kw)
    (loss * scale).backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return torch.stack([loss.detach(), info["loss_c0"], info["loss_rest"]]), grads


def test_plan_rows_pads_with_weight_zero():
    frames = torch.zeros(2, 10, dtype=torch.bool)
    frames[0, 3:8] = True
    frames[1, 2:10] = True
    rows = plan_rows(frames, 1.0, bucket=8, row_stride=16)
    # row t is a target when row t + 1 is a frame: rows 2..6 of sample 0, 1..8 of sample 1 (flat: 16 + t)
    assert rows.frames == 5 + 8 and rows.c0_at.numel() == 16 and rows.c0_w.sum() == 13
    assert rows.c0_at[:13].tolist() == [2, 3, 4, 5, 6] + [16 + t for t in range(1, 9)]
    assert rows.c0_w[13:].sum() == 0 and torch.equal(rows.dec_at, rows.c0_at)
    with pytest.raises(ValueError, match="no audio frame"):
        plan_rows(torch.zeros(1, 5, dtype=torch.bool), 1.0, 8, 5)


@pytest.mark.parametrize("indices,decoder_fraction", [([0], 1.0), ([0, 3, 5], 1.0), ([1, 2], 0.5)])
def test_step_equals_model_loss(data, indices, decoder_fraction):
    model, params = tiny_lora()
    batch = data.batch(indices)
    torch.manual_seed(7)
    want, want_grads = reference(model, params, batch, scale=0.5, decoder_fraction=decoder_fraction)
    step = CapturedStep(model, params, None, decoder_fraction=decoder_fraction, bucket=16)
    torch.manual_seed(7)  # decoder_fraction draws its subset from the global CPU generator, as model.loss
    got = step(batch, scale=0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip([p.grad for p in params], want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert S_padded(step) % 16 == 0


def S_padded(step):
    return next(iter(step.shapes.values())).tokens.shape[1]


def test_step_accumulates_and_reuses_shapes(data):
    model, params = tiny_lora()
    step = CapturedStep(model, params, None, bucket=64)
    a, b = data.batch([0]), data.batch([1])
    step(a, scale=0.25)
    step(b, scale=0.75)
    got = [p.grad.clone() for p in params]
    _, ga = reference(model, params, a, 0.25)
    _, gb = reference(model, params, b, 0.75)
    for g, x, y in zip(got, ga, gb):
        torch.testing.assert_close(g, x + y, rtol=1e-4, atol=1e-7)
    assert len(step.shapes) <= 2


def test_one_shape_per_padded_length_with_room_for_the_most_loss_rows(data):
    """Clips 4, 0 and 9 pad to 96 rows but have 26, 47 and 45 audio frames: one shape, rebuilt once with room for
    clip 0's rows, then reused (padded further with weight 0) by the others; every step still equals model.loss."""
    model, params = tiny_lora()
    step = CapturedStep(model, params, None, bucket=32)
    built = []
    for i in [4, 0, 4, 9]:
        batch = data.batch([i])
        want, want_grads = reference(model, params, batch)
        for p in params:
            p.grad = torch.zeros_like(p)
        got = step(batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip([p.grad for p in params], want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
        (s,) = step.shapes.values()
        built.append((id(s), s.tokens.shape[1], s.n_c0, s.n_dec))
    assert [b[1:] for b in built] == [(96, 32, 32), (96, 64, 64), (96, 64, 64), (96, 64, 64)]
    assert built[1][0] == built[2][0] == built[3][0] != built[0][0]


def test_frozen_heads_get_padded_storage_with_the_same_values():
    model, _ = tiny_lora()
    c0, audio = model.codebook0_head.weight.detach().clone(), model.audio_head.detach().clone()
    V = audio.shape[-1]
    c0_pad, audio_pad = pad_frozen_heads(model, multiple=64)
    assert c0_pad.shape == (128, c0.shape[1]) and audio_pad.shape == (*audio.shape[:-1], 128)
    assert torch.equal(model.codebook0_head.weight, c0) and torch.equal(model.audio_head, audio)
    assert torch.equal(c0_pad[:V], c0) and not c0_pad[V:].any() and not audio_pad[..., V:].any()
    assert model.codebook0_head.weight.data_ptr() == c0_pad.data_ptr()  # a view: one copy of the weights
    again = pad_frozen_heads(model, multiple=64)  # a second step on the same model: the same storage
    assert again[0].data_ptr() == c0_pad.data_ptr() and torch.equal(again[1], audio_pad)
    assert pad_frozen_heads(tiny_lora()[0].requires_grad_(True), multiple=64) is None  # heads that train: as they are


def test_objective_inputs_and_reference_embedding(data):
    """uncond (caption dropout), input_tokens (scheduled sampling) and muq_embed reach the model as in model.loss."""
    model, params = tiny_lora()
    batch = dict(data.batch([0, 4]))
    batch["muq_embed"] = torch.randn(2, model.cfg.muq_dim)
    uncond = torch.tensor([True, False])
    noisy = batch["tokens"].clone()
    frames = batch["audio_frame_mask"]
    noisy[..., :8][frames] = (noisy[..., :8][frames] + 1) % model.cfg.codebook_size
    want, want_grads = reference(model, params, batch, uncond=uncond, input_tokens=noisy)
    step = CapturedStep(model, params, None, bucket=32)
    got = step(batch, extra={"uncond": uncond, "input_tokens": noisy})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip([p.grad for p in params], want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_lora_dropout_and_checkpointing(data):
    """Seeded LoRA dropout: one clip gives the same masks padded or not (the element positions of real rows do
    not move), so the step equals model.loss under the same seed, with checkpointing recomputing the masks."""
    model, params = tiny_lora(dropout=0.3, checkpointing=True)
    batch = data.batch([2])
    set_dropout_seed(model, 1234)
    want, want_grads = reference(model, params, batch)
    model_nock, _ = tiny_lora(dropout=0.3)
    set_dropout_seed(model_nock, 1234)
    other, _ = reference(model_nock, [p for p in model_nock.parameters() if p.requires_grad], batch)
    torch.testing.assert_close(other, want, rtol=1e-5, atol=1e-6)  # checkpointing recomputes the same masks
    step = CapturedStep(model, params, None, bucket=32)
    got = step(batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip([p.grad for p in params], want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    set_dropout_seed(model, 1235)  # another seed, other masks
    for p in params:
        p.grad = None
    moved, _ = reference(model, params, batch)
    assert not torch.allclose(moved, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_captured_graphs_equal_eager_on_cuda(data):
    """Real capture and replay, bf16 autocast, checkpointing and dropout: every replay equals the uncaptured step
    on the same inputs (same kernels), across two shapes, shapes revisited, and a release; the factors change
    between calls, so a replay that read stale bf16 copies of them (FactorCopies) would differ."""
    model, params = tiny_lora(dropout=0.1, device="cuda", checkpointing=True)
    eager = CapturedStep(model, params, torch.bfloat16, bucket=16, capture=False)
    graphed = CapturedStep(model, params, torch.bfloat16, bucket=16, capture=True, log=lambda m: None)
    for i, idx in enumerate([[0], [1, 2], [0], [3], [1, 2]]):
        batch = data.batch(idx)
        set_dropout_seed(model, 100 + i)
        for p in params:
            p.grad.zero_()
        want = eager(batch, scale=0.5).clone()
        want_grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad.zero_()
        got = graphed(batch, scale=0.5).clone()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        for g, w in zip([p.grad for p in params], want_grads):
            torch.testing.assert_close(g, w, rtol=5e-2, atol=1e-4)
        if i == 2:
            graphed.release()
        with torch.no_grad():  # as an optimizer step: the next replay must cast these new factors (FactorCopies)
            for p in params:
                p.add_(torch.randn_like(p), alpha=0.02)
    assert graphed.captures == 4  # shapes [0] and [1,2] twice (released in between), [3] once... at most


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_shape_captured_again_with_more_rows_stays_captured(data):
    """The pool's only graph replaced by a capture of the same shape with room for more loss rows (what the first
    steps after a validation that freed the graphs often do): the new capture succeeds and replays the right
    numbers. It used to fail inside PyTorch's allocator (use_count > 0) and leave the run eager for good."""
    model, params = tiny_lora(device="cuda")
    logs = []
    graphed = CapturedStep(model, params, torch.bfloat16, bucket=4, capture=True, log=logs.append)
    eager = CapturedStep(model, params, torch.bfloat16, bucket=4, capture=False)
    full = data.batch([0])
    frames = full["audio_frame_mask"][0].nonzero()[:, 0]
    mask = full["audio_frame_mask"].clone()
    mask[0, frames[len(frames) // 2:]] = False  # the same rows, half the frames to predict
    fewer = dict(full, audio_frame_mask=mask)
    for round_ in range(2):  # the second round starts from release(), as after a validation
        for batch in (fewer, full):
            for p in params:
                p.grad.zero_()
            want = eager(batch).clone()
            for p in params:
                p.grad.zero_()
            got = graphed(batch).clone()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        graphed.release()
    assert graphed.capture, logs
    assert not any("could not be captured" in m for m in logs), logs
    assert graphed.captures == 4  # each round: the shape, then the same shape with more room


@pytest.mark.parametrize("accum,checkpointing", [(1, True), (2, False)])
def test_train_py_with_the_captured_step_equals_the_eager_step(tmp_path, monkeypatch, accum, checkpointing):
    """train.py's captured-step path (grads kept in place, zeroed in place, accumulation, seeded LoRA dropout)
    trains the same LoRA as its eager path. On CPU the step runs uncaptured; the device run captures it."""
    import train
    from tests.test_train import lora, make_run
    kw = dict(lora_dropout=0.1, gradient_checkpointing=checkpointing, gradient_accumulation_steps=accum,
              decoder_fraction=0.5)
    eager = train.train([str(make_run(tmp_path / "eager", **kw))])
    monkeypatch.setattr(train, "CAPTURED_STEP_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    captured = train.train([str(make_run(tmp_path / "captured", **kw))])
    a, b = lora(eager), lora(captured)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_autocast_step_casts_fresh_factor_copies(data, monkeypatch):
    """Under autocast the step casts every LoRA factor once per call (lora.FactorCopies) and the layers read those
    copies: it equals model.loss under the same autocast, and after the factors change (as an optimizer step
    changes them) the next call computes with the new values, never stale copies."""
    from hmtiny import lora
    model, params = tiny_lora(dropout=0.1, checkpointing=True)
    use_fused_kernels(model)  # as a captured step switches them (off CUDA they run the reference ops)
    batch = data.batch([2])
    step = CapturedStep(model, params, torch.bfloat16, bucket=32)  # on the CPU: the same code, uncaptured
    copies = {id(t) for t in step.factor_copies.dst}
    # per LoRA layer call (LoRAUpdate, or LoRAGroupUpdate for layers sharing an input): whether it was handed the
    # step's copies (else it casts A and B itself), the frozen base weight (the node runs the base matmul too:
    # LoRALinear.folded_weight) and the step's gradient buffers
    read = []
    real_apply = lora.LoRAUpdate.apply

    def apply(y, x, A, B, a, b, scaling, seed, salt, p, weight=None, grads=None):
        read.append(a is not None and id(a) in copies and id(b) in copies and y is None and weight is not None
                    and any(grads is g for g in step.factor_copies.grads))  # and its gradient buffers
        return real_apply(y, x, A, B, a, b, scaling, seed, salt, p, weight, grads)

    real_group = lora.LoRAGroupUpdate.apply

    def group(x, seed, layers, p, *factors):  # layers reading one input (q/k/v, w1/w3): the same, per layer
        read.extend(m.factor_copies is not None and all(id(t) in copies for t in m.factor_copies)
                    and m.folded_weight() is not None and any(m.factor_grads is g for g in step.factor_copies.grads)
                    for m in layers)
        grouped.append(len(layers))
        return real_group(x, seed, layers, p, *factors)

    monkeypatch.setattr(lora.LoRAUpdate, "apply", apply)
    monkeypatch.setattr(lora.LoRAGroupUpdate, "apply", group)
    losses, grouped = [], []
    for _ in range(2):
        set_dropout_seed(model, 7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, want_grads = reference(model, params, batch)
        for p in params:
            p.grad = torch.zeros_like(p)
        read.clear()
        got = step(batch)
        # every layer call of the step (forward and checkpointing's recomputation) read the copies, base folded in
        assert read and all(read), read
        assert set(grouped) == {2, 3}  # the fused modules ran w1/w3 and q/k/v through the group node
        grouped.clear()
        torch.testing.assert_close(got, want.float(), rtol=2e-2, atol=2e-2)
        for g, w in zip([p.grad for p in params], want_grads):
            torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-3)
        assert all(m.factor_copies is None for m in step.factor_copies.layers)  # only inside the step
        losses.append(got[0].item())
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn_like(p) * 0.3)
    assert abs(losses[0] - losses[1]) > 0.05


def test_progress_line_leaves_capture_time_out(tmp_path, monkeypatch, capsys):
    """A step that captures a graph shows the capture apart ("+0.3 s capturing") and its frames/s counts only the
    step's own time; the metrics record keeps both."""
    import json
    import time

    import train
    from bench.check_fullsize import step_stats
    from tests.test_train import make_run
    monkeypatch.setattr(train, "CAPTURED_STEP_DEVICES", {"cuda", "cpu"})
    real_call = CapturedStep.__call__

    def call(self, *a, **kw):  # the first call "captures": 0.3 s, counted as capture time as _capture does
        if not self.captures:
            time.sleep(0.3)
            self.captures, self.capture_s = 1, self.capture_s + 0.3
        return real_call(self, *a, **kw)
    monkeypatch.setattr(CapturedStep, "__call__", call)
    train.train([str(make_run(tmp_path, max_train_steps=3, checkpointing_steps=0, device="cpu"))])  # no real capture
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert "(+0.3 s capturing)" in lines[0] and all("capturing" not in line for line in lines[1:])
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["capture_s"] == pytest.approx(0.3) and first["step_s"] > 0.3
    assert first["frames_per_s"] == pytest.approx(first["frames"] / (first["step_s"] - 0.3))
    assert all(r["capture_s"] == 0 for r in rows[1:])
    stats = step_stats(tmp_path / "out" / "metrics.jsonl", 0)
    assert stats["steps_with_capture"] == 1 and stats["capture_s"] == 0.3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA kernels' bits need CUDA"))])
@pytest.mark.parametrize("dropout,checkpointing,from_none", [(0.0, False, False), (0.0, True, False),
                                                             (0.2, False, True), (0.2, True, False)])
def test_buffered_factor_grads_are_bit_identical(data, monkeypatch, device, dropout, checkpointing, from_none):
    """Inside the step's FactorCopies window each layer's backward leaves its factor gradients in bf16 buffers
    (never calling _accumulate) and leaving the window adds them all to .grad (multi-tensor cast + add per alpha):
    the same .grad bits as adding each into .grad in the backward (buffer_grads=False), onto earlier gradients or
    into .grad None, with checkpointing and dropout. Scaling 4/3 in the backbone and 0.7 in the decoder (alphas
    that round, three alpha groups), so a scaling applied in bf16, twice, or not at all would show."""
    from hmtiny import lora
    model, params = tiny_lora(dropout, device, checkpointing, rank=3, alpha=4)
    for m in lora_layers(model.decoder).values():
        m.scaling = 0.7
    batch = data.batch([0, 3])
    calls = []
    real_accumulate = lora._accumulate
    monkeypatch.setattr(lora, "_accumulate", lambda p, g, alpha: (calls.append(p), real_accumulate(p, g, alpha)))
    gen = torch.Generator().manual_seed(3)
    earlier = [(torch.randn(p.shape, generator=gen) * 3e-4).to(device) for p in params]  # earlier micro-batches
    runs = {}
    for buffered in (False, True):
        step = CapturedStep(model, params, torch.bfloat16, bucket=32, capture=False)
        step.factor_copies = FactorCopies(model, torch.bfloat16, buffer_grads=buffered)
        for p, e in zip(params, earlier):
            p.grad = None if from_none else e.clone()
        set_dropout_seed(model, 11)
        calls.clear()
        loss = step(batch, scale=0.5)
        runs[buffered] = loss, [p.grad.clone() for p in params], len(calls)
    (loss0, grads0, calls0), (loss1, grads1, calls1) = runs[False], runs[True]
    assert calls0 == len(params) and calls1 == 0  # unbuffered: once per factor; buffered: never
    assert torch.equal(loss1, loss0)
    for p, g0, g1, e in zip(params, grads0, grads1, earlier):
        assert g1.dtype == torch.float32 and torch.equal(g1, g0)
        assert not torch.equal(g1, torch.zeros_like(g1) if from_none else e)  # a real gradient was added
    assert all(m.factor_grads is None for m in lora_layers(model).values())
