"""The stages, in the order data flows: ``extract`` (detector -> cache), ``train`` (cache ->
run folder; ``sampling`` decides each step's batch), ``evaluate`` (run + cache -> COCO AP,
through ``postprocess``), ``predict`` (detector + run -> COCO results for new images),
``sweep`` (many heads), ``demo`` (all of it on generated data) and ``visualize``. ``runs``
reads and writes run folders.

Nothing is imported here: ``import mfcache.stages.train`` loads no detector code.
"""
