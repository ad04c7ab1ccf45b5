"""Residual-VQ index lookup: codes [B, Q, T] -> project_out(sum of the Q codebook vectors) [B, T, dim].

Only the decode direction of the reference's ResidualVQ (`get_output_from_indices`). Its training state
(EMA statistics, project_in) is not allocated. Attribute names follow the checkpoint's keys
(`layers.N._codebook.embed`, `project_out`), so the official weights load with no renaming.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embed = nn.Parameter(torch.empty(1, size, dim))  # [heads=1, entries, codebook_dim]


class ResidualLookup(nn.Module):
    def __init__(self, num_quantizers: int, codebook_size: int, codebook_dim: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"_codebook": Codebook(codebook_size, codebook_dim)})
                                    for _ in range(num_quantizers))
        self.project_out = nn.Linear(codebook_dim, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, T] int64 (codebook-major, as detokenize holds them) -> [B, T, dim]."""
        vectors = torch.stack([layer["_codebook"].embed[0][codes[:, q]] for q, layer in enumerate(self.layers)])
        return self.project_out(vectors.sum(0))  # plain sum over quantizers, then the projection
