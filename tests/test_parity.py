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


def last_states(module, store):
    """Record the last row's output state of every call of `module` into `store`."""
    return module.register_forward_hook(lambda mod, args, out: store.append(out[:, -1]))


@pytest.mark.parametrize("name,cfg_scale", [("generate_nocfg", 1.0), ("generate_cfg", 1.5)])
def test_greedy_generation_plain_loop(mula, name, cfg_scale):
    """hmtiny.generate's loop (the model's own KV caches, CFG on a doubled batch, decoder positions) reproduces the
    official frames and the hidden states it went through; the fast engine is held to that loop in
    test_generate.py."""
    from hmtiny.generate import generate
    model, cases = mula
    g = case(cases, name)
    bb_h, dec_h = [], []
    hooks = [last_states(model.backbone, bb_h), last_states(model.decoder, dec_h)]
    try:
        prompt = (g["tokens"][0], g["tokens_mask"][0], int(g["muq_idx"][0]))
        frames = generate(model, [prompt], g["frames"].shape[0], cfg_scale=cfg_scale, topk=1)[0]
    finally:
        for h in hooks:
            h.remove()
    n, K = g["frames"].shape
    assert torch.equal(frames, g["frames"])
    assert rel_err(torch.stack(bb_h), g["backbone_last_h"]) <= 1e-4
    assert rel_err(torch.stack(dec_h).view(n, K - 1, *dec_h[0].shape), g["decoder_last_h"]) <= 1e-4


@pytest.mark.parametrize("name,cfg_scale", [("generate_nocfg", 1.0), ("generate_cfg", 1.5)])
def test_greedy_generation_engine(mula, name, cfg_scale):
    from hmtiny.engine import Engine
    model, cases = mula
    g = case(cases, name)
    prompt = (g["tokens"][0], g["tokens_mask"][0], int(g["muq_idx"][0]))
    frames = Engine(model).generate([prompt], max_frames=g["frames"].shape[0], cfg_scale=cfg_scale, topk=1)
    assert torch.equal(frames[0], g["frames"])
