"""Generation, defined plainly: the loop sample.py and validation run on CPU and MPS, and the definition the fast
engine (hmtiny/engine.py) is tested against, token for token.

A prompt is rows of 9 columns (hmtiny.text); every frame adds one row whose columns 0..7 hold its 8 codebook ids.
Per frame: the backbone reads the newest row(s) into its KV cache and its last state h gives codebook 0; the depth
decoder then starts afresh on [h, codebook 0's embedding] and reads one codebook per step, each step giving the
next codebook. With guidance (cfg_scale != 1) every row also runs with the unconditional embedding in place of the
text and MuQ rows, and both copies take the id drawn from the mixed logits. A song ends at the first frame with EOS
in any codebook, and that frame is dropped. Only ids the codec can decode (and EOS) are ever drawn.
"""
from __future__ import annotations

import torch

from .runtime import check_sampling

Prompt = tuple  # (tokens [P,9] long, tokens_mask [P,9] bool, muq_idx int[, reference MuQ embedding [muq_dim]])


def allowed_ids(cfg, stop_on_eos: bool = True) -> torch.Tensor:
    """[audio_vocab_size] float32, added to the logits: 0 for the codec's ids (and EOS if songs may end), else -inf."""
    bias = torch.full((cfg.audio_vocab_size,), float("-inf"))
    bias[: cfg.codebook_size] = 0.0
    if stop_on_eos:
        bias[cfg.gen.audio_eos_id] = 0.0
    return bias


def sample_ids(logits, bias, cfg_scale: float, temperature: float, topk: int, noise) -> torch.Tensor:
    """One id per song from logits [B, V] ([2B, V] under guidance, conditional rows first). topk 1: the argmax.
    Else temperature, the top k kept (0: all), softmax, then the exponential race: argmax(p / noise) with noise [B, V]
    drawn from Exp(1) is a draw from p, whose randomness can be drawn ahead (a whole frame's at once)."""
    x = logits.float()
    if cfg_scale != 1.0:
        cond, uncond = x.chunk(2)
        x = uncond + (cond - uncond) * cfg_scale  # the official formula, in its order
    x = x + bias
    if topk == 1:
        return x.argmax(-1)
    x = x / temperature
    if 0 < topk < x.shape[-1]:
        kth = torch.topk(x, topk, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th value stay
    return (torch.softmax(x, dim=-1) / noise).argmax(-1)


@torch.no_grad()
def generate(model, prompts: list[Prompt], max_frames: int, cfg_scale: float = 1.5, topk: int = 50,
             temperature: float = 1.0, generator: torch.Generator | None = None, stop_on_eos: bool = True,
             progress=None) -> list[torch.Tensor]:
    """One LongTensor [n <= max_frames, 8] (CPU) per prompt, the prompts one after another. topk 1 = greedy, 0 = no
    top-k; cfg_scale 1 = no guidance; stop_on_eos False: EOS is never drawn, every song gets max_frames frames.
    Draws come from `generator` (else torch's default one): Exp(1) noise for the 8 codebooks at the start of every
    frame, as wide as the vocabulary rounded up to 64 (hmtiny.engine's padded heads), so that both draw alike."""
    check_sampling(topk, temperature, cfg_scale)
    if not prompts or max_frames < 1:
        raise ValueError(f"need a prompt and max_frames >= 1, got {len(prompts)} prompt(s), max_frames {max_frames}")
    return [_song(model, p, max_frames, cfg_scale, topk, temperature, generator, stop_on_eos, progress)
            for p in prompts]


def _song(model, prompt, max_frames, cfg_scale, topk, temperature, generator, stop_on_eos, progress):
    cfg, dev = model.cfg, model.codebook0_head.weight.device
    K, V, B = cfg.audio_num_codebooks, cfg.audio_vocab_size, 1 if cfg_scale == 1.0 else 2
    width = -(-V // 64) * 64  # of the noise: see generate
    tokens, mask, muq_idx = (torch.as_tensor(t).to(dev) for t in prompt[:3])
    ref = prompt[3] if len(prompt) > 3 else None
    ref = None if ref is None else torch.as_tensor(ref, dtype=torch.float32).reshape(1, -1).expand(B, -1).to(dev)
    uncond = torch.arange(B, device=dev) == 1  # row 1: the unconditional copy
    bias = allowed_ids(cfg, stop_on_eos).to(dev)
    P = tokens.shape[0]
    model.setup_caches(B, P + max_frames)  # positions 0..P-1 the prompt, then one per frame fed back
    x = model.embed_rows(tokens.expand(B, -1, -1), mask.expand(B, -1, -1), muq_idx.expand(B), uncond, ref)
    pos, frames = torch.arange(P, device=dev), []
    try:
        for t in range(max_frames):
            h = model.backbone(x, pos)[:, -1]
            noise = None if topk == 1 else torch.empty(K, 1, width, device=dev).exponential_(generator=generator)
            draw = lambda i, logits: sample_ids(logits, bias, cfg_scale, temperature, topk,
                                                None if noise is None else noise[i, :, :V])
            codes = [draw(0, model.codebook0_head(h))]
            seq = torch.stack([h, model.embed_audio(0, codes[0].repeat(B))], 1)
            for i in range(1, K):  # depth decoder: positions 0 and 1 first, then position i for codebook i-1
                dpos = torch.arange(2, device=dev) if i == 1 else torch.tensor([i], device=dev)
                codes.append(draw(i, model.audio_logits(i, model.decoder(model.projection(seq), dpos)[:, -1])))
                seq = model.embed_audio(i, codes[i].repeat(B))[:, None]
            frame = torch.stack(codes, -1)  # [1, K]
            if stop_on_eos and bool((frame == cfg.gen.audio_eos_id).any()):
                break
            frames.append(frame)
            if progress:
                progress(t + 1, max_frames)
            x = model.audio_embeddings(frame.repeat(B, 1) + model.audio_offsets).sum(1, keepdim=True)
            pos = pos[-1:] + 1
    finally:
        model.drop_caches()
    return torch.cat(frames).cpu() if frames else torch.zeros(0, K, dtype=torch.long)
