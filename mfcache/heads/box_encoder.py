"""Box feature encoder F_b: transformer layers over the M x M RoI tokens of each box.

The (projected) query is prepended as one extra token, so the RoI tokens are encoded
knowing which object they are for, and the query reads its box on the way; both come out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BoxEncoder(nn.Module):
    """``query [N, C]``, ``tokens [N, T, C]`` (RoI features + position) ->
    (query [N, C], tokens [N, T, C]) (query None: tokens only) after ``depth`` post-norm transformer layers."""

    def __init__(self, *, dim: int, depth: int, heads: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
            for _ in range(depth)
        )

    def forward(self, query: Tensor | None, tokens: Tensor) -> tuple[Tensor | None, Tensor]:
        x = tokens if query is None else torch.cat([query[:, None], tokens], 1)
        for layer in self.layers:
            x = layer(x)
        return (None, x) if query is None else (x[:, 0], x[:, 1:])
