"""LoRA layers: targets, zero init, save/load round trip, merge equivalence, several files, SimpleTuner keys."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from hmtiny.config import ModelConfig
from hmtiny.lora import (DEFAULT_TARGETS, LoRALinear, apply_loras, inject_lora, load_lora_into, lora_layers,
                         lora_parameters, mark_only_lora_trainable, merge_lora, read_lora, remove_lora, save_lora)
from hmtiny.model import HeartMuLa

TINY = {"backbone_flavor": "t-b", "decoder_flavor": "t-d", "text_vocab_size": 64, "audio_vocab_size": 37,
        "audio_num_codebooks": 8, "muq_dim": 4,
        "backbone": {"num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "embed_dim": 16, "intermediate_dim": 24,
                     "max_seq_len": 64},
        "decoder": {"num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "embed_dim": 16, "intermediate_dim": 20,
                    "max_seq_len": 16}}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    m = HeartMuLa(ModelConfig.from_dict(TINY))
    for p in m.parameters():  # O(1) random weights everywhere (RMSNorm gains too)
        nn.init.normal_(p, std=0.3)
    return m.eval()


def batch(seed=0, B=2, S=12):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32, (B, S, 9), generator=g)
    mask = torch.zeros(B, S, 9, dtype=torch.bool)
    mask[:, :4, 8] = True
    mask[:, 4:, :8] = True
    frames = torch.zeros(B, S, dtype=torch.bool)
    frames[:, 4:] = True
    return tokens, mask, frames, torch.tensor([1] * B)


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def outputs(model):
    tokens, mask, frames, muq = batch()
    with torch.no_grad():
        h, c0, dec = model(tokens, mask, muq)
        loss, _ = model.loss(tokens, mask, frames, muq)
    return h, c0, dec, loss


def close(a, b, tol=1e-5):
    return all(torch.allclose(x, y, atol=tol, rtol=tol) for x, y in zip(a, b))


def test_default_targets_wrap_both_stacks():
    m = tiny_model()
    paths = inject_lora(m, rank=4)
    n_layers = TINY["backbone"]["num_layers"] + TINY["decoder"]["num_layers"]
    assert len(paths) == n_layers * len(DEFAULT_TARGETS)
    assert {p.split(".")[0] for p in paths} == {"backbone", "decoder"}
    assert all(isinstance(m.get_submodule(p), LoRALinear) for p in paths)
    # the module paths are unchanged, so base weights keep their checkpoint names under .base
    assert "backbone.layers.0.attn.q_proj.lora_A.weight" in dict(m.named_parameters())


def test_hf_names_and_dotted_paths_select_layers():
    m = tiny_model()
    paths = inject_lora(m, rank=2, targets=["o_proj", "decoder.layers.0.mlp.gate_proj", "projection"])
    assert set(paths) == {"backbone.layers.0.attn.output_proj", "backbone.layers.1.attn.output_proj",
                          "decoder.layers.0.attn.output_proj", "decoder.layers.0.mlp.w1", "projection"}


def test_unknown_target_is_an_error_naming_it():
    with pytest.raises(ValueError, match="qproj"):
        inject_lora(tiny_model(), rank=2, targets=["qproj"])


def test_zero_init_leaves_outputs_unchanged_and_only_lora_trains():
    ref = tiny_model()
    m = tiny_model()
    inject_lora(m, rank=4, alpha=8)
    assert close(outputs(ref), outputs(m), 0)
    params = mark_only_lora_trainable(m)
    assert {id(p) for p in params} == {id(p) for p in m.parameters() if p.requires_grad}
    m.train()
    tokens, mask, frames, muq = batch()
    loss, _ = m.loss(tokens, mask, frames, muq)
    loss.backward()
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
    # B = 0 so A gets no gradient at first, but every B does
    assert all(lay.lora_B.weight.grad.abs().sum() > 0 for lay in lora_layers(m).values())


def test_lora_changes_outputs_by_the_low_rank_update():
    m = tiny_model()
    inject_lora(m, rank=3, alpha=6, targets=["q_proj"])
    randomize_lora(m)
    lay = m.backbone.layers[0].attn.q_proj
    x = torch.randn(5, 16)
    expected = x @ (lay.base.weight + 2.0 * lay.lora_B.weight @ lay.lora_A.weight).T
    assert torch.allclose(lay(x), expected, atol=1e-5)


def test_save_load_round_trip_and_metadata(tmp_path):
    m = tiny_model()
    inject_lora(m, rank=4, alpha=2)
    randomize_lora(m)
    path = save_lora(m, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["lora_rank"] == "4" and float(meta["lora_alpha"]) == 2.0
    assert json.loads(meta["lora_target_modules"]) == list(DEFAULT_TARGETS)
    assert "decoder.layers.0.mlp.w2.lora_B.weight" in keys
    assert not any(".base." in k for k in keys)
    m2 = tiny_model()
    inject_lora(m2, rank=4, alpha=2)
    load_lora_into(m2, path)
    assert close(outputs(m), outputs(m2), 0)


def test_load_rank_or_target_mismatch_is_clear(tmp_path):
    m = tiny_model()
    inject_lora(m, rank=4)
    path = save_lora(m, tmp_path / "a.safetensors")
    other_rank = tiny_model()
    inject_lora(other_rank, rank=8)
    with pytest.raises(ValueError, match="lora_rank 8"):
        load_lora_into(other_rank, path)
    other_targets = tiny_model()
    inject_lora(other_targets, rank=4, targets=["q_proj"])
    with pytest.raises(ValueError, match="does not adapt"):
        load_lora_into(other_targets, path)


def test_alpha_difference_is_folded_into_b(tmp_path):
    m = tiny_model()
    inject_lora(m, rank=4, alpha=16)
    randomize_lora(m)
    path = save_lora(m, tmp_path / "a.safetensors")
    m2 = tiny_model()
    inject_lora(m2, rank=4, alpha=4)
    load_lora_into(m2, path)
    assert close(outputs(m), outputs(m2), 1e-5)


def test_merge_equals_unmerged(tmp_path):
    m = tiny_model()
    inject_lora(m, rank=4, alpha=8)
    randomize_lora(m)
    unmerged = outputs(m)
    merge_lora(m)
    assert not lora_layers(m)
    assert "backbone.layers.0.attn.q_proj.weight" in m.state_dict()
    assert close(unmerged, outputs(m), 1e-4)


def test_apply_several_files_merged_and_unmerged_agree(tmp_path):
    files = []
    for seed, (rank, alpha) in enumerate([(4, 8), (2, 2)]):
        m = tiny_model()
        inject_lora(m, rank=rank, alpha=alpha, targets=["q_proj", "w2"] if seed else None)
        randomize_lora(m, seed=seed + 10)
        files.append(save_lora(m, tmp_path / f"l{seed}.safetensors"))
    loras = [(files[0], 0.7), (files[1], -1.3)]
    merged = apply_loras(tiny_model(), loras, merge=True)
    assert not lora_layers(merged)
    unmerged = apply_loras(tiny_model(), loras, merge=False)
    q = unmerged.backbone.layers[0].attn.q_proj
    assert isinstance(q, LoRALinear) and q.rank == 6  # ranks concatenated
    assert close(outputs(merged), outputs(unmerged), 1e-4)
    # and both equal applying the files one at a time through the training wrapper
    ref = tiny_model()
    for f, s in loras:
        inject_lora(ref, rank=read_lora(f).rank, targets=read_lora(f).targets)
        load_lora_into(ref, f)
        for lay in lora_layers(ref).values():
            lay.lora_B.weight.data *= s
        merge_lora(ref)
    assert close(outputs(merged), outputs(ref), 1e-4)


def test_unmerged_on_a_base_without_float_weight(tmp_path):
    """apply_loras keeps adapters unmerged when the base has no float weight (the int8 case)."""

    class OpaqueLinear(nn.Module):  # stands in for an int8 layer: in/out features and forward only
        def __init__(self, lin):
            super().__init__()
            self.in_features, self.out_features = lin.in_features, lin.out_features
            self.register_buffer("w", lin.weight.detach().clone())

        def forward(self, x):
            return x @ self.w.T

    def opaque(model):
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            for stack in (model.backbone, model.decoder):
                for layer in stack.layers:
                    setattr(layer.attn, name, OpaqueLinear(getattr(layer.attn, name)))
        return model

    src = tiny_model()
    inject_lora(src, rank=3, targets=["attn.q_proj", "attn.v_proj"])
    randomize_lora(src)
    ref = outputs(src)
    f = save_lora(src, tmp_path)
    m = apply_loras(opaque(tiny_model()), [(f, 1.0)])
    assert isinstance(m.backbone.layers[0].attn.q_proj, LoRALinear)
    assert close(ref, outputs(m), 1e-4)
    with pytest.raises(ValueError, match="cannot merge"):
        merge_lora(m)


def test_reads_simpletuner_peft_keys(tmp_path):
    """SimpleTuner saves the PEFT state of its HF-Llama port packed under 'transformer.' (self_attn.o_proj,
    mlp.gate_proj...) with the PEFT config in 'lora_adapter_metadata'."""
    m = tiny_model()
    inject_lora(m, rank=2, alpha=4, targets=["output_proj", "w1", "w3", "w2"])
    randomize_lora(m)
    ours = {k: v.clone() for k, v in save_and_read(m, tmp_path).items()}
    rename = {".attn.output_proj.": ".self_attn.o_proj.", ".mlp.w1.": ".mlp.gate_proj.",
              ".mlp.w3.": ".mlp.up_proj.", ".mlp.w2.": ".mlp.down_proj."}
    st = {}
    for k, v in ours.items():
        for a, b in rename.items():
            k = k.replace(a, b)
        st["transformer." + k] = v
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 4})}
    save_file(st, str(tmp_path / "st.safetensors"), metadata=meta)
    lw = read_lora(tmp_path / "st.safetensors")
    assert lw.alpha == 4 and "backbone.layers.1.mlp.w3" in lw.modules
    m2 = tiny_model()
    inject_lora(m2, rank=2, alpha=4, targets=["o_proj", "gate_proj", "up_proj", "down_proj"])
    load_lora_into(m2, lw)
    assert close(outputs(m), outputs(m2), 0)


def save_and_read(model, tmp_path):
    p = save_lora(model, tmp_path / "ours.safetensors")
    with safe_open(str(p), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_remove_lora_restores_base():
    ref = tiny_model()
    m = tiny_model()
    inject_lora(m, rank=2)
    randomize_lora(m)
    remove_lora(m)
    assert m.state_dict().keys() == ref.state_dict().keys()
    assert close(outputs(ref), outputs(m), 0)


def test_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_lora(bad)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_lora(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_update_backward_equals_autograd(p, folded):
    """LoRAUpdate (the training path under autocast: hand-written backward, factor gradients added straight into
    .grad) against autograd's own graph of the same formula, in float64 so only the maths is compared; twice, so
    the second backward must accumulate onto the first. folded: the node also runs the base's matmul (y None, a
    frozen weight W): against F.linear(x, W) + the update through autograd."""
    import torch.nn.functional as F

    from hmtiny.lora import LoRAUpdate
    from kernels.dropout import seeded_dropout
    g = torch.Generator().manual_seed(0)
    M, n_in, n_out, r, scaling = 37, 23, 19, 4, 0.75
    seed = torch.tensor([1234], dtype=torch.int32)
    x = torch.randn(2, M, n_in, generator=g, dtype=torch.float64)
    y0 = torch.randn(2, M, n_out, generator=g, dtype=torch.float64)
    gout = torch.randn(2, M, n_out, generator=g, dtype=torch.float64)

    def leaves():
        torch.manual_seed(5)
        return [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((r, n_in), (n_out, r))]

    def run(fn):
        A, B = leaves()
        xs, ys = x.clone().requires_grad_(), y0.clone().requires_grad_()
        for _ in range(2):
            out = fn(ys, xs, A, B)
            out.backward(gout)
        return out.detach(), xs.grad, ys.grad, A.grad, B.grad

    W = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)  # frozen

    def plain(y, x_, A, B):
        h = seeded_dropout(x_, seed, 3, p)
        return (F.linear(x_, W) if folded else y) + scaling * (h @ A.t() @ B.t())

    want = run(plain)
    if folded:
        got = run(lambda y, x_, A, B: LoRAUpdate.apply(None, x_, A, B, None, None, scaling, seed, 3, p, W))
        want, got = want[:2] + want[3:], got[:2] + got[3:]  # no y input: out, dx, dA, dB
    else:
        got = run(lambda y, x_, A, B: LoRAUpdate.apply(y, x_, A, B, None, None, scaling, seed, 3, p))
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, rtol=1e-10, atol=1e-12)


def test_lora_layer_under_autocast_matches_the_plain_form():
    """The layer's autocast path (LoRAUpdate) against the composition torch.compile traces (same formula through
    autograd), bf16 autocast on the CPU: same output and gradients up to bf16 rounding."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=False)
    layer = LoRALinear(base, rank=8, alpha=16, dropout=0.2).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    layer.seed.tensor.fill_(77)
    x = torch.randn(3, 50, 48)

    def grads(compiled_form: bool):
        for prm in (layer.lora_A.weight, layer.lora_B.weight):
            prm.grad = None
        xs = x.clone().requires_grad_()
        from unittest import mock
        with mock.patch("torch.compiler.is_compiling", return_value=compiled_form), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(xs)
        out.float().square().sum().backward()
        return out.float(), xs.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()

    fused, plain = grads(False), grads(True)
    assert fused[0].dtype == torch.float32 and layer.lora_A.weight.grad.dtype == torch.float32
    for f, q in zip(fused, plain):
        torch.testing.assert_close(f, q, rtol=2e-2, atol=2e-2)


