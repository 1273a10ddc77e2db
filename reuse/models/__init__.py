"""Reference models built with layer reuse.

Importing this package registers LruNet with timm (see :mod:`reuse.models._timm`).
"""

from reuse.models import _timm  # noqa: F401  (registers lrunet* with timm)
from reuse.models._official import OfficialCheckpoint, convert_official, load_official, read_official
from reuse.models.lrunet import LruBlock, LruNet, SelfConcat

__all__ = [
    "LruBlock",
    "LruNet",
    "OfficialCheckpoint",
    "SelfConcat",
    "convert_official",
    "load_official",
    "read_official",
]
