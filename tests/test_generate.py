"""The fast engine (hmtiny/engine.py), held to the plain loop (hmtiny/generate.py): greedy frames of the official
pipeline, the same sampled tokens under a seed, batching, the stop rule, LoRA, int8."""
import pytest
import torch
from safetensors.torch import load_file

from hmtiny import generate as plain
from hmtiny import runtime
from hmtiny.checkpoint import load_heartmula
from hmtiny.engine import Engine
from hmtiny.text import prompt_rows
from kernels.timing import capture
from kernels.topk_sample import mix_ref, sample_ref

CASES = {"generate_nocfg": 1.0, "generate_cfg": 1.5}


@pytest.fixture(scope="module")
def mula(fixtures):
    folder = fixtures / "heartmula"
    return load_heartmula(folder, dtype=torch.float32), load_file(str(folder / "cases.safetensors"))


def fixture_prompt(cases, name):
    """The official preprocess output, first row (the CFG copy is made by the engine)."""
    return cases[f"{name}.tokens"][0], cases[f"{name}.tokens_mask"][0], int(cases[f"{name}.muq_idx"][0])


def generate(model, prompts, max_frames, seed=None, **kw):
    """One request to a fresh eager engine (on this machine's CPU: the kernels' torch references)."""
    if seed is not None:
        kw["generator"] = torch.Generator().manual_seed(seed)
    return Engine(model).generate(prompts, max_frames, **kw)


def some_prompts():
    """Prompts of different lengths in the fixture's tiny text vocabulary (bos 500, eos 501)."""
    return [prompt_rows([500, 272, 410, 62, 501], [500, 137, 278, 184, 501]),
            prompt_rows([500, 17, 501], [500, 501]),
            prompt_rows([500, 30, 31, 32, 33, 34, 35, 501], [500, 90, 91, 501])]


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_frames_match_official(mula, name):
    model, cases = mula
    frames = generate(model, [fixture_prompt(cases, name)], max_frames=6, cfg_scale=CASES[name], topk=1)
    assert len(frames) == 1
    assert frames[0].dtype == torch.long
    assert torch.equal(frames[0], cases[f"{name}.frames"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_loop_greedy_frames_match_official(mula, name):
    model, cases = mula
    frames = plain.generate(model, [fixture_prompt(cases, name)], max_frames=6, cfg_scale=CASES[name], topk=1)
    assert torch.equal(frames[0], cases[f"{name}.frames"])


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_engine_greedy_equals_plain_loop(mula, cfg_scale):
    """Prompts of several lengths in one batch (left-padded in the engine) against the plain loop, one by one."""
    model, _ = mula
    prompts = some_prompts()
    want = plain.generate(model, prompts, max_frames=24, cfg_scale=cfg_scale, topk=1)
    got = generate(model, prompts, max_frames=24, cfg_scale=cfg_scale, topk=1)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("cfg_scale,topk,temperature", [(1.5, 50, 1.0), (1.0, 0, 1.3), (2.0, 5, 0.7)])
def test_engine_samples_what_plain_loop_samples(mula, cfg_scale, topk, temperature):
    """The same generator state, so the same Exp(1) draws (one prompt): the same tokens, with the engine's padded
    heads and without. Under guidance, with a reference embedding, and with EOS ending songs."""
    model, _ = mula
    prompt = (*some_prompts()[0], torch.randn(model.cfg.muq_dim, generator=torch.Generator().manual_seed(1)))
    kw = dict(max_frames=16, cfg_scale=cfg_scale, topk=topk, temperature=temperature)
    want = plain.generate(model, [prompt], generator=torch.Generator().manual_seed(3), **kw)[0]
    for fuse in (True, False):
        got = Engine(model, fuse=fuse).generate([prompt], generator=torch.Generator().manual_seed(3), **kw)[0]
        assert want.shape[0] > 0 and torch.equal(got, want), fuse
    greedy = plain.generate(model, [prompt], topk=1, **{k: v for k, v in kw.items() if k != "topk"})[0]
    assert not (greedy.shape == want.shape and torch.equal(greedy, want))  # it really samples


def test_plain_sampling_is_the_kernels_reference():
    """hmtiny.generate.sample_ids (the rule) and kernels.topk_sample.sample_ref (what the kernel is tested against)
    are the same function."""
    gen = torch.Generator().manual_seed(0)
    bias = torch.zeros(300)
    bias[250:] = float("-inf")
    for cfg_scale, topk, temperature in [(1.0, 1, 1.0), (1.5, 50, 1.0), (1.0, 0, 0.8), (3.0, 7, 1.7)]:
        logits = torch.randn(4 if cfg_scale != 1.0 else 2, 300, generator=gen)
        noise = torch.empty(2, 300).exponential_(generator=gen)
        want = sample_ref(logits, bias, cfg_scale, temperature, topk, noise)
        assert torch.equal(plain.sample_ids(logits, bias, cfg_scale, temperature, topk, noise), want)


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_batch_equals_each_prompt_alone(mula, cfg_scale):
    model, _ = mula
    prompts = some_prompts()
    together = generate(model, prompts, max_frames=12, cfg_scale=cfg_scale, topk=1)
    for p, got in zip(prompts, together):
        alone = generate(model, [p], max_frames=12, cfg_scale=cfg_scale, topk=1)[0]
        assert torch.equal(got, alone)


def test_seeded_sampling_is_reproducible(mula):
    model, cases = mula
    prompts = some_prompts()[:2]
    kw = dict(max_frames=20, cfg_scale=2.0, topk=50, temperature=1.3)
    a = generate(model, prompts, seed=7, **kw)
    b = generate(model, prompts, seed=7, **kw)
    c = generate(model, prompts, generator=torch.Generator().manual_seed(8), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))
    greedy = generate(model, prompts, max_frames=20, cfg_scale=2.0, topk=1)
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, greedy))  # it really samples
    for f in a + c:
        assert f.shape[1] == 8 and int(f.max()) < model.cfg.codebook_size and int(f.min()) >= 0


