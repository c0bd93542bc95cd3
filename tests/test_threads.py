"""The CPU thread choice (train.threads=0): the rule, the cgroup readers, and its benchmark row."""
from __future__ import annotations

import json

import pytest

from swav_fast.threads import ThreadChoice, cgroup_cpu_quota, choose_threads, usable_cpus


@pytest.mark.parametrize("affinity, quota, workers, requested, expected", [
    (2, None, 1, 0, 1),      # the main job on a 2-core machine: one loader worker -> 1 thread
    (2, None, 0, 0, 2),      # no workers: every usable core
    (16, None, 8, 0, 8),
    (16, 4.0, 1, 0, 3),      # a container limited to 4 cores on a 16-core host
    (16, 2.5, 0, 0, 2),      # a fractional quota rounds down
    (16, 0.5, 0, 0, 1),      # ... but never below one core
    (4, None, 8, 0, 1),      # more workers than cores: still one thread
    (2, None, 1, 6, 6),      # train.threads=6 overrides the rule
    (None, None, 0, 0, 3),   # no affinity information: os.cpu_count() (3 here)
])
def test_thread_rule(affinity, quota, workers, requested, expected):
    choice = choose_threads(affinity, quota, workers, requested, cpu_count=3)
    assert isinstance(choice, ThreadChoice) and choice.threads == expected
    assert choice.usable_cpus == usable_cpus(affinity, quota, 3)
    text = choice.describe()
    assert text.startswith(f"{expected} (")
    assert ("train.threads=" in text) and (("auto" in text) != bool(requested))


def test_processes_of_one_node_share_its_cores():
    assert choose_threads(16, None, 2, 0, cpu_count=16, local_processes=4).threads == 2  # 16 / 4 - 2
    assert choose_threads(16, None, 0, 0, cpu_count=16, local_processes=32).threads == 1
    # the launcher pinned each process to 4 of the 16 cores: those 4 are its own
    assert choose_threads(4, None, 1, 0, cpu_count=16, local_processes=4).threads == 3


def test_omp_num_threads_is_honoured_unless_train_threads_is_set():
    assert choose_threads(8, None, 1, 0, env=3).threads == 3
    assert "OMP_NUM_THREADS=3" in choose_threads(8, None, 1, 0, env=3).describe()
    assert choose_threads(8, None, 1, 5, env=3).threads == 5
    assert choose_threads(8, None, 1, 0, env=None).threads == 7


def test_cgroup_quota_v2_and_v1(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) is None
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_cpu_quota(v1) == 3.0


def test_trainer_applies_the_choice(tmp_path):
    import torch

    from swav_fast.train import Trainer
    from tests.helpers import tiny_config, write_image_folder

    data = write_image_folder(tmp_path / "data")
    before = torch.get_num_threads()
    try:
        trainer = Trainer(tiny_config(data, tmp_path / "run", "train.threads=1"))
        assert torch.get_num_threads() == 1 and trainer.threads.threads == 1
        trainer.close()
    finally:
        torch.set_num_threads(before)


def test_bench_threads_row(tmp_path, capsys):
    """``swav-fast bench threads``: one row per thread count, auto = the rule's choice, JSON written."""
    from benchmarks.bench_threads import main
    from swav_fast.threads import machine_threads

    out = tmp_path / "threads.json"
    assert main(["--threads", "1,auto", "--busy", "0", "--batch", "4", "--steps", "1", "--warmup", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU threads: recipe quick (resnet10_half, batch 4" in printed
    result = json.loads(out.read_text())
    rows = {r["threads"]: r for r in result["results"]}
    assert sorted(rows) == ["1", "auto"]
    assert rows["1"]["num_threads"] == 1
    assert rows["auto"]["num_threads"] == machine_threads(0, 0).threads
    assert all(r["images_per_s"] > 0 and r["busy"] == 0 for r in rows.values())
    assert rows["auto"]["ratio"] == 1.0


def test_bench_threads_rejects_bad_counts():
    from benchmarks.bench_threads import thread_counts
    from swav_fast.errors import ConfigError

    assert thread_counts("1, 2,auto,default", 3, 8) == [("1", 1), ("2", 2), ("auto", 3), ("default", 8)]
    with pytest.raises(ConfigError, match="'0' is not a positive number"):
        thread_counts("1,0", 3, 8)
