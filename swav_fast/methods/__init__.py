"""Self-supervised methods: each a :class:`Method` registered by name (``train.method``)."""
from swav_fast.methods.base import Method, available_methods, build_method, register_method
from swav_fast.methods.swav import SwAVMethod, SwAVObjective

__all__ = ["Method", "SwAVMethod", "SwAVObjective", "available_methods", "build_method", "register_method"]