def test_generators_advance_as_in_eager_code(mula):
    """The engine draws from its own generator loaded with the caller's state and writes the state back: a generator
    reused for a second song gives a new song, torch.manual_seed reproduces songs drawn with no generator."""
    model, _ = mula
    prompts = some_prompts()[:1]
    kw = dict(max_frames=12, cfg_scale=1.5, topk=50)
    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    first, second = generate(model, prompts, generator=g, **kw)[0], generate(model, prompts, generator=g, **kw)[0]
    assert not torch.equal(g.get_state(), before)
    assert not (first.shape == second.shape and torch.equal(first, second))
    assert torch.equal(first, generate(model, prompts, generator=torch.Generator().manual_seed(5), **kw)[0])
    torch.manual_seed(11)
    a = generate(model, prompts, **kw)[0]
    torch.manual_seed(11)
    assert torch.equal(a, generate(model, prompts, **kw)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_graph_is_reused_across_generators(fixtures):
    """A new generator per request (what sample.py and benchmarks do) replays the captured step, no new capture,
    and the same seed still gives the same song."""
    model = load_heartmula(fixtures / "heartmula", dtype=torch.float32, device="cuda")
    eng, prompts = Engine(model, "graph"), some_prompts()[:2]
    kw = dict(max_frames=16, cfg_scale=1.5, topk=20)
    a = eng.generate(prompts, generator=torch.Generator("cuda").manual_seed(3), **kw)
    graph = eng._graph
    b = eng.generate(prompts, generator=torch.Generator("cuda").manual_seed(3), **kw)
    c = eng.generate(prompts, generator=torch.Generator("cuda").manual_seed(4), **kw)
    assert eng._graph is graph
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))
    # same request shape, other left padding: the replayed step must read this request's values, not stale ones
    d = eng.generate(prompts[::-1], generator=torch.Generator("cuda").manual_seed(3), **kw)
    fresh = Engine(model, "graph").generate(prompts[::-1], generator=torch.Generator("cuda").manual_seed(3), **kw)
    assert eng._graph is graph
    assert all(torch.equal(x, y) for x, y in zip(d, fresh))


