"""Self-supervised methods: each a :class:`Method` registered by name (``train.method``).

The method modules (torch) are imported on first use of one of the names below, so that importing
``swav_fast.methods.configs`` (the typed settings) stays light.
"""
import importlib

#: the modules that register a method (imported, with ``base``, on first access to a name below)
_METHOD_MODULES = ("swav", "barlow", "byol", "dino", "instdisc", "moco", "simclr", "simsiam")
_LAZY = {"Method": "base", "MethodInfo": "base", "METHODS": "base", "available_methods": "base",
         "build_method": "base", "register_method": "base", "validate_method": "base", "method_info": "base",
         "head_sizes": "base", "exclude_bias_and_norm": "base", "HealthReport": "base",
         "SwAVMethod": "swav", "SwAVObjective": "swav"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for m in _METHOD_MODULES:  # registers every method
        importlib.import_module(f"{__name__}.{m}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["HealthReport", "METHODS", "Method", "MethodInfo", "SwAVMethod", "SwAVObjective", "available_methods",
           "build_method", "exclude_bias_and_norm", "head_sizes", "method_info", "register_method",
           "validate_method"]
