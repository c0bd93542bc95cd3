"""Backends own their options: `data.<backend>.*` sections, typed, checked per key, defaults in one place."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import MultiCropSpec, build_loader, register_backend
from pipelines.loader import BACKENDS, PILLoader, backend_options_class
from pipelines.options import BUILTIN_OPTIONS, DaliOptions, FfcvOptions, PilOptions, TorchOptions
from swav_fast.config import Config, describe_keys, from_dict, load_config, save_config
from swav_fast.errors import ConfigError
from swav_fast.run import loader_options
from tests.test_dali_copy import needs_dali

SPEC = MultiCropSpec(num_crops=[1], size_crops=[16], min_scale_crops=[0.3], max_scale_crops=[1.0])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for k in range(4):
            arr = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / f"c{c}" / f"{k}.jpg", quality=90)
    return tmp_path


def test_defaults_live_in_the_options_classes() -> None:
    assert TorchOptions() == TorchOptions(prefetch=2, decoder="auto", bad_samples="replace")
    assert DaliOptions() == DaliOptions(hw_decoder_load=0.9, threads=0, prefetch=2, bad_samples="replace")
    assert PilOptions().prefetch_factor == 4 and FfcvOptions() == FfcvOptions(os_cache=True, batches_ahead=2)
    # the config's sections are those defaults, and so are the backends' keyword defaults
    cfg = Config()
    for name, cls in BUILTIN_OPTIONS.items():
        assert getattr(cfg.data, name) == cls()
        assert backend_options_class(name) is cls
    from pipelines.dali_backend import DALILoader
    from pipelines.ffcv_backend import FFCVLoader
    from pipelines.torch_backend import TorchLoader

    for factory, cls in ((PILLoader, PilOptions), (TorchLoader, TorchOptions), (DALILoader, DaliOptions),
                         (FFCVLoader, FfcvOptions)):
        params = inspect.signature(factory).parameters
        for f in dataclasses.fields(cls):
            assert params[f.name].default == f.default, (factory.__name__, f.name)


def test_registry_records_each_backends_options() -> None:
    assert [BACKENDS.meta(n)["options"] for n in ("pil", "torch", "dali", "ffcv")] == \
        [PilOptions, TorchOptions, DaliOptions, FfcvOptions]


def test_sections_parse_and_save(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.dali.hw_decoder_load=0.5", "data.dali.threads=3", "data.torch.prefetch=4",
                             "data.torch.decoder=torchvision", "data.ffcv.os_cache=false",
                             "data.pil.prefetch_factor=2"])
    assert cfg.data.dali == DaliOptions(hw_decoder_load=0.5, threads=3, prefetch=2)
    assert cfg.data.torch == TorchOptions(prefetch=4, decoder="torchvision")
    assert not cfg.data.ffcv.os_cache and cfg.data.pil.prefetch_factor == 2
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.data == cfg.data


@pytest.mark.parametrize("override, message", [
    ("data.dali.hw_decoder_loads=1", "unknown config key(s) data.dali.hw_decoder_loads; valid keys under "
                                     "'data.dali': hw_decoder_load, threads, prefetch, bad_samples"),
    ("data.torch.fetch=1", "unknown config key(s) data.torch.fetch; valid keys under 'data.torch': prefetch, "
                           "decoder, bad_samples"),
    ("data.torch.bad_samples=drop", "data.torch.bad_samples: must be one of replace, skip, got 'drop'"),
    ("data.torch.prefetch=many", "data.torch.prefetch must be an integer, got 'many'"),
    ("data.ffcv.os_cache=2", "data.ffcv.os_cache must be true or false, got 2"),
    ("data.dali.hw_decoder_load=1.5", "data.dali.hw_decoder_load: must be in [0, 1], got 1.5"),
    ("data.dali.prefetch=0", "data.dali.prefetch: must be >= 1, got 0"),
    ("data.torch.decoder=nvjpeg", "data.torch.decoder: must be one of auto, torchcodec, torchvision, "
                                  "nvimgcodec, got 'nvjpeg'"),
    ("data.pil.prefetch_factor=0", "data.pil.prefetch_factor: must be >= 1, got 0"),
    ("data.dali=3", "data.dali must be a mapping, got 3"),
])
def test_per_key_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_validate_checks_values_set_after_parsing() -> None:
    cfg = Config()
    cfg.data.dali.threads = -1
    with pytest.raises(ConfigError, match=r"^data\.dali\.threads: must be >= 0, got -1$"):
        cfg.validate()


def test_old_keys_load_with_a_deprecation_message(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="swav_fast"):
        cfg = load_config(None, ["data.prefetch=3", "data.hw_decoder_load=0.25"])
    assert cfg.data.torch.prefetch == 3 and cfg.data.dali.prefetch == 3
    assert cfg.data.dali.hw_decoder_load == 0.25
    text = caplog.text
    assert ("deprecated config key in override 'data.prefetch=3': data.prefetch moved to data.torch.prefetch "
            "and data.dali.prefetch; the old name still loads") in text
    assert "data.hw_decoder_load moved to data.dali.hw_decoder_load" in text
    # sources apply in order (a later old key overrides an earlier new one, and the reverse)
    cfg = load_config(None, ["data.prefetch=3", "data.dali.prefetch=5"])
    assert cfg.data.dali.prefetch == 5 and cfg.data.torch.prefetch == 3
    cfg = load_config(None, ["data.dali.prefetch=5", "data.prefetch=3"])
    assert cfg.data.dali.prefetch == 3
    # within one source the new key wins; old keys are checked under their new names
    cfg = load_config(None, extra={"data": {"prefetch": 3, "dali": {"prefetch": 5}}})
    assert cfg.data.dali.prefetch == 5 and cfg.data.torch.prefetch == 3
    with pytest.raises(ConfigError, match=r"data\.dali\.hw_decoder_load: must be in \[0, 1\]"):
        load_config(None, ["data.hw_decoder_load=7"])


def test_old_keys_in_a_recipe(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recipe = tmp_path / "old.yaml"
    recipe.write_text("data:\n  loader: dali\n  hw_decoder_load: 0.4\n  prefetch: 6\n")
    with caplog.at_level(logging.WARNING, logger="swav_fast"):
        cfg = load_config(str(recipe), ["data.dali.prefetch=2"])
    assert cfg.data.loader_options() == DaliOptions(hw_decoder_load=0.4, threads=0, prefetch=2)
    assert f"recipe {recipe}" in caplog.text


def test_config_of_an_old_checkpoint_loads() -> None:
    old = Config().to_dict()
    for name in BUILTIN_OPTIONS:
        del old["data"][name]
    old["data"].update(prefetch=4, hw_decoder_load=0.7, loader="dali")
    cfg = from_dict(Config, old)
    assert cfg.data.loader_options() == DaliOptions(hw_decoder_load=0.7, threads=0, prefetch=4)


@pytest.mark.parametrize("backend, cls", sorted(BUILTIN_OPTIONS.items()))
def test_loader_options_is_the_chosen_backends(backend: str, cls: type) -> None:
    cfg = load_config(None, [f"data.loader={backend}"])
    opts = cfg.data.loader_options()
    assert type(opts) is cls and opts is getattr(cfg.data, backend)
    assert loader_options(cfg) is opts  # the trainer does no per-backend dispatch


def test_plugin_backend_options(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    BACKENDS.names()  # the built-in ones registered; the test's own are removed afterwards
    monkeypatch.setattr(BACKENDS, "_entries", dict(BACKENDS._entries))
    monkeypatch.setattr(BACKENDS, "_meta", dict(BACKENDS._meta))

    @dataclasses.dataclass
    class EchoOptions(PilOptions):
        pass

    register_backend("test-opts", PILLoader, options=EchoOptions)
    register_backend("test-none", lambda index, spec, batch_size, **kw: PILLoader(index, spec, batch_size))
    assert type(Config(data=dataclasses.replace(Config().data, loader="test-opts")).data.loader_options()) \
        is EchoOptions
    assert dataclasses.replace(Config().data, loader="test-none").loader_options() is None
    assert build_loader(folder, SPEC, 4, backend="test-opts", options=EchoOptions(prefetch_factor=2))
    with pytest.raises(ConfigError, match="takes no options object"):
        build_loader(folder, SPEC, 4, backend="test-none", options=PilOptions())


def test_build_loader_takes_the_backends_options(folder: Path) -> None:
    ld = build_loader(folder, SPEC, 4, backend="torch",
                      options=TorchOptions(prefetch=1, decoder="torchvision"))
    assert ld.prefetch == 1 and ld.decoder == "torchvision"
    ld.close()
    ld = build_loader(folder, SPEC, 4, backend="torch")  # defaults
    assert ld.prefetch == TorchOptions.prefetch and ld.decoder == "torchcodec"
    ld.close()
    ld = build_loader(folder, SPEC, 4, backend="torch", options=TorchOptions(prefetch=3),
                      decoder="torchvision")
    assert ld.prefetch == 3 and ld.decoder == "torchvision"  # a keyword overrides one field
    ld.close()
    pil = build_loader(folder, SPEC, 4, backend="pil", num_workers=1, options=PilOptions(prefetch_factor=2))
    assert pil._loader.prefetch_factor == 2
    with pytest.raises(ConfigError, match="loader backend 'torch' takes TorchOptions, got DaliOptions"):
        build_loader(folder, SPEC, 4, backend="torch", options=DaliOptions())
    with pytest.raises(ConfigError, match="unknown option.*hw_decoder_load.*valid: prefetch, decoder, "
                                          "bad_samples"):
        build_loader(folder, SPEC, 4, backend="torch", hw_decoder_load=0.5)


@needs_dali
def test_dali_gets_its_options(folder: Path) -> None:
    ld = build_loader(folder, SPEC, 4, backend="dali", num_workers=5,
                      options=DaliOptions(threads=2, prefetch=3, hw_decoder_load=0.5))
    assert (ld.opts.num_threads, ld.opts.prefetch, ld.opts.hw_decoder_load) == (2, 3, 0.5)
    ld.close()
    ld = build_loader(folder, SPEC, 4, backend="dali", num_workers=5)
    assert ld.opts.num_threads == 5  # threads=0: data.workers
    ld.close()


def test_list_keys_describes_the_sections() -> None:
    keys = {k.key: k for k in describe_keys()}
    hw = keys["data.dali.hw_decoder_load"]
    assert hw.default == 0.9 and "hardware" in hw.help
    assert keys["data.torch.decoder"].type == "str" and "torchcodec" in keys["data.torch.decoder"].help
    assert "data.prefetch" not in keys and "data.hw_decoder_load" not in keys


def test_options_import_light() -> None:
    code = ("import sys, pipelines.options; "
            "assert 'torch' not in sys.modules and 'swav_fast' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_packages_import_light_and_load_their_names_on_first_use() -> None:
    """``pipelines`` and ``pipelines.formats`` (``pipelines.formats.lazy.lazy_names``): importing them
    loads no torch; a lazy name imports its submodule once and is then a plain global; an unknown name
    is an AttributeError that names the package."""
    code = (
        "import sys, pipelines, pipelines.formats\n"
        "assert 'torch' not in sys.modules and 'pipelines.formats.sources' not in sys.modules\n"
        "f = pipelines.formats.open_source\n"
        "assert 'pipelines.formats.sources' in sys.modules and 'torch' not in sys.modules\n"
        "assert pipelines.formats.__dict__['open_source'] is f\n"
        "from pipelines.formats.sources import open_source\n"
        "assert f is open_source\n"
        "for pkg in (pipelines, pipelines.formats):\n"
        "    try:\n"
        "        pkg.no_such_name\n"
        "    except AttributeError as e:\n"
        "        assert repr(pkg.__name__) in str(e) and 'no_such_name' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no AttributeError')\n"
        "b = pipelines.build_loader\n"
        "assert 'torch' in sys.modules and pipelines.__dict__['build_loader'] is b\n"
        "assert set(pipelines.formats.__all__) <= set(dir(pipelines.formats)) | set(pipelines.formats._LAZY)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
