"""The synthetic shapes dataset (see `mfcache.data.shapes.render`, split up next)."""

from mfcache.data.shapes.render import *
from mfcache.data.shapes.render import __all__  # noqa: F401
