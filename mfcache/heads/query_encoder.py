"""Query encoders: object-to-object self-attention among the K queries of an image,
box-to-object cross-attention (a query attends to its own RoI tokens), and an FFN.

Self-attention needs every query of an image, so it runs on all K queries before the
selection of the queries that are trained/evaluated; box cross-attention needs RoI tokens,
which exist only for the selected queries, so it runs after. ``build_head`` therefore
rejects a ``self_attn`` listed after a ``box_cross_attn``. An FFN runs where it is listed.
"""

from __future__ import annotations

from torch import Tensor, nn


class SelfAttention(nn.Module):
    """``[B, K, C] -> [B, K, C]``: post-norm self-attention among one image's queries."""

    def __init__(self, *, dim: int, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: Tensor, tokens: Tensor | None = None) -> Tensor:
        return self.norm(q + self.attn(q, q, q, need_weights=False)[0])


class BoxCrossAttention(nn.Module):
    """``q [N, C]``, ``tokens [N, T, C]`` -> ``[N, C]``: each query attends to its RoI tokens."""

    def __init__(self, *, dim: int, heads: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: Tensor, tokens: Tensor | None = None) -> Tensor:
        return self.norm(q + self.attn(q[:, None], tokens, tokens, need_weights=False)[0][:, 0])


class FeedForward(nn.Module):
    """``[..., C] -> [..., C]``: post-norm two-layer MLP with a residual."""

    def __init__(self, *, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: Tensor, tokens: Tensor | None = None) -> Tensor:
        return self.norm(q + self.mlp(q))


def _feed_forward(*, dim: int) -> nn.Module:
    return FeedForward(dim=dim, hidden=2 * dim)


QUERY_LAYERS = {
    "self_attn": SelfAttention,
    "box_cross_attn": BoxCrossAttention,
    "ffn": _feed_forward,
}  # kind -> builder(dim=)


class QueryEncoder(nn.Module):
    """``kinds`` in order, split at the first ``box_cross_attn``: :meth:`image` runs the
    layers before it on ``[B, K, C]``, :meth:`box` the rest on ``[N, C]`` with RoI tokens."""

    def __init__(self, *, dim: int, kinds: tuple[str, ...]):
        super().__init__()
        split = kinds.index("box_cross_attn") if "box_cross_attn" in kinds else len(kinds)
        self.image_layers = nn.ModuleList(QUERY_LAYERS[k](dim=dim) for k in kinds[:split])
        self.box_layers = nn.ModuleList(QUERY_LAYERS[k](dim=dim) for k in kinds[split:])

    def image(self, q: Tensor) -> Tensor:
        for layer in self.image_layers:
            q = layer(q)
        return q

    def box(self, q: Tensor, tokens: Tensor | None) -> Tensor:
        for layer in self.box_layers:
            q = layer(q, tokens)
        return q
