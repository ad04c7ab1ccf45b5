"""Caption dropout and scheduled sampling (hmtiny/objective.py) on the tiny model: off = the plain step exactly,
p = 1 = the unconditional prompt / the model's own frames, the schedule, and reproducibility across resume."""
import math

import numpy as np
import pytest
import torch

import train
from hmtiny.checkpoint import load_heartmula
from hmtiny.data import load_dataset
from hmtiny.model import HeartMuLa
from hmtiny.objective import Objective, pick_ids, rollout_inputs, scheduled_sampling_p
from hmtiny.text import PromptTokenizer, find_text_assets
from hmtiny.train_config import BUILTIN_CONFIG, ConfigError, load_config
from tests.test_train import lora, make_run, metrics

TINY = BUILTIN_CONFIG.parent


@pytest.fixture(scope="module")
def tiny():
    model = load_heartmula(TINY / "model", dtype=torch.float32)
    tok = PromptTokenizer.load(*find_text_assets(TINY))
    data = load_dataset(TINY / "multidatabackend.json", tok, model.cfg, seed=0, log=lambda m: None)
    return model.train(), data.batch([0, 3, 5])


def config(**overrides):
    return load_config(None, {k: str(v) for k, v in overrides.items()}, warn=lambda m: None)


def loss_and_grads(model, batch, **inputs):
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    loss, _ = model.loss(batch["tokens"], batch["tokens_mask"], batch["audio_frame_mask"], batch["muq_idx"], **inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# ---------------------------------------------------------------- caption dropout
def test_caption_dropout_one_trains_on_the_unconditional_prompt(tiny):
    """p = 1: the backbone reads what CFG's unconditional branch reads at generation (every prompt row, the MuQ row
    included, is the unconditional embedding; audio rows unchanged), with the same targets."""
    model, batch = tiny
    inputs = Objective(config(caption_dropout_probability=1), torch.device("cpu"), seed=0).inputs(model, batch, 0)
    assert inputs["uncond"].all()
    got, _ = loss_and_grads(model, batch, **inputs)

    tokens, mask, frames = batch["tokens"], batch["tokens_mask"], batch["audio_frame_mask"]
    with torch.no_grad():
        audio = model.audio_embeddings(tokens[..., :8] + model.audio_offsets)
        rows = (audio * mask[..., :8, None]).sum(-2)
        prompt = mask[..., 8]  # text-only rows: tags, the MuQ row, lyrics
        rows[prompt] = model.unconditional_text_embedding.weight[0]
        h = model.backbone(rows)
        b, t = frames[:, 1:].nonzero(as_tuple=True)
        codes = tokens[b, t + 1, :8]
        want = torch.nn.functional.cross_entropy(model.codebook0_head(h[b, t]), codes[:, 0]) + \
            torch.nn.functional.cross_entropy(model.depth_logits(h[b, t], codes).flatten(0, 1), codes[:, 1:].flatten())
    assert torch.allclose(got, want, rtol=1e-5), (got, want)
    plain, _ = loss_and_grads(model, batch)
    assert not torch.allclose(plain, got)


def test_features_off_leave_the_step_unchanged(tiny):
    """p = 0 (or K = 0): no extra inputs at all, so the loss and gradients are the teacher-forced ones bit for bit;
    p = 0 with K = 2 likewise, and a pass with p = 0 returns the ground truth."""
    model, batch = tiny
    cpu = torch.device("cpu")
    for cfg in (config(), config(caption_dropout_probability=0),
                config(scheduled_sampling_max_step_offset=2, scheduled_sampling_probability=0),
                config(scheduled_sampling_max_step_offset=0, scheduled_sampling_probability=1),
                config(scheduled_sampling_max_step_offset=1, scheduled_sampling_probability=1,
                       scheduled_sampling_start_step=5)):
        assert Objective(cfg, cpu, seed=0).inputs(model, batch, step=0) == {}
    # train.py asks `enabled` whether to call inputs at all: on exactly when the log line names a feature
    for cfg, on in ((config(), False), (config(caption_dropout_probability=0.1), True),
                    (config(scheduled_sampling_max_step_offset=1), True)):
        objective = Objective(cfg, cpu, seed=0)
        assert objective.enabled is on and (objective.describe() is not None) is on
    ref_loss, ref_grads = loss_and_grads(model, batch)
    mixed = rollout_inputs(model, batch["tokens"], batch["tokens_mask"], batch["audio_frame_mask"],
                           batch["muq_idx"], passes=2, p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed, batch["tokens"])
    loss, grads = loss_and_grads(model, batch, input_tokens=mixed)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)


