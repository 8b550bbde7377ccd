"""The one interface every mask head implements."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class HeadOutput:
    """mask_logits [N, 1, M, M] inside each selected query's box (row-major over (b, k));
    quality [N] a predicted mask quality in (0, 1) (the learned mask-IoU of ``scoring =
    "mask_iou"``, trained against the IoU of the binarised mask), or None if the head has no
    scoring branch."""

    mask_logits: Tensor
    quality: Tensor | None = None

    def float(self) -> HeadOutput:
        """The outputs in float32 (after a mixed-precision forward: losses and scores in float32)."""
        return HeadOutput(self.mask_logits.float(), None if self.quality is None else self.quality.float())


class MaskHead(nn.Module):
    """Maps one batch of cached detector outputs to per-query mask logits.

    ``forward(queries [B, K, D], boxes [B, K, 4] xyxy input px, levels: list of
    [B, D, H_l, W_l] (the levels in ``self.levels``, in that order), c1 [B, C, H/4, W/4] or
    None, select [B, K] bool or None = all, *, level_hw [B, L, 2] and c1_hw [B, 2] long: the
    valid (h, w) of each image's maps, the rest being batch padding; None = all valid)
    -> HeadOutput``. An image's outputs depend on its own valid maps only, never on its batch
    mates. Matching, losses and post-processing live outside the heads.
    """

    levels: tuple[int, ...] = (0,)
    uses_c1: bool = False
    roi_size: int = 32
