from swav_fast.models.heads import ProjectionHead, Prototypes
from swav_fast.models.swav import MultiCropNet, SwAVModel, resolution_groups
from swav_fast.models.trunks import available_trunks, build_trunk, register_trunk

__all__ = ["ProjectionHead", "Prototypes", "MultiCropNet", "SwAVModel", "resolution_groups",
           "available_trunks", "build_trunk", "register_trunk"]