# ---------------------------------------------------------------- scheduled sampling
def greedy_frames_by_hand(model, h):
    """The model's greedy next frames from backbone states h [N,D]: the depth decoder re-run on the whole prefix
    at every codebook (no cache), codec ids only."""
    V = model.cfg.codebook_size
    c = model.codebook0_head(h)[:, :V].argmax(-1)
    codes, seq = [c], [h, model.embed_audio(0, c)]
    for i in range(1, 8):
        out = model.decoder(model.projection(torch.stack(seq, 1)))[:, -1]
        c = model.audio_logits(i, out)[:, :V].argmax(-1)
        codes.append(c)
        seq.append(model.embed_audio(i, c))
    return torch.stack(codes, -1)


def test_one_greedy_pass_with_p_one_feeds_every_frame_the_models_own_prediction(tiny):
    model, batch = tiny
    cfg = config(scheduled_sampling_max_step_offset=1, scheduled_sampling_probability=1,
                 scheduled_sampling_sampler="greedy")
    inputs = Objective(cfg, torch.device("cpu"), seed=0).inputs(model, batch, step=0)
    assert model.training  # the rollout ran in eval mode and gave the mode back

    tokens, frames = batch["tokens"], batch["audio_frame_mask"]
    want = tokens.clone()
    with torch.no_grad():
        model.eval()
        h = model.backbone(model.embed_rows(tokens, batch["tokens_mask"], batch["muq_idx"]))
        b, t = frames[:, 1:].nonzero(as_tuple=True)  # row t+1 is a frame: row t's state predicts it
        want[b, t + 1, :8] = greedy_frames_by_hand(model, h[b, t])
        model.train()
    got = inputs["input_tokens"]
    assert torch.equal(got, want)
    assert torch.equal(got[~frames], tokens[~frames])  # prompt and padding rows untouched
    assert (got[frames][:, :8] < model.cfg.codebook_size).all()
    assert not torch.equal(got, tokens)

    with torch.no_grad():
        loss, _ = model.loss(batch["tokens"], batch["tokens_mask"], frames, batch["muq_idx"], **inputs)
        plain, _ = model.loss(batch["tokens"], batch["tokens_mask"], frames, batch["muq_idx"])
    assert loss > plain  # the same targets, read after the model's own (worse than true) frames


def test_sampled_rollout_uses_codec_ids_and_replaces_about_p_of_the_frames(tiny):
    model, batch = tiny
    frames = batch["audio_frame_mask"]
    g = torch.Generator().manual_seed(1)
    mixed = rollout_inputs(model, batch["tokens"], batch["tokens_mask"], frames, batch["muq_idx"], passes=2,
                           p=0.5, sampler="topk", topk=8, temperature=1.0, generator=g)
    changed = (mixed != batch["tokens"]).any(-1)
    assert not changed[~frames].any()
    share = changed[frames].float().mean().item()
    assert 0.3 < share < 0.6, share  # p = 0.5, minus the frames where the model drew the true frame
    assert (mixed[frames][:, :8] < model.cfg.codebook_size).all()
    again = rollout_inputs(model, batch["tokens"], batch["tokens_mask"], frames, batch["muq_idx"], passes=2,
                           p=0.5, sampler="topk", topk=8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mixed, again)
    # a sampled id never leaves the top k nor the codec's ids
    logits = torch.randn(500, 69)
    ids = pick_ids(logits, 64, 3, 1.0, torch.Generator().manual_seed(0))
    top3 = logits[:, :64].topk(3).indices
    assert (ids[:, None] == top3).any(-1).all() and len(ids.unique()) > 1


