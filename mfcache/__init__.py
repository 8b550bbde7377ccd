"""mfcache: Mask Frozen-DETR with a feature cache.

Stage 1 (`extract`) runs a frozen DETR-family detector once over a COCO dataset and
caches its outputs in Zarr; stage 2 (`train`) trains light mask heads from that cache;
stage 3 (`eval`) reports COCO mask AP.
"""

__version__ = "0.2.0"
