"""Tensor operations the heads and stages share: mask paste / RLE / packing (``masks``), the mask losses (``losses``), multi-scale deformable attention (``deformable_attention``)."""
