"""Pure loss functions (each with its formula in the docstring)."""
from swav_fast.losses.sinkhorn import sinkhorn_knopp
from swav_fast.losses.swav import swapped_prediction_loss

__all__ = ["sinkhorn_knopp", "swapped_prediction_loss"]
