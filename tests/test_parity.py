"""HeartMuLa parity with the official implementation (fixture reference outputs, float32)."""
import pytest
import torch
from safetensors.torch import load_file

from hmtiny.checkpoint import load_heartmula
from hmtiny.model import llama3_rope_frequencies


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def mula(fixtures):
    folder = fixtures / "heartmula"
    model = load_heartmula(folder, dtype=torch.float32)
    cases = load_file(str(folder / "cases.safetensors"))
    return model, cases


def case(cases, name):
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in cases.items() if k.startswith(prefix)}


def test_rope_frequencies_bit_identical(mula):
    model, cases = mula
    assert torch.equal(llama3_rope_frequencies(model.cfg.backbone), cases["rope.backbone_theta"])
    assert torch.equal(llama3_rope_frequencies(model.cfg.decoder), cases["rope.decoder_theta"])


def test_training_forward(mula):
    model, cases = mula
    f = case(cases, "forward")
    with torch.no_grad():
        emb = model.embed_rows(f["tokens"], f["tokens_mask"], f["muq_idx"])
        hidden, c0, dec = model(f["tokens"], f["tokens_mask"], f["muq_idx"])
    assert rel_err(emb, f["input_embeds"]) <= 1e-4
    assert rel_err(hidden, f["hidden"]) <= 1e-4
    assert rel_err(c0, f["codebook0_logits"]) <= 1e-4
    assert rel_err(dec, f["decoder_logits"]) <= 1e-4


def test_loss(mula):
    model, cases = mula
    f = case(cases, "forward")
    with torch.no_grad():
        loss, parts = model.loss(f["tokens"], f["tokens_mask"], f["audio_frame_mask"], f["muq_idx"])
    assert abs(loss.item() - f["loss"].item()) <= 1e-4 * abs(f["loss"].item())
    assert abs(parts["loss_c0"].item() - f["loss_codebook0"].item()) <= 1e-4 * abs(f["loss_codebook0"].item())
    assert abs(parts["loss_rest"].item() - f["loss_rest"].item()) <= 1e-4 * abs(f["loss_rest"].item())
    assert parts["frames"] == int(f["audio_frame_mask"][:, 1:].sum())


def test_simpletuner_muq_variant(mula):
    """Without the MuQ-row overwrite we reproduce what SimpleTuner trains (and only then)."""
    model, cases = mula
    f, st = case(cases, "forward"), case(cases, "forward_simpletuner_muq")
    with torch.no_grad():
        hidden = model.backbone(model.embed_rows(f["tokens"], f["tokens_mask"]))
        loss, _ = model.loss(f["tokens"], f["tokens_mask"], f["audio_frame_mask"])
    assert rel_err(hidden, st["hidden"]) <= 1e-4
    assert abs(loss.item() - st["loss"].item()) <= 1e-4 * abs(st["loss"].item())
    assert rel_err(hidden, f["hidden"]) > 1e-3  # the overwrite matters


def test_loss_backward_reaches_parameters(mula):
    model, cases = mula
    f = case(cases, "forward")
    model.zero_grad()
    loss, _ = model.loss(f["tokens"], f["tokens_mask"], f["audio_frame_mask"], f["muq_idx"])
    loss.backward()
    for name in ("backbone.layers.0.attn.q_proj.weight", "decoder.layers.0.mlp.w2.weight", "audio_head",
                 "codebook0_head.weight", "projection.weight", "muq_linear.bias"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()


def test_gradient_checkpointing_same_gradients(mula):
    model, cases = mula
    f = case(cases, "forward")
    grads = []
    for ckpt in (False, True):
        model.train()
        model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = ckpt
        model.zero_grad()
        loss, _ = model.loss(f["tokens"], f["tokens_mask"], f["audio_frame_mask"], f["muq_idx"])
        loss.backward()
        grads.append(model.backbone.layers[1].mlp.w1.weight.grad.clone())
    model.backbone.gradient_checkpointing = model.decoder.gradient_checkpointing = False
    model.eval().zero_grad()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_cached_steps_match_training_forward(mula):
    """The static-KV-cache step path equals the full causal forward (what generation relies on)."""
    model, cases = mula
    f = case(cases, "forward")
    tokens, mask, muq = f["tokens"], f["tokens_mask"], f["muq_idx"]
    B, S, _ = tokens.shape
    with torch.no_grad():
        full = model.backbone(model.embed_rows(tokens, mask, muq))
        model.setup_caches(B, S + 3)
        x = model.embed_rows(tokens, mask, muq)
        first = model.backbone(x[:, :5], torch.arange(5))
        rest = [model.backbone(x[:, t:t + 1], torch.tensor([t])) for t in range(5, S)]
        model.drop_caches()
    stepped = torch.cat([first] + rest, dim=1)
    assert rel_err(stepped, full) <= 1e-5


def test_no_dead_weights(mula):
    """HeartMuLa never uses the Llama token-embedding/output tables: we must not allocate them."""
    model, _ = mula
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith(("backbone.tok", "backbone.output", "decoder.tok", "decoder.output"))]


