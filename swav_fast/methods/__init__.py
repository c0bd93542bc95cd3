"""Self-supervised methods: each a :class:`Method` registered by name (``train.method``).

Every module of this package other than :data:`_NOT_METHODS` is a method module (found by
:func:`method_modules`, no list kept by hand); they import torch and are imported on first use of one
of the names below, so that importing ``swav_fast.methods.configs`` (the typed settings) stays light.
"""
import importlib
import pkgutil

#: the package's modules that are not method modules (the framework, the torch-free settings, helpers)
_NOT_METHODS = frozenset({"base", "configs", "momentum"})


def method_modules() -> list[str]:
    """The package's method modules (each registers its method(s) when imported), by name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_METHODS)

_LAZY = {"Method": "base", "MethodInfo": "base", "METHODS": "base", "available_methods": "base",
         "build_method": "base", "register_method": "base", "validate_method": "base", "method_info": "base",
         "head_sizes": "base", "exclude_bias_and_norm": "base", "HealthReport": "base",
         "SwAVMethod": "swav", "SwAVObjective": "swav"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for m in method_modules():  # registers every method
        importlib.import_module(f"{__name__}.{m}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["HealthReport", "METHODS", "Method", "MethodInfo", "SwAVMethod", "SwAVObjective", "available_methods",
           "build_method", "exclude_bias_and_norm", "head_sizes", "method_info", "register_method",
           "validate_method"]
