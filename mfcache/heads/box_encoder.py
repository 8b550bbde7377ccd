"""Box feature encoder F_b: transformer layers over the M x M RoI tokens of each box.

The paper's encodes the RoI tokens alone (``query_token=False``). With ``query_token`` (the
default, ``head.box_encoder_query``) the (projected) query is prepended as one extra token, so
the RoI tokens are encoded knowing which object they are for, and the query reads its box on
the way; both come out.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BoxEncoder(nn.Module):
    """``query [N, C]``, ``tokens [N, T, C]`` (RoI features + position) ->
    (query [N, C], tokens [N, T, C]) after ``depth`` post-norm transformer layers. Without
    ``query_token`` (or with query None) the layers see the tokens alone and the query comes
    out as it went in."""

    def __init__(self, *, dim: int, depth: int, heads: int = 4, query_token: bool = True):
        super().__init__()
        self.query_token = query_token
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
            for _ in range(depth)
        )

    def forward(self, query: Tensor | None, tokens: Tensor) -> tuple[Tensor | None, Tensor]:
        if query is None or not self.query_token:
            for layer in self.layers:
                tokens = layer(tokens)
            return query, tokens
        x = torch.cat([query[:, None], tokens], 1)
        for layer in self.layers:
            x = layer(x)
        return x[:, 0], x[:, 1:]