def test_sampler_topk_temperature_and_forbidden_ids(mula):
    model, _ = mula
    eng = Engine(model)
    V = eng.Vout  # the engine's heads may be padded to an aligned width
    logits = torch.randn(4, V)
    forbidden = [model.cfg.codebook_size] + list(range(model.cfg.gen.audio_eos_id + 1, V))
    logits[:, forbidden] = 100.0  # the model would pick them: the engine never may
    gen = torch.Generator().manual_seed(0)
    mixed = mix_ref(logits, eng.bias, 1.0)
    sample = lambda topk, temperature, noise: sample_ref(logits, eng.bias, 1.0, temperature, topk, noise)
    seen = set()
    for _ in range(200):
        noise = torch.empty(4, V).exponential_(generator=gen)
        ids = sample(3, 1.0, noise)
        seen.update(ids.tolist())
        top3 = mixed.topk(3).indices
        assert bool((top3 == ids[:, None]).any(-1).all())
    assert not seen & set(forbidden)
    assert len(seen) > 4  # several rows x 3 candidates: it samples
    assert torch.equal(sample(1, 1.0, None), mixed.argmax(-1))
    # very low temperature concentrates on the argmax
    noise = torch.empty(4, V).exponential_(generator=gen)
    assert torch.equal(sample(50, 1e-4, noise), mixed.argmax(-1))


def test_cfg_mix_is_official_formula(mula):
    model, _ = mula
    eng = Engine(model)
    cond, uncond = torch.randn(2, eng.Vout), torch.randn(2, eng.Vout)
    mixed = mix_ref(torch.cat([cond, uncond]), eng.bias, 1.7)
    ok = eng.bias == 0
    torch.testing.assert_close(mixed[:, ok], (uncond + (cond - uncond) * 1.7)[:, ok])


class ForcedStop(Engine):
    """Writes EOS into codebook `k` of song b's frame number stop[b] (a stand-in for a model that ends songs)."""

    def __init__(self, model, stop, k=0):
        super().__init__(model)
        self.stop, self.k, self.steps = stop, k, 0

    def _frame_from_hidden(self, h, noise):
        frame = super()._frame_from_hidden(h, noise)
        self.steps += 1
        at = torch.tensor(self.stop) == self.state["idx"]
        frame[at, self.k] = self.eos
        return frame


@pytest.mark.parametrize("k", [0, 5])
def test_per_song_stop(mula, k):
    model, _ = mula
    prompts = some_prompts()
    full = generate(model, prompts, max_frames=40, cfg_scale=1.5, topk=1)
    eng = ForcedStop(model, stop=[3, 0, 9], k=k)
    got = eng.generate(prompts, max_frames=40, cfg_scale=1.5, topk=1, eos_check_every=4)
    assert [g.shape[0] for g in got] == [3, 0, 9]  # the EOS frame is dropped, any codebook stops
    for g, f in zip(got, full):
        assert torch.equal(g, f[: g.shape[0]])
    assert eng.steps == 13  # frames 0..12: done at frame 9, noticed at the check after frame 12, not 40 frames


def test_max_frames_and_progress(mula):
    model, _ = mula
    calls = []
    out = generate(model, some_prompts()[:1], max_frames=10, topk=1, eos_check_every=4,
                   progress=lambda n, total: calls.append((n, total)))
    assert out[0].shape == (10, 8)
    assert calls[-1] == (10, 10) and all(t == 10 for _, t in calls) and len(calls) >= 2


def test_bad_arguments(mula):
    model, cases = mula
    p = [fixture_prompt(cases, "generate_cfg")]
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(model, p, max_frames=4, cfg_scale=0.5)
    with pytest.raises(ValueError, match="max_frames"):
        generate(model, p, max_frames=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, p, max_frames=4, temperature=0)
    with pytest.raises(ValueError, match="topk must be an integer >= 0"):
        generate(model, p, max_frames=4, topk=-1)
    with pytest.raises(ValueError, match="context"):
        generate(model, p, max_frames=model.cfg.backbone.max_seq_len)
    with pytest.raises(ValueError, match="no prompt"):
        generate(model, [], max_frames=4)
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, mode="graph") if not torch.cuda.is_available() else (_ for _ in ()).throw(ValueError("CUDA"))
    with pytest.raises(ValueError, match="mode must be one of eager, graph"):
        Engine(model, mode="compile")
    with pytest.raises(ValueError, match="mode must be one of plain, eager, graph"):
        runtime.generate(model, p, 4, 1.5, 50, 1.0, mode="fast")
    # the plain loop takes the same rules
    for bad, match in ((dict(cfg_scale=0.5), "cfg_scale"), (dict(temperature=0), "temperature"),
                       (dict(topk=-1), "topk must be an integer >= 0"), (dict(max_frames=0), "max_frames"),
                       (dict(max_frames=model.cfg.backbone.max_seq_len), "context")):
        with pytest.raises(ValueError, match=match):
            plain.generate(model, p, **{"max_frames": 4, **bad})


