"""What the training step feeds the model besides the clean batch: caption dropout and scheduled sampling.

- Caption dropout (`caption_dropout_probability`): per sample, the whole text condition (every text column and
  the MuQ row) becomes the unconditional embedding, exactly as the unconditional branch of classifier-free
  guidance sees it at generation, with the same targets. It trains the branch that CFG subtracts.
- Scheduled sampling, parallel form (`scheduled_sampling_*`): K passes without gradient over the batch, each fed
  the mixed inputs of the one before; after each pass every audio frame row is, with probability p, replaced by
  the frame the model predicts for it (codebook 0 from the backbone head, codebooks 1..7 from the depth decoder
  run autoregressively, all frames of the batch at once). The loss pass then reads those inputs; its targets stay
  the ground truth. Prompt rows are never replaced and the draws never produce an id the codec cannot decode.

Each feature draws from its own generator on the training device (seeded from the run's seed, saved in
checkpoints), so turning one on changes nothing else and a resumed run draws what an uninterrupted one would.
When both are off `inputs()` returns {} and the step is unchanged: no extra kernel, no host sync.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import HeartMuLa


def scheduled_sampling_p(step: int, probability: float, start_step: int = 0, ramp_steps: int = 0,
                         prob_start: float = 0.0, prob_end: float = 0.5, shape: str = "linear") -> float:
    """p at optimizer step `step` (0-based): 0 before start_step; then `probability` when there is no ramp, else
    prob_start -> prob_end over ramp_steps steps (linear, or cosine: slow at both ends), prob_end after it."""
    if step < start_step:
        return 0.0
    if ramp_steps <= 0:
        return probability
    progress = min(1.0, (step - start_step) / ramp_steps)
    if shape == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return prob_start + (prob_end - prob_start) * progress


def pick_ids(logits: torch.Tensor, allowed: int, topk: int, temperature: float,
             generator: torch.Generator | None) -> torch.Tensor:
    """One id per row among the first `allowed` (codec ids only): greedy when generator is None or topk == 1,
    else top-k + temperature sampling (an exponential race: no host sync)."""
    logits = logits[..., :allowed].float()
    if generator is None or topk == 1:
        return logits.argmax(-1)
    if 0 < topk < allowed:
        logits, idx = logits.topk(topk, dim=-1)
    else:
        idx = None
    probs = F.softmax(logits / temperature, dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    choice = (probs / race).argmax(-1, keepdim=True)
    return (idx.gather(-1, choice) if idx is not None else choice).squeeze(-1)


@torch.no_grad()
def predict_frames(model: HeartMuLa, h: torch.Tensor, pick) -> torch.Tensor:
    """The next frame [N,K] the model predicts from backbone states h [N,D]: codebook 0 from codebook0_head, then
    codebooks 1..K-1 from the depth decoder, one position at a time over a KV cache of K slots (as generation
    runs it, without CFG), every row in parallel."""
    K, dec = model.cfg.audio_num_codebooks, model.decoder
    c = pick(model.codebook0_head(h))
    codes = [c]
    x = model.projection(torch.stack([h, model.embed_audio(0, c).to(h.dtype)], 1))
    block = dec.layers[0]
    cache_dtype = block.attn.k_proj(block.sa_norm(x[:1, :1])).dtype  # what the projections write, under autocast
    dec.setup_cache(h.shape[0], K, cache_dtype, h.device)
    try:
        pos = torch.arange(2, device=h.device)
        for i in range(1, K):
            out = dec(x, pos)
            c = pick(model.audio_logits(i, out[:, -1]))
            codes.append(c)
            x = model.projection(model.embed_audio(i, c).to(h.dtype)[:, None])
            pos = pos[-1:] + 1
    finally:
        dec.drop_cache()
    return torch.stack(codes, -1)


@torch.no_grad()
def rollout_inputs(model: HeartMuLa, tokens, tokens_mask, audio_frame_mask, muq_idx=None, uncond=None,
                   muq_embed=None, passes: int = 1, p: float = 1.0, sampler: str = "greedy", topk: int = 50,
                   temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scheduled sampling's backbone input: `passes` passes, each reading the previous pass's mix; in each, an
    audio frame row is replaced by the model's prediction for it with probability p. Runs in eval mode (no LoRA
    dropout, no draw from the global RNG); restores the mode. One host sync: finding the frame rows."""
    K = model.cfg.audio_num_codebooks
    b_idx, t_idx = audio_frame_mask[:, 1:].nonzero(as_tuple=True)  # row t+1 is a frame, predicted from row t
    draw = None if sampler == "greedy" else generator
    pick = lambda logits: pick_ids(logits, model.cfg.codebook_size, topk, temperature, draw)
    was_training = model.training
    model.eval()
    try:
        mixed = tokens
        for _ in range(passes):
            h = model.backbone(model.embed_rows(mixed, tokens_mask, muq_idx, uncond, muq_embed))
            frames = predict_frames(model, h[b_idx, t_idx], pick)
            replace = torch.rand(b_idx.shape, device=tokens.device, generator=generator) < p
            truth = tokens[b_idx, t_idx + 1, :K]
            mixed = tokens.clone()
            mixed[b_idx, t_idx + 1, :K] = torch.where(replace[:, None], frames, truth)
    finally:
        model.train(was_training)
    return mixed