def folded_layer(weight_dtype=torch.float32, p=0.0):
    """A LoRALinear whose base is a frozen nn.Linear without bias: its autocast path folds the base matmul."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=False).to(weight_dtype).requires_grad_(False)
    layer = LoRALinear(base, rank=8, alpha=16, dropout=p).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    layer.seed.tensor.fill_(77)
    return layer


def layer_grads(layer, x, fold=True):
    """out, dx, dA, dB of one forward + backward (float32 loss); fold False makes the layer call its base instead."""
    from contextlib import nullcontext
    from unittest import mock
    for prm in (layer.lora_A.weight, layer.lora_B.weight):
        prm.grad = None
    xs = x.clone().requires_grad_()
    with nullcontext() if fold else mock.patch.object(LoRALinear, "folded_weight", return_value=None), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(xs)
    (out.float().square().sum() * 0.01).backward()
    return out, xs.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("weight_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.bfloat16)])
def test_folded_base_matches_the_plain_composition(p, weight_dtype, x_dtype):
    """A frozen nn.Linear base under bf16 autocast: LoRAUpdate runs the base matmul itself. Output, dx, dA, dB
    against the float32 composition (the base's F.linear + the LoRA formula through autograd) up to bf16 rounding;
    against the unfolded path (the base called as a module, then LoRAUpdate): output, dA and dB bit-identical, dx
    differing by the order of its bf16 roundings only."""
    import torch.nn.functional as F

    from kernels.dropout import seeded_dropout
    layer = folded_layer(weight_dtype, p)
    x = torch.randn(3, 50, 48).to(x_dtype)
    folded, unfolded = layer_grads(layer, x), layer_grads(layer, x, fold=False)
    assert folded[0].dtype == torch.bfloat16 and folded[1].dtype == x_dtype

    xs = x.float().requires_grad_()
    A, B = (w.detach().clone().requires_grad_() for w in (layer.lora_A.weight, layer.lora_B.weight))
    h = seeded_dropout(xs, layer.seed.tensor, layer.salt, p)
    out = F.linear(xs, layer.base.weight.float()) + layer.scaling * (h @ A.t() @ B.t())
    (out.square().sum() * 0.01).backward()
    for got, want in zip(folded, (out, xs.grad, A.grad, B.grad)):
        torch.testing.assert_close(got.float(), want.detach(), rtol=2e-2, atol=2e-2)

    assert torch.equal(folded[0], unfolded[0])  # the same F.linear, then the same addmm on the same y
    assert torch.equal(folded[2], unfolded[2]) and torch.equal(folded[3], unfolded[3])
    torch.testing.assert_close(folded[1].float(), unfolded[1].float(), rtol=1e-2, atol=1e-2)


def test_fold_is_taken_for_a_frozen_linear_only():
    """The fold runs for a frozen nn.Linear without bias (the base module is never called, its weight goes to
    LoRAUpdate); an int8 base, a weight that trains (full fine-tuning), a bias or a hook of the base's own keep the
    base's own forward (and a training weight its gradient). Fails if the fold silently falls back."""
    from unittest import mock

    from hmtiny.lora import LoRAUpdate
    from hmtiny.quant import Int8Linear

    def run(layer):
        calls, folded = [], []
        real_forward, real_apply = layer.base.forward, LoRAUpdate.apply

        def forward(x):
            calls.append(1)
            return real_forward(x)

        def apply(y, x, A, B, a, b, scaling, seed, salt, p, weight=None, grads=None):
            folded.append(weight is not None and y is None)
            return real_apply(y, x, A, B, a, b, scaling, seed, salt, p, weight, grads)

        layer.base.forward = forward
        with mock.patch.object(LoRAUpdate, "apply", apply), torch.autocast("cpu", dtype=torch.bfloat16):
            layer(torch.randn(2, 5, 48, requires_grad=True)).float().sum().backward()
        del layer.base.forward
        return len(calls), folded

    frozen = folded_layer()
    assert frozen.folded_weight() is frozen.base.weight
    assert run(frozen) == (0, [True])
    assert run(folded_layer(torch.bfloat16)) == (0, [True])

    # an int8 base: not LoRAUpdate's fold, the group node as a group of one runs its product (never the module)
    from hmtiny.lora import LoRAGroupUpdate
    int8 = LoRALinear(Int8Linear.from_linear(nn.Linear(48, 40, bias=False)), rank=4, alpha=4)
    grouped, real_group = [], LoRAGroupUpdate.apply
    with mock.patch.object(LoRAGroupUpdate, "apply", lambda *a: grouped.append(len(a[2])) or real_group(*a)):
        assert int8.folded_weight() is None and run(int8) == (0, [])
    assert grouped == [1]
    int8_bias = LoRALinear(Int8Linear.from_linear(nn.Linear(48, 40, bias=True)), rank=4, alpha=4)
    assert int8_bias.int8_base() is None and run(int8_bias) == (1, [False])

    trained = LoRALinear(nn.Linear(48, 40, bias=False), rank=4, alpha=4)  # weight.requires_grad: full fine-tuning
    assert trained.folded_weight() is None and run(trained) == (1, [False])
    assert trained.base.weight.grad is not None and trained.base.weight.grad.abs().sum() > 0

    biased = LoRALinear(nn.Linear(48, 40).requires_grad_(False), rank=4, alpha=4)
    assert biased.folded_weight() is None and run(biased) == (1, [False])

    hooked = folded_layer()
    seen = []
    hooked.base.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    assert hooked.folded_weight() is None and run(hooked) == (1, [False]) and seen == [(2, 5, 40)]

    with pytest.raises(ValueError, match="frozen"):
        w = nn.Parameter(torch.randn(40, 48))
        LoRAUpdate.apply(None, torch.randn(5, 48), frozen.lora_A.weight, frozen.lora_B.weight, None, None, 1.0,
                         frozen.seed.tensor, 0, 0.0, w)


def square_layer(p=0.0):
    """A frozen-base LoRALinear 48 -> 48 (its output can feed it again), scaling 12/8 = 1.5, a trained-looking B."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(48, 48, bias=False).requires_grad_(False), rank=8, alpha=12, dropout=p).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    layer.seed.tensor.fill_(5)
    return layer


def window_grads(layer, x, copies=None, calls=1, fail=False):
    """dA, dB of `calls` chained layer calls and one backward, inside copies.active() when given (backward too,
    as in the captured step); fail raises after the backward, inside the window."""
    from contextlib import nullcontext
    xs = x.clone().requires_grad_()
    with copies.active() if copies is not None else nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = xs
            for _ in range(calls):
                out = layer(out)
        (out.float().square().sum() * 0.01).backward()
        if fail:
            raise RuntimeError("boom")
    return layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()


def count_accumulate(monkeypatch):
    from hmtiny import lora
    calls, real = [], lora._accumulate
    monkeypatch.setattr(lora, "_accumulate", lambda p, g, alpha: (calls.append(p), real(p, g, alpha)))
    return calls


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_layer_run_twice_in_one_window_accumulates_both_contributions(monkeypatch, p):
    """A layer that runs twice in one FactorCopies window: its second backward adds to its gradient buffers
    (addmm_) rather than overwriting the first's; against the two added into .grad one by one (outside a window)
    up to the one bf16 rounding of their sum. Dropping either contribution would be far off."""
    from hmtiny.lora import FactorCopies
    layer = square_layer(p)
    x = torch.randn(3, 20, 48)
    for prm in (layer.lora_A.weight, layer.lora_B.weight):
        prm.grad = None
    calls = count_accumulate(monkeypatch)
    got = window_grads(layer, x, FactorCopies(layer, torch.bfloat16), calls=2)
    assert calls == []  # both backwards went to the buffers
    for prm in (layer.lora_A.weight, layer.lora_B.weight):
        prm.grad = None
    want = window_grads(layer, x, calls=2)
    assert len(calls) == 4
    for g, w in zip(got, want):  # bf16 roundings of the products and their sum, relative to the largest entries
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2 * w.abs().max().item())
    # the first call's contribution alone is far from the sum, so an overwrite or a lost add would fail above
    for prm in (layer.lora_A.weight, layer.lora_B.weight):
        prm.grad = None
    once = window_grads(layer, x, calls=1)
    for g, o in zip(got, once):
        assert (g - o).abs().max() > 0.2 * g.abs().max()


def test_window_left_by_an_exception_adds_nothing_and_the_next_starts_afresh():
    """A FactorCopies window that raises after the backward wrote the buffers: .grad keeps its earlier values, the
    layer's copies and buffers are detached; the next window of the same FactorCopies gives what a fresh one
    gives (no written flag or buffer left over)."""
    from hmtiny.lora import FactorCopies
    layer = square_layer(0.2)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(3, 20, 48)
    copies = FactorCopies(layer, torch.bfloat16)
    earlier = (torch.randn(A.shape) * 1e-2, torch.randn(B.shape) * 1e-2)
    A.grad, B.grad = (e.clone() for e in earlier)
    with pytest.raises(RuntimeError, match="boom"):
        window_grads(layer, x, copies, fail=True)
    assert copies.grads[0].written == [True, True]  # the backward did write the buffers
    assert torch.equal(A.grad, earlier[0]) and torch.equal(B.grad, earlier[1])
    assert layer.factor_copies is None and layer.factor_grads is None and not copies.grads[0].open
    got = window_grads(layer, x, copies)
    A.grad, B.grad = (e.clone() for e in earlier)
    want = window_grads(layer, x, FactorCopies(layer, torch.bfloat16))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(want[0], earlier[0]) and not torch.equal(want[1], earlier[1])  # it did add


def test_backward_after_the_window_adds_into_grad_itself(monkeypatch):
    """A forward inside a window whose backward runs after it closed: the buffers are no longer read, so the
    backward adds into .grad itself (_accumulate), with the same result as without a window."""
    from hmtiny.lora import FactorCopies
    layer = square_layer()
    x = torch.randn(3, 20, 48)
    copies = FactorCopies(layer, torch.bfloat16)
    calls = count_accumulate(monkeypatch)
    with copies.active(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.clone().requires_grad_())
    (out.float().square().sum() * 0.01).backward()
    got = layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()
    assert len(calls) == 2 and copies.grads[0].written == [False, False]
    layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    want = window_grads(layer, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def grouped_layers(p=0.0, weight_dtype=torch.bfloat16, ranks=(8, 8, 8)):
    """Three folded LoRA layers reading one input (as q/k/v do), one seed and salt, random B."""
    torch.manual_seed(0)
    layers = []
    for i, (out, r) in enumerate(zip((40, 24, 24), ranks)):
        base = nn.Linear(48, out, bias=False).to(weight_dtype).requires_grad_(False)
        layer = LoRALinear(base, rank=r, alpha=16, dropout=p).train()
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.1)
        layers.append(layer)
    for layer in layers[1:]:
        layer.seed = layers[0].seed
    layers[0].seed.tensor.fill_(77)
    return layers


def group_grads(layers, x, grouped: bool):
    """outputs, dx, then (dA, dB) per layer, of one forward + backward under bf16 autocast."""
    from hmtiny.lora import group_update
    for m in layers:
        m.lora_A.weight.grad = m.lora_B.weight.grad = None
    xs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = group_update(layers, xs) if grouped else tuple(m(xs) for m in layers)
    assert outs is not None
    sum((o.float().square().sum() * (0.01 * (i + 1))) for i, o in enumerate(outs)).backward()
    return outs, xs.grad, [(m.lora_A.weight.grad.clone(), m.lora_B.weight.grad.clone()) for m in layers]


def assert_group_equals_layers(grouped, one_by_one):
    """group_grads of the group node against each layer run by itself: up to the order of bf16 roundings."""
    (g_outs, g_dx, g_ab), (l_outs, l_dx, l_ab) = grouped, one_by_one
    for a, b in zip(g_outs, l_outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g_dx.float(), l_dx.float(), rtol=2e-2, atol=2e-2)
    for (ga, gb), (la, lb) in zip(g_ab, l_ab):
        torch.testing.assert_close(ga, la, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(gb, lb, rtol=2e-2, atol=2e-2)


def assert_group_equals_float32(layers, x, p, grouped, dense):
    """group_grads against the float32 composition over the dense base weights, with one dropout mask for the
    whole group."""
    import torch.nn.functional as F

    from kernels.dropout import seeded_dropout
    g_outs, g_dx, g_ab = grouped
    xs = x.float().requires_grad_()
    h = seeded_dropout(xs, layers[0].seed.tensor, layers[0].salt, p)
    factors = [(m.lora_A.weight.detach().clone().requires_grad_(), m.lora_B.weight.detach().clone().requires_grad_())
               for m in layers]
    outs = [F.linear(xs, w) + m.scaling * (h @ A.t() @ B.t()) for m, w, (A, B) in zip(layers, dense, factors)]
    sum((o.square().sum() * (0.01 * (i + 1))) for i, o in enumerate(outs)).backward()
    for a, b in zip(g_outs, outs):
        torch.testing.assert_close(a.float(), b.detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g_dx.float(), xs.grad, rtol=3e-2, atol=3e-2)
    for (ga, gb), (A, B) in zip(g_ab, factors):
        torch.testing.assert_close(ga, A.grad, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(gb, B.grad, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_group_update_equals_the_layers_one_by_one(p, x_dtype):
    """LoRAGroupUpdate (one dropout, one LoRA-down GEMM, one dx buffer) against each layer's own LoRAUpdate: the
    same outputs, dx and factor gradients up to the order of bf16 roundings; and against the float32 composition
    with the shared mask."""
    layers = grouped_layers(p, ranks=(8, 4, 8))
    x = torch.randn(3, 50, 48).to(x_dtype)
    grouped = group_grads(layers, x, grouped=True)
    assert [o.dtype for o in grouped[0]] == [torch.bfloat16] * 3 and grouped[1].dtype == x_dtype
    assert_group_equals_layers(grouped, group_grads(layers, x, grouped=False))
    assert_group_equals_float32(layers, x, p, grouped, [m.base.weight.float() for m in layers])


def test_group_update_declines_what_it_cannot_run():
    """None (each layer runs itself) without autocast, for a base it cannot run (an int8 one with a bias, a
    training weight), for layers with different dropout salts or rates, for a module that is not a LoRA layer."""
    from hmtiny.lora import group_update
    from hmtiny.quant import Int8Linear
    x = torch.randn(2, 5, 48)
    assert group_update(grouped_layers(), x) is None  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert group_update(grouped_layers(), x) is not None
        layers = grouped_layers()
        layers[1].base = Int8Linear.from_linear(nn.Linear(48, 24, bias=True))  # an int8 base with a bias
        assert group_update(layers, x) is None
        layers = grouped_layers()
        layers[2].base.weight.requires_grad_(True)
        assert group_update(layers, x) is None
        layers = grouped_layers()
        layers[2].salt = 5
        assert group_update(layers, x) is None
        layers = grouped_layers(0.1)
        layers[0].dropout_p = 0.2
        assert group_update(layers, x) is None
        assert group_update([nn.Linear(48, 4)] + grouped_layers()[1:], x) is None


def test_layers_reading_one_input_share_a_salt():
    """q/k/v of an attention share one dropout salt, w1/w3 of an MLP another; every other layer, and every other
    module's layers, get salts of their own."""
    model = tiny_model()
    inject_lora(model, rank=2, dropout=0.1)
    salts = {p: m.salt for p, m in lora_layers(model).items()}
    for stack, n in (("backbone", 2), ("decoder", 1)):
        for i in range(n):
            at = f"{stack}.layers.{i}"
            assert salts[f"{at}.attn.q_proj"] == salts[f"{at}.attn.k_proj"] == salts[f"{at}.attn.v_proj"]
            assert salts[f"{at}.mlp.w1"] == salts[f"{at}.mlp.w3"]
    groups = {}
    for p, salt in salts.items():
        parent, name = p.rsplit(".", 1)
        same = {"k_proj": "q_proj", "v_proj": "q_proj", "w3": "w1"}
        groups.setdefault(salt, set()).add((parent, same.get(name, name)))
    assert all(len(g) == 1 for g in groups.values())  # one salt, one input
    assert len(groups) == 3 * 4  # q/k/v, output_proj, w1/w3, w2 in each of 3 layers


@pytest.mark.parametrize("int8", [False, True])
def test_fused_model_runs_the_groups(monkeypatch, int8):
    """Under autocast the fused Attention and MLP take LoRAGroupUpdate for q/k/v and w1/w3 (one call each per
    block), bf16 or int8 base, and the training loss equals the unfused model's up to bf16 rounding."""
    from hmtiny.fused import use_fused_kernels
    from hmtiny.lora import LoRAGroupUpdate
    from hmtiny.quant import quantize_model
    model = tiny_model().train()
    if int8:
        quantize_model(model)
    inject_lora(model, rank=2, dropout=0.2)
    mark_only_lora_trainable(model)
    randomize_lora(model)
    for m in lora_layers(model).values():
        m.base.weight.requires_grad_(False)
        assert (m.int8_base() is not None) == int8
    tokens, mask, frames, muq = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = model.loss(tokens, mask, frames, muq)
    calls = []
    real = LoRAGroupUpdate.apply
    monkeypatch.setattr(LoRAGroupUpdate, "apply", lambda *a: calls.append(len(a[2])) or real(*a))
    use_fused_kernels(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = model.loss(tokens, mask, frames, muq)
    # 3 blocks: q/k/v and w1/w3 each; with int8 bases output_proj and w2 run as groups of one too
    assert sorted(calls) == [1] * 6 * int8 + [2, 2, 2, 3, 3, 3]
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_group_update_runs_int8_bases(p):
    """Int8 bases (some or all of a group): the group node multiplies by their dequantised weights and adds their
    dx into its buffer; outputs, dx and factor gradients equal each layer run by itself (Int8Linear's own node, then
    LoRAUpdate) up to bf16 rounding."""
    from hmtiny.lora import LoRAGroupUpdate, group_update
    from hmtiny.quant import Int8Linear
    for mixed in (False, True):
        layers = grouped_layers(p, weight_dtype=torch.float32)
        for i, m in enumerate(layers):
            if not (mixed and i == 1):  # mixed: the middle layer keeps a folded nn.Linear base
                m.base = Int8Linear.from_linear(m.base)
        assert [m.int8_base() is not None for m in layers] == [True, not mixed, True]
        x = torch.randn(3, 50, 48).to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert group_update(layers, x) is not None
        calls = []
        real = LoRAGroupUpdate.apply
        LoRAGroupUpdate.apply = lambda *a: calls.append(1) or real(*a)
        try:
            grouped = group_grads(layers, x, grouped=True)
        finally:
            LoRAGroupUpdate.apply = real
        assert calls == [1]
        assert_group_equals_layers(grouped, group_grads(layers, x, grouped=False))
        dense = [m.base.dequantize() if m.int8_base() is not None else m.base.weight.float() for m in layers]
        assert_group_equals_float32(layers, x, p, grouped, dense)


def test_group_keeps_int8_bases_dense_only_under_checkpointing(monkeypatch):
    """An int8 base is dequantised once per forward. Under gradient checkpointing the recomputed forward's dense
    weight serves the backward (no dequantisation in the backward itself); without it the backward dequantises
    again rather than keep every layer's bf16 copy alive. Both give the same outputs and gradients, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    from hmtiny import lora, quant
    from hmtiny.quant import Int8Linear
    layers = grouped_layers(0.25, weight_dtype=torch.float32)
    for m in layers:
        m.base = Int8Linear.from_linear(m.base)
    in_checkpoint = []  # per dequantisation: inside checkpoint's forward or recomputation (True) or not
    real = quant.dense_weight
    monkeypatch.setattr(quant, "dense_weight", lambda *a: in_checkpoint.append(lora._under_checkpoint()) or real(*a))
    seen = []

    def run(x):
        seen.append(lora._under_checkpoint())
        return lora.group_update(layers, x)

    x = torch.randn(2, 30, 48).to(torch.bfloat16)
    results = {}
    for ckpt in (False, True):
        in_checkpoint.clear()
        for m in layers:
            m.lora_A.weight.grad = m.lora_B.weight.grad = None
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = checkpoint(run, xs, use_reentrant=False) if ckpt else run(xs)
        forward_calls = len(in_checkpoint)
        sum((o.float().square().sum() * (0.01 * (i + 1))) for i, o in enumerate(outs)).backward()
        backward_modes = in_checkpoint[forward_calls:]
        assert forward_calls == 3
        # with checkpointing the backward's only dequantisations are the recomputed forward's
        assert backward_modes == ([True] * 3 if ckpt else [False] * 3)
        factor_grads = [g for m in layers for g in (m.lora_A.weight.grad, m.lora_B.weight.grad)]
        results[ckpt] = [o.detach() for o in outs] + [xs.grad] + factor_grads
    assert seen == [False, True, True]  # outside, then checkpoint's forward and its recomputation
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)
    assert not lora._under_checkpoint()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_bases_dequantised_on_a_side_stream_equal_in_line():
    """On CUDA a group's int8 bases dequantise on a side stream beside the products (lora._dense_weights): the
    outputs, dx and factor gradients are those of the in-line order, bit for bit, eagerly and replayed from a CUDA
    graph (where the side stream's work must join the captured stream)."""
    from hmtiny.lora import group_update
    from hmtiny.quant import Int8Linear
    from kernels.switches import overridden
    layers = grouped_layers(0.25, weight_dtype=torch.float32)
    for m in layers:
        m.base = Int8Linear.from_linear(m.base)
    layers = [m.cuda() for m in layers]
    x = torch.randn(3, 50, 48, device="cuda").to(torch.bfloat16)

    def step():
        for m in layers:
            m.lora_A.weight.grad = m.lora_B.weight.grad = None
        xs = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = group_update(layers, xs)
        sum((o.float().square().sum() * (0.01 * (i + 1))) for i, o in enumerate(outs)).backward()
        return [o.detach() for o in outs] + [xs.grad] + [g for m in layers for g in (m.lora_A.weight.grad,
                                                                                        m.lora_B.weight.grad)]

    with overridden(HMTINY_INT8_OVERLAP="0"):
        in_line = step()
    beside = step()
    for a, b in zip(in_line, beside):
        assert torch.equal(a, b)
    side = torch.cuda.Stream()  # a graph of the forward alone (a backward graph needs the forward in it)
    side.wait_stream(torch.cuda.current_stream())
    xs = x.clone()
    with torch.cuda.stream(side), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        group_update(layers, xs)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        outs = group_update(layers, xs)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(in_line[:3], outs):
        assert torch.equal(a, b)
