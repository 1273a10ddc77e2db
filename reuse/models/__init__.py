"""Reference models built with layer reuse.

Importing this package registers LruNet with timm (see :mod:`reuse.models._timm`).
"""

from reuse.models._official import (
    RELEASE_SHA256,
    OfficialCheckpoint,
    convert_official,
    load_official,
    read_official,
)
from reuse.models._timm import checkpoint_filter_fn  # noqa: F401  (the import registers lrunet* with timm)
from reuse.models.lrunet import GlobalPool, LruBlock, LruNet, SelfConcat

__all__ = [
    "RELEASE_SHA256",
    "GlobalPool",
    "LruBlock",
    "LruNet",
    "OfficialCheckpoint",
    "SelfConcat",
    "convert_official",
    "load_official",
    "read_official",
]
