"""Pure loss functions (each with its formula in the docstring)."""
from swav_fast.losses.barlow import barlow_twins_loss, batch_standardize, cross_correlation
from swav_fast.losses.contrastive import full_precision, info_nce_loss, nce_loss, nt_xent_loss
from swav_fast.losses.dino import dino_loss, teacher_probabilities, updated_center
from swav_fast.losses.regression import negative_cosine_loss, normalized_mse_loss
from swav_fast.losses.sinkhorn import sinkhorn_knopp
from swav_fast.losses.swav import swapped_prediction_loss

__all__ = ["barlow_twins_loss", "batch_standardize", "cross_correlation", "dino_loss", "full_precision",
           "info_nce_loss", "nce_loss", "negative_cosine_loss", "normalized_mse_loss", "nt_xent_loss",
           "sinkhorn_knopp", "swapped_prediction_loss", "teacher_probabilities", "updated_center"]