class Objective:
    """Per-step extra inputs of model.loss from the config, with their generators (saved in checkpoints)."""

    def __init__(self, cfg, device: torch.device, seed: int):
        self.cfg, self.device = cfg, device
        self.caption_p = cfg.caption_dropout_probability
        self.passes = cfg.scheduled_sampling_max_step_offset
        self.generators: dict[str, torch.Generator] = {}
        # distinct fixed offsets: the streams differ from each other and from the run's global RNG
        wanted = (("caption_dropout", 1, self.caption_p > 0), ("scheduled_sampling", 2, self.passes > 0))
        for name, offset, on in wanted:
            if on:
                self.generators[name] = torch.Generator(device).manual_seed((seed * 1_000_003 + offset) % 2**63)

    @property
    def enabled(self) -> bool:
        """Caption dropout or scheduled sampling is on: the step needs objective.inputs."""
        return self.caption_p > 0 or self.passes > 0

    def describe(self) -> str | None:
        """One line for the training log, None when both features are off."""
        c, parts = self.cfg, []
        if self.caption_p > 0:
            parts.append(f"caption dropout {self.caption_p:g}")
        if self.passes > 0:
            p = (f"p {c.scheduled_sampling_prob_start:g}->{c.scheduled_sampling_prob_end:g} over "
                 f"{c.scheduled_sampling_ramp_steps} steps ({c.scheduled_sampling_ramp_shape})"
                 if c.scheduled_sampling_ramp_steps > 0 else f"p {c.scheduled_sampling_probability:g}")
            start = f" from step {c.scheduled_sampling_start_step}" if c.scheduled_sampling_start_step else ""
            parts.append(f"scheduled sampling: {self.passes} rollout pass(es), {p}{start}, {self.sampler} frames")
        return "; ".join(parts) or None

    @property
    def sampler(self) -> str:
        return self.cfg.scheduled_sampling_sampler  # "topk" or "greedy" (train_config maps solver names to topk)

    def p(self, step: int) -> float:
        c = self.cfg
        return scheduled_sampling_p(step, c.scheduled_sampling_probability, c.scheduled_sampling_start_step,
                                    c.scheduled_sampling_ramp_steps, c.scheduled_sampling_prob_start,
                                    c.scheduled_sampling_prob_end, c.scheduled_sampling_ramp_shape)

    def inputs(self, model: HeartMuLa, batch: dict, step: int) -> dict:
        """Keyword arguments for model.loss at optimizer step `step` ({} when both features are off)."""
        out = {}
        if self.caption_p > 0:
            B = batch["tokens"].shape[0]
            draws = torch.rand(B, device=batch["tokens"].device, generator=self.generators["caption_dropout"])
            out["uncond"] = draws < self.caption_p
        p = self.p(step) if self.passes > 0 else 0.0
        if p > 0:
            out["input_tokens"] = rollout_inputs(
                model, batch["tokens"], batch["tokens_mask"], batch["audio_frame_mask"], batch.get("muq_idx"),
                out.get("uncond"), batch.get("muq_embed"), passes=self.passes, p=p, sampler=self.sampler,
                topk=self.cfg.validation_topk, temperature=self.cfg.validation_temperature,
                generator=self.generators["scheduled_sampling"])
        return out