def test_lora_changes_tokens_zero_lora_does_not(fixtures):
    from hmtiny.lora import inject_lora, lora_layers, merge_lora
    model = load_heartmula(fixtures / "heartmula", dtype=torch.float32)
    prompts = some_prompts()
    base = generate(model, prompts, max_frames=10, topk=1)
    model.train()
    inject_lora(model, rank=4)  # B = 0: no change
    zero = runtime.generate(model, prompts, 10, 1.5, 1, 1.0, mode="eager")
    assert model.training  # runtime.generate restores the mode it found
    assert all(torch.equal(a, b) for a, b in zip(zero, runtime.generate(model, prompts, 10, 1.5, 1, 1.0)))
    assert all(torch.equal(a, b) for a, b in zip(base, zero))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_(0, 0.5, generator=gen)
    unmerged = generate(model, prompts, max_frames=10, topk=1)
    assert not all(torch.equal(a, b) for a, b in zip(base, unmerged))
    assert all(torch.equal(a, b) for a, b in zip(unmerged, plain.generate(model, prompts, max_frames=10, topk=1)))
    merge_lora(model)
    merged = generate(model, prompts, max_frames=10, topk=1)
    assert all(torch.equal(a, b) for a, b in zip(unmerged, merged))


def test_kept_engine_refuses_a_model_whose_layers_were_replaced(fixtures):
    from hmtiny.lora import inject_lora
    model = load_heartmula(fixtures / "heartmula", dtype=torch.float32)
    eng, p = Engine(model), some_prompts()[:1]
    first = eng.generate(p, max_frames=4, topk=1)
    assert all(torch.equal(a, b) for a, b in zip(first, eng.generate(p, max_frames=4, topk=1)))
    inject_lora(model, rank=2)
    with pytest.raises(ValueError, match="replaced"):
        eng.generate(p, max_frames=4, topk=1)


