"""Self-supervised methods: each a :class:`Method` registered by name (``train.method``)."""
from swav_fast.methods.base import Method, available_methods, build_method, register_method, validate_method
from swav_fast.methods.swav import SwAVMethod, SwAVObjective
from swav_fast.methods import barlow, byol, dino, instdisc, moco, simclr, simsiam  # noqa: F401,E402 (register)

__all__ = ["Method", "SwAVMethod", "SwAVObjective", "available_methods", "build_method", "register_method",
           "validate_method"]