def greedy_reference_loop(model, tokens, mask, muq_idx, n_frames, cfg_scale):
    """The official frame loop written plainly over the model's step API (static KV caches, CFG on a doubled batch),
    greedy. Returns frames [n,8] and the per-step backbone / decoder last hidden states."""
    B = tokens.shape[0]
    uncond = torch.arange(B) >= B // 2 if cfg_scale > 1.0 else None
    K = model.cfg.audio_num_codebooks
    model.setup_caches(B, tokens.shape[1] + n_frames)

    def pick(logits):
        """Greedy id after CFG mixing, shared by the conditional and unconditional rows."""
        if uncond is None:
            return logits.argmax(-1)
        cond, unc = logits[: B // 2], logits[B // 2:]
        return (unc + (cond - unc) * cfg_scale).argmax(-1).repeat(2)

    frames, bb_h, dec_h = [], [], []
    x = model.embed_rows(tokens, mask, muq_idx, uncond)
    pos = torch.arange(tokens.shape[1])
    for _ in range(n_frames):
        h = model.backbone(x, pos)[:, -1]
        bb_h.append(h)
        c = [pick(model.codebook0_head(h))]
        seq = torch.stack([h, model.embed_audio(0, c[0])], dim=1)
        dpos = torch.arange(2)
        step_h = []
        for k in range(1, K):
            d = model.decoder(model.projection(seq), dpos)[:, -1]
            step_h.append(d)
            c.append(pick(model.audio_logits(k, d)))
            seq, dpos = model.embed_audio(k, c[k])[:, None], torch.tensor([k + 1])
        dec_h.append(torch.stack(step_h))
        frame = torch.stack(c, dim=-1)  # [B,K]
        frames.append(frame[0])
        row = torch.zeros(B, 1, tokens.shape[-1], dtype=tokens.dtype)
        row[:, 0, :K] = frame
        row_mask = torch.zeros_like(row, dtype=torch.bool)
        row_mask[:, 0, :K] = True
        x, pos = model.embed_rows(row, row_mask, None, uncond), pos[-1:] + 1
    model.drop_caches()
    return torch.stack(frames), torch.stack(bb_h), torch.stack(dec_h)


@pytest.mark.parametrize("name,cfg_scale", [("generate_nocfg", 1.0), ("generate_cfg", 1.5)])
def test_greedy_generation_step_api(mula, name, cfg_scale):
    """The model's inference-step API (static caches, CFG, decoder positions) reproduces the official frames and
    hidden states; hmtiny.generate's fast engine is checked against the same fixtures in test_generate.py."""
    model, cases = mula
    g = case(cases, name)
    with torch.no_grad():
        frames, bb_h, dec_h = greedy_reference_loop(model, g["tokens"], g["tokens_mask"], g["muq_idx"],
                                                    g["frames"].shape[0], cfg_scale)
    assert torch.equal(frames, g["frames"])
    assert rel_err(bb_h, g["backbone_last_h"]) <= 1e-4
    assert rel_err(dec_h, g["decoder_last_h"]) <= 1e-4


@pytest.mark.parametrize("name,cfg_scale", [("generate_nocfg", 1.0), ("generate_cfg", 1.5)])
def test_greedy_generation_engine(mula, name, cfg_scale):
    from hmtiny.generate import generate
    model, cases = mula
    g = case(cases, name)
    prompt = (g["tokens"][0], g["tokens_mask"][0], int(g["muq_idx"][0]))
    frames = generate(model, [prompt], max_frames=g["frames"].shape[0], cfg_scale=cfg_scale, topk=1)
    assert torch.equal(frames[0], g["frames"])
