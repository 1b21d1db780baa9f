"""Tiers: byte storage behind one interface. Tiers never import each other; the store moves data."""
from .base import Tier, TierTraits
from .disk import DiskTier
from .host import HostTier

__all__ = ["Tier", "TierTraits", "HostTier", "DiskTier"]
