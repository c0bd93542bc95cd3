"""pipelines.registry, pipelines.atomic and pipelines.errors: the shared bottom layer."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.atomic import atomic_write, atomic_write_json
from pipelines.errors import ConfigError
from pipelines.registry import Registry


def test_registry_decorator_call_meta_and_unknown():
    loaded = []
    reg: Registry = Registry("widget", loader=lambda: (loaded.append(1), reg.register("late", 3)))
    reg.register("a", 1, size=2)

    @reg.register("b", size=5)
    def b():
        return 2

    assert reg.names() == ["a", "b", "late"] and loaded == [1]
    assert reg.get("b") is b and reg.meta("a") == {"size": 2} and "late" in reg and len(reg) == 3
    reg.names()
    assert loaded == [1]  # the loader runs once
    with pytest.raises(ConfigError, match=r"unknown widget 'c'; valid: a, b, late"):
        reg.get("c")


def test_atomic_write_replaces_and_keeps_old_on_failure(tmp_path: Path):
    p = tmp_path / "sub" / "f.json"
    atomic_write_json(p, {"x": 1})
    assert p.read_text() == '{\n  "x": 1\n}\n' and oct(p.stat().st_mode & 0o777) == "0o644"

    def fail(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(p, fail)
    assert p.read_text() == '{\n  "x": 1\n}\n'
    assert [q.name for q in p.parent.iterdir()] == ["f.json"]  # no temp file left
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"


def test_pipelines_errors_are_swav_fast_errors():
    from swav_fast import errors

    assert errors.ConfigError is ConfigError and issubclass(errors.DataError, errors.SwavFastError)


def test_pipelines_foundations_import_without_swav_fast(tmp_path: Path):
    """Only ``pipelines`` on the path (a copy of it): the bottom layer imports on its own."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "pipelines").symlink_to(root / "pipelines")
    code = ("import sys; import pipelines.errors, pipelines.registry, pipelines.atomic; "
            "assert not any(m == 'swav_fast' or m.startswith('swav_fast.') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('swav_fast'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); {code}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
