"""``benchmarks/bench_learning.py`` (``swav-fast bench learning``) on a tiny budget: two steps per run on
40-image built-in sets (kinds photo and shapes), so the table and JSON shapes and the arithmetic are
checked, not the learning (that is the benchmark's own job, at the recipes' budget)."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_learning
from swav_fast.cli import main as cli_main
from swav_fast.config import available_recipes

#: the quick recipe, cut to 2 steps of batch 16 on 40 + 20 images of 64x48
TINY = ["data.synthetic.train_images=40", "data.synthetic.val_images=20", "data.synthetic.size=[64,48]",
        "optim.epochs=1", "optim.batch_size=16", "train.max_steps=2", "model.num_prototypes=20",
        "eval.knn_k=5", "data.workers=0", "methods.swav.freeze_prototypes_niters=1", "train.threads=1"]


def test_bench_learning_table_and_json(tmp_path, capsys):
    out = tmp_path / "learning.json"
    argv = ["learning", "--seeds", "0,1", "--methods", "swav,simclr", "--dataset", "builtin,shapes",
            "--json", str(out),
            "--output", str(tmp_path / "runs"), f"data.synthetic.cache_dir={tmp_path / 'cache'}", *TINY]
    assert cli_main(["bench", *argv]) == 0
    text = capsys.readouterr().out
    assert "trained %" in text and "random init %" in text and "per method, over the seeds:" in text
    result = json.loads(out.read_text())
    assert result["benchmark"] == "learning" and result["config"]["seeds"] == [0, 1]
    assert result["config"]["datasets"] == ["builtin", "shapes"]
    assert result["config"]["recipes"] == {"swav": "quick", "simclr": "quick_simclr"}
    rows = result["results"]
    assert [(r["method"], r["dataset"], r["seed"]) for r in rows] == \
        [(m, d, s) for m in ("swav", "simclr") for d in ("builtin", "shapes") for s in (0, 1)]
    for r in rows:
        assert r["gain"] == pytest.approx(r["trained"] - r["random_init"])
        assert 0.0 <= r["trained"] <= 100.0 and 0.0 <= r["random_init"] <= 100.0
        assert r["steps"] == 2 and r["num_train"] == 40 and r["num_val"] == 20
        assert len(r["epoch_loss"]) == 1 and r["unhealthy_checks"] >= 0  # one epoch of 2 steps
        run_dir = tmp_path / "runs" / f"{r['method']}-{r['dataset']}-seed{r['seed']}"
        assert (run_dir / "metrics.jsonl").is_file()
    # the seed reaches the run: each run folder's config has its own train.seed
    cfg = (tmp_path / "runs" / "swav-builtin-seed1" / "config.yaml").read_text()
    assert "seed: 1" in cfg and "kind: photo" in cfg
    assert "kind: shapes" in (tmp_path / "runs" / "simclr-shapes-seed0" / "config.yaml").read_text()
    assert {p.name for p in (tmp_path / "cache").iterdir()} == \
        {"synthetic-c10-n40-v20-64x48-s0", "synthetic-shapes-c10-n40-v20-64x48-s0"}
    summary = {(s["method"], s["dataset"]): s for s in result["summary"]}
    assert list(summary) == [(m, d) for m in ("swav", "simclr") for d in ("builtin", "shapes")]
    for (method, dataset), s in summary.items():
        gains = [r["gain"] for r in rows if (r["method"], r["dataset"]) == (method, dataset)]
        assert s["runs"] == 2 and s["failed"] == 0
        assert s["mean_gain"] == pytest.approx(sum(gains) / 2)
        assert s["min_gain"] == pytest.approx(min(gains)) and s["max_gain"] == pytest.approx(max(gains))
        assert s["below_random_init"] == sum(g < 0 for g in gains)
    # --jobs 2: the same runs in two spawned processes give the same rows (same seeds, one thread each)
    par = tmp_path / "parallel.json"
    assert bench_learning.main(["--seeds", "0,1", "--jobs", "2", "--json", str(par),
                                f"data.synthetic.cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    key = ("method", "seed", "trained", "random_init", "gain", "steps")
    assert [{k: r[k] for k in key} for r in json.loads(par.read_text())["results"]] == \
        [{k: r[k] for k in key} for r in rows if (r["method"], r["dataset"]) == ("swav", "builtin")]


def test_variants_run_every_seed_and_compare_seed_by_seed(tmp_path, capsys):
    out = tmp_path / "variants.json"
    assert bench_learning.main(["--seeds", "0,1", "--variant", "recipe:", "--variant", "lr:optim.base_lr=0.06",
                                "--json", str(out), "--output", str(tmp_path / "runs"),
                                f"data.synthetic.cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    text = capsys.readouterr().out
    assert "variants recipe: (the recipe); lr: optim.base_lr=0.06" in text and "vs first" in text
    result = json.loads(out.read_text())
    assert result["config"]["variants"] == {"recipe": [], "lr": ["optim.base_lr=0.06"]}
    rows = result["results"]
    assert [(r["variant"], r["seed"]) for r in rows] == [("recipe", 0), ("recipe", 1), ("lr", 0), ("lr", 1)]
    assert "base_lr: 0.06" in (tmp_path / "runs" / "swav-lr-builtin-seed1" / "config.yaml").read_text()
    assert "base_lr: 0.6" in (tmp_path / "runs" / "swav-recipe-builtin-seed1" / "config.yaml").read_text()
    # same seed, same random init: the comparison is paired
    assert rows[0]["random_init"] == rows[2]["random_init"] and rows[1]["random_init"] == rows[3]["random_init"]
    first, second = result["summary"]
    assert (first["variant"], second["variant"]) == ("recipe", "lr") and "vs_first" not in first
    assert second["vs_first"] == pytest.approx(((rows[2]["gain"] - rows[0]["gain"])
                                                + (rows[3]["gain"] - rows[1]["gain"])) / 2)


def test_summary_pairs_variants_on_the_seeds_both_finished():
    rows = [{"method": "swav", "variant": "a", "dataset": "builtin", "seed": 0, "gain": 10.0},
            {"method": "swav", "variant": "a", "dataset": "builtin", "seed": 1, "gain": -2.0},
            {"method": "swav", "variant": "b", "dataset": "builtin", "seed": 0, "gain": 13.0},
            {"method": "swav", "variant": "b", "dataset": "builtin", "seed": 1, "note": "failed: diverged"},
            {"method": "swav", "variant": "b", "dataset": "builtin", "seed": 2, "gain": 50.0}]
    a, b = bench_learning.summarise(rows)
    assert a["mean_gain"] == 4.0 and "vs_first" not in a
    assert b["runs"] == 2 and b["failed"] == 1 and b["vs_first"] == 3.0  # only seed 0 has both


def test_run_trace_reads_epoch_losses_and_failed_health_checks(tmp_path):
    from swav_fast.runlog import RunLog

    log = RunLog(tmp_path)
    log.write("start", step=0, epoch=0)
    log.write("epoch", step=31, epoch=0, loss=5.71234567)
    log.write("collapse", step=40, loss=5.70, ln_k=5.70, prototypes_used=1, prediction_entropy=5.69,
              signs=["hedging"], remedies=["lower the lr"])
    log.write("collapse", step=50, loss=5.70, ln_k=5.70, prototypes_used=1)
    log.write("epoch", step=62, epoch=1, loss=None)
    trace = bench_learning.run_trace(tmp_path)
    assert trace["epoch_loss"] == [5.7123, None] and trace["unhealthy_checks"] == 2
    first = trace["first_unhealthy"]
    assert first["step"] == 40 and first["prototypes_used"] == 1 and "remedies" not in first
    assert bench_learning.run_trace(tmp_path / "missing") == {}


def test_summary_of_failed_and_finished_runs():
    rows = [{"method": "swav", "dataset": "builtin", "seed": 0, "gain": 14.3},
            {"method": "swav", "dataset": "builtin", "seed": 1, "gain": -16.2},
            {"method": "swav", "dataset": "builtin", "seed": 2, "gain": 15.5},
            {"method": "swav", "dataset": "builtin", "seed": 3, "note": "failed: diverged"}]
    (s,) = bench_learning.summarise(rows)
    assert s["runs"] == 3 and s["failed"] == 1 and s["worst_seed"] == 1 and s["below_random_init"] == 1
    assert s["mean_gain"] == pytest.approx(13.6 / 3) and s["min_gain"] == -16.2 and s["max_gain"] == 15.5


def test_methods_all_is_every_quick_recipe():
    methods = bench_learning.parse_methods("all")
    assert methods[0] == "swav"
    assert sorted(bench_learning.recipe_of(m) for m in methods) == \
        sorted(r for r in available_recipes() if r.startswith("quick"))


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "swav,mae"], "unknown mae"),
    (["--seeds", "0,one"], "--seeds"),
    (["--dataset", "imagenet"], "unknown 'imagenet'"),
    (["--jobs", "0"], "--jobs"),
    (["optim.epochs"], "KEY=VALUE"),
    (["--variant", "optim.epochs=8"], "NAME:KEY=VALUE"),
    (["--variant", "e8:optim.epochs"], "--variant e8: expected KEY=VALUE"),
    (["--variant", "a:", "--variant", "a:optim.epochs=8"], "names must differ"),
    (["--variant", "x y:optim.epochs=8"], "NAME:KEY=VALUE"),
])
def test_bench_learning_rejects_bad_arguments(argv, needle, capsys):
    assert cli_main(["bench", "learning", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_unknown_synthetic_kind_is_a_config_error():
    from swav_fast.config import load_config
    from swav_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="data.synthetic.kind"):
        load_config("quick", ["data.synthetic.kind=noise"]).validate()
