"""Reference models built with layer reuse."""

from reuse.models.lrunet import LruBlock, LruNet, SelfConcat

__all__ = ["LruBlock", "LruNet", "SelfConcat"]
