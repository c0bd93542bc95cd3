"""Typed config: recipes load, overrides apply, bad keys/types/combinations are rejected clearly."""
import pytest

from swav_fast.config import Config, available_recipes, load_config, parse_override, resolve_batch, valid_keys
from swav_fast.errors import ConfigError
from swav_fast.run import check_config


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_loads_and_validates(name):
    cfg = load_config(name)
    world = 64 if "bs4096" in name else 4 if "bs256" in name else 1
    cfg.validate(world_size=world)
    cfg = resolve_batch(cfg, world)
    assert cfg.optim.batch_size * world in ({4096, 256} if world > 1 else {cfg.optim.batch_size})


def test_paper_recipes():
    big = load_config("swav_800ep_bs4096")
    big_swav, small_swav = big.methods.swav, load_config("swav_400ep_bs256").methods.swav
    assert (big.optim.base_lr, big.optim.final_lr, big.optim.epochs, big_swav.queue_length) == (4.8, 0.0048, 800, 0)
    assert big.methods.swav.freeze_prototypes_niters == 313 and big.data.crops.size_crops == [224, 96]
    small = load_config("swav_400ep_bs256")
    assert (small.optim.base_lr, small.optim.final_lr, small.optim.warmup_epochs) == (0.6, 0.0006, 0)
    assert (small_swav.queue_length, small_swav.epoch_queue_starts, small_swav.freeze_prototypes_niters) == \
        (3840, 15, 5005)
    assert load_config("swav_100ep_bs4096").optim.epochs == 100


def test_overrides_and_types():
    cfg = load_config("quick", ["optim.base_lr=0.25", "methods.swav.crops_for_assign=[0]",
                                "data.crops.flip_p=0"])
    assert cfg.optim.base_lr == 0.25 and cfg.methods.swav.crops_for_assign == [0]
    assert cfg.data.crops.flip_p == 0.0
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.base_lrr=1"])
    msg = str(e.value)
    assert "optim.base_lrr" in msg and "base_lr" in msg and "final_lr" in msg
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["bogus.x=1"])


@pytest.mark.parametrize("override,needle", [
    ("optim.epochs=ten", "optim.epochs must be an integer"),
    ("train.progress=3", "train.progress must be true or false"),
    ("methods.swav.crops_for_assign=5", "methods.swav.crops_for_assign must be a list"),
])
def test_wrong_types(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="crops_for_assign"):  # the method's own check: at composition
        check_config(load_config(None, ["methods.swav.crops_for_assign=[0, 8]"]))
    with pytest.raises(ConfigError, match="multiple of the global batch"):
        load_config(None, ["methods.swav.queue_length=100", "optim.batch_size=64"]).validate()
    load_config(None, ["methods.swav.queue_length=3840", "optim.batch_size=64"]).validate(world_size=4)
    with pytest.raises(ConfigError, match="try 3840"):
        load_config(None, ["methods.swav.queue_length=3900", "optim.batch_size=64"]).validate(world_size=4)


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert "optim.base_lr" in keys and "data.crops.size_crops" in keys and "methods.swav.epsilon" in keys
    assert Config().methods.swav.epsilon == 0.05


def test_exponent_without_a_dot_is_a_number():
    """YAML 1.1 reads ``5e-4`` as text; a float field takes it as the number, anything else is refused."""
    cfg = load_config("quick", ["optim.weight_decay=5e-4", "optim.base_lr=1E1", "optim.final_lr=-2e-3"])
    assert (cfg.optim.weight_decay, cfg.optim.base_lr, cfg.optim.final_lr) == (5e-4, 10.0, -2e-3)
    with pytest.raises(ConfigError, match="optim.weight_decay must be a number, got '5e-4x'"):
        load_config("quick", ["optim.weight_decay=5e-4x"])
    with pytest.raises(ConfigError, match="optim.epochs must be an integer"):
        load_config("quick", ["optim.epochs=1e2"])  # ints stay strict
