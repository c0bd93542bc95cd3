from swav_fast.optim.lars import LARS, lars_param_groups
from swav_fast.optim.schedule import warmup_cosine_lr

__all__ = ["LARS", "lars_param_groups", "warmup_cosine_lr"]