def test_weights_changed_in_place_are_seen(fixtures):
    """Fused copies are refreshed each call (training changes weights between validations)."""
    model = load_heartmula(fixtures / "heartmula", dtype=torch.float32)
    p, eng = some_prompts()[:1], Engine(model)  # kept, as a caller reusing its engine does
    before = eng.generate(p, max_frames=8, topk=1)[0]
    with torch.no_grad():
        model.backbone.layers[0].mlp.w3.weight.mul_(-3.0)
    after = eng.generate(p, max_frames=8, topk=1)[0]
    fresh = Engine(load_heartmula(fixtures / "heartmula", dtype=torch.float32), fuse=False)
    with torch.no_grad():
        fresh.model.backbone.layers[0].mlp.w3.weight.mul_(-3.0)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh.generate(p, max_frames=8, topk=1)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_graph_matches_eager_and_plain(fixtures):
    folder = fixtures / "heartmula"
    model = load_heartmula(folder, dtype=torch.float32, device="cuda")
    cases = load_file(str(folder / "cases.safetensors"))
    for name, cfg in CASES.items():
        got = Engine(model, "graph").generate([fixture_prompt(cases, name)], 6, cfg_scale=cfg, topk=1)[0]
        assert torch.equal(got, cases[f"{name}.frames"])
    prompts = some_prompts()
    kw = dict(max_frames=24, cfg_scale=1.5, topk=20, temperature=1.0)
    eager = Engine(model, "eager").generate(prompts, generator=torch.Generator("cuda").manual_seed(3), **kw)
    fast = Engine(model, "graph").generate(prompts, generator=torch.Generator("cuda").manual_seed(3), **kw)
    assert all(torch.equal(a, b) for a, b in zip(eager, fast))
    greedy = plain.generate(model, prompts, 24, cfg_scale=1.5, topk=1)
    assert all(torch.equal(a, b) for a, b in zip(greedy, Engine(model, "graph").generate(prompts, 24, topk=1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_cuda_kernel_layers_match_torch_layers(monkeypatch):
    """graph mode's decode step (planned GEMV tiles with K slices, add_rmsnorm, gate/up ending in SwiGLU, fused
    attention, all chained with PDL on Hopper), eagerly and replayed from a CUDA graph, against the torch path of
    the same stack in float32. bf16 model, widths the GEMV tiles divide (the fp32 fixture model never takes them)."""
    import dataclasses
    from hmtiny.model import build_random
    from hmtiny.tiny import tiny_model_config
    from kernels import gemv
    # a few tiles, whole-K, split and one-shot (K step = K slice), instead of timing every candidate
    monkeypatch.setattr(gemv, "_candidates", lambda K, partial: [(32, 128, 1, 4), (32, 64, 2, 4), (16, 128, 2, 4),
                                                                  (32, 128, 4, 4)])
    monkeypatch.setattr(gemv, "_best", {})
    tiny = tiny_model_config(384)
    wide = lambda st, n: dataclasses.replace(st, num_layers=n, embed_dim=256, intermediate_dim=512, num_heads=4,
                                             num_kv_heads=2)
    cfg = dataclasses.replace(tiny, backbone=wide(tiny.backbone, 3), decoder=wide(tiny.decoder, 2))
    model = build_random(cfg, device="cuda", dtype=torch.bfloat16, seed=1)
    ref_model = build_random(cfg, device="cuda", dtype=torch.float32, seed=1)
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    B, P, D = 4, 20, 256
    eng, ref = Engine(model, "graph"), Engine(ref_model, "eager")
    eng._plan_tiles(rows=B)
    assert all(layer.w13.tile is not None and layer.w13.tile_glu and layer.w2.tile_split
               for layer in eng.backbone.layers)
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(B, P + 1, D, device="cuda", generator=gen)
    start = torch.tensor([0, 3, 0, 7], device="cuda")  # left padding of two songs
    pos = (torch.arange(P + 1, device="cuda")[None] - start[:, None]).clamp(min=0)
    slot = torch.tensor([P], device="cuda")
    outs = []
    for e, dtype in ((ref, torch.float32), (eng, torch.bfloat16)):
        e.backbone.setup_cache(B, 32, dtype, "cuda")  # the engine keeps its own cache
        e.backbone(x[:, :P].to(dtype), pos[:, :P], torch.arange(P, device="cuda"), start, prompt=True)
        outs.append(e.backbone(x[:, P:].to(dtype), pos[:, P:], slot, start, prompt=e is ref))
    want, got = outs[0], outs[1].float()
    rel = lambda a: ((a - want).norm() / want.norm()).item()
    assert rel(got) < 3e-2, rel(got)
    step = lambda: eng.backbone(x[:, P:].to(torch.bfloat16), pos[:, P:], slot, start)
    graph, replayed = capture(step)  # the kernels compile before the capture
    graph.replay()
    torch.cuda.synchronize()
    assert rel(replayed.float()) < 3e-2 and torch.equal(replayed, outs[1])


def test_int8_fused_projections_equal_separate_ones(fixtures):
    """int8 q/k/v and gate/up rows concatenate (per-row scales): fused == layer by layer; LoRA stays unmerged."""
    from hmtiny.lora import inject_lora, lora_layers
    from hmtiny.quant import quantize_model
    model = quantize_model(load_heartmula(fixtures / "heartmula", dtype=torch.float32))
    prompts = some_prompts()[:2]
    fused = Engine(model)
    assert fused.backbone.layers[0].qkv.int8 is not None
    got = fused.generate(prompts, max_frames=12, topk=1)
    assert all(torch.equal(a, b) for a, b in zip(got, Engine(model, fuse=False).generate(prompts, 12, topk=1)))
    inject_lora(model, rank=2)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    with_lora = generate(model, prompts, max_frames=12, topk=1)
    assert not all(torch.equal(a, b) for a, b in zip(got, with_lora))


def test_last_timing_says_where_a_call_went(mula):
    """Host seconds of each part of a call (sample.py prints them); eager mode captures nothing."""
    model, cases = mula
    eng = Engine(model)
    eng.generate([fixture_prompt(cases, "generate_cfg")], 5, topk=1)
    t = eng.last_timing
    assert {"build_s", "plan_s", "capture_s", "loop_s", "total_s", "frames"} <= t.keys()
    assert t["frames"] == 5 and t["capture_s"] == 0.0 and 0 <= t["loop_s"] <= t["total_s"]
    timing = {}
    runtime.generate(model, [fixture_prompt(cases, "generate_cfg")], 3, 1.5, 1, 1.0, mode="eager", timing=timing)
    assert timing["frames"] == 3
    plain_timing = {}
    runtime.generate(model, [fixture_prompt(cases, "generate_cfg")], 3, 1.5, 1, 1.0, mode="plain",
                     timing=plain_timing)
    assert plain_timing == {}