def test_schedule_values():
    assert scheduled_sampling_p(0, 0.3) == 0.3
    assert scheduled_sampling_p(4, 0.3, start_step=5) == 0.0 and scheduled_sampling_p(5, 0.3, start_step=5) == 0.3
    lin = [scheduled_sampling_p(s, 0.9, 10, 100, 0.1, 0.5) for s in (9, 10, 35, 60, 110, 500)]
    assert lin == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.5, 0.5])
    cos = [scheduled_sampling_p(s, 0.9, 0, 100, 0.0, 0.5, "cosine") for s in (0, 25, 50, 100)]
    assert cos == pytest.approx([0.0, 0.25 * (1 - math.cos(math.pi / 4)), 0.25, 0.5])
    obj = Objective(config(scheduled_sampling_max_step_offset=1, scheduled_sampling_ramp_steps=10,
                           scheduled_sampling_prob_end=1.0), torch.device("cpu"), seed=0)
    assert [obj.p(s) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])


def test_config_checks_and_the_diffusion_solver_warning():
    warnings = []
    cfg = load_config(None, {"scheduled_sampling_sampler": "unipc", "scheduled_sampling_order": "2"},
                      warn=warnings.append)
    assert cfg.scheduled_sampling_sampler == "topk"
    assert any("'unipc' is a diffusion solver" in w and "top-k" in w for w in warnings)
    assert any("scheduled_sampling_order" in w for w in warnings)  # meaningless keys keep their warning
    assert not any("caption_dropout_probability" in w for w in warnings)
    for key, value in (("caption_dropout_probability", 1.5), ("scheduled_sampling_probability", -0.1),
                       ("scheduled_sampling_max_step_offset", -1), ("scheduled_sampling_ramp_shape", "square"),
                       ("scheduled_sampling_sampler", "beam")):
        with pytest.raises(ConfigError, match=key):
            config(**{key: value})


def test_training_with_both_features_resumes_exactly(tmp_path, monkeypatch):
    """4 steps straight == 2 steps, a crash, then a resume: the caption-dropout and rollout draws carry over. The
    loss pass receives them (and a track's reference embedding, track_05.muq.npy)."""
    common = dict(caption_dropout_probability=0.5, scheduled_sampling_max_step_offset=2,
                  scheduled_sampling_probability=0.5, scheduled_sampling_sampler="topk", validation_topk=4,
                  train_batch_size=2, max_train_steps=4, checkpointing_steps=2, tracks=("03", "04", "05", "08"))
    seen = []
    real_loss = HeartMuLa.loss

    def spy(self, tokens, *args, **kwargs):
        seen.append((kwargs["uncond"].tolist(), bool((kwargs["input_tokens"] != tokens).any()),
                     kwargs["muq_embed"] is not None))
        return real_loss(self, tokens, *args, **kwargs)

    monkeypatch.setattr(HeartMuLa, "loss", spy)
    straight = make_run(tmp_path / "a", **common)
    np.save(tmp_path / "a/data/track_05.muq.npy", np.linspace(-1, 1, 8, dtype=np.float32))
    assert train.main([str(straight)]) == 0
    assert len(seen) == 4 and all(replaced for _, replaced, _ in seen)  # the loss read the rollout's frames
    drops = [d for u, _, _ in seen for d in u]
    assert True in drops and False in drops  # per-sample caption dropout
    assert sum(ref for _, _, ref in seen) == 2  # the batches holding track_05, one per epoch

    resumed = make_run(tmp_path / "b", **common)
    np.save(tmp_path / "b/data/track_05.muq.npy", np.linspace(-1, 1, 8, dtype=np.float32))
    real_save = train.save_checkpoint

    def crash(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", crash)
    assert train.main([str(resumed)]) == 1  # interrupted after checkpoint-2: an error exit, the checkpoint kept
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert train.main([str(resumed)]) == 0
    a, b = (lora(tmp_path / f"{r}/out/pytorch_lora_weights.safetensors") for r in "ab")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    la, lb = metrics(tmp_path / "a/out"), metrics(tmp_path / "b/out")
    assert [m["loss"] for m in la] == pytest.approx([m["loss"] for m in lb], rel=1e-6)
    assert seen[6:] == seen[2:4]  # after the resume: the draws of the uninterrupted run's steps 3-4
