"""The CLI on bad input: a clear one-line error naming the problem, a non-zero exit, nothing lost."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swav_fast.cli import main
from tests.helpers import write_image_folder

TINY = ["model.arch=resnet10_half", "model.hidden_dim=32", "model.feat_dim=16", "model.num_prototypes=20",
        "data.crops.num_crops=[2, 2]", "data.crops.size_crops=[32, 16]", "data.crops.min_scale_crops=[0.14, 0.05]",
        "data.crops.max_scale_crops=[1.0, 0.14]", "data.workers=0",
        "optim.batch_size=8", "optim.epochs=1", "optim.warmup_epochs=0", "eval.at_end=false"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swav_fast", *args], capture_output=True, text=True,
                          timeout=600)


def test_help_for_every_subcommand():
    for sub in ("synth", "train", "eval"):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0
    with pytest.raises(SystemExit):
        main(["eval", "knn", "--help"])


def test_missing_data_folder(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not found" in err


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "run"), *TINY]) == 2
    assert "empty" in capsys.readouterr().err


def test_unknown_config_key_lists_valid_keys(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "run"), "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "base_lr" in err and "weight_decay" in err
    assert not (tmp_path / "run").exists()  # rejected before any work


def test_unwritable_output_folder_keeps_existing_file(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    blocker = tmp_path / "results"
    blocker.write_text("precious")  # a file where the run folder's parent should be
    code = main(["train", "--data", str(data), "--output", str(blocker / "run"), *TINY])
    assert code == 2
    assert "not writable" in capsys.readouterr().err
    assert blocker.read_text() == "precious"


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = write_image_folder(tmp_path / "data")
    (data / "class_0" / "zero.jpg").write_bytes(b"")
    good = (data / "class_1" / "img_0.jpg").read_bytes()
    (data / "class_1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (data / "class_2" / "text.jpg").write_text("not an image")
    out = tmp_path / "run"
    # KEY=VALUE overrides before and after options (issue 17, item 5): all of them apply, in order
    proc = run_cli("train", "--data", str(data), "eval.at_end=false", "--no-progress", "train.log_every=1",
                   "--output", str(out), *TINY, "optim.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 3 unreadable image(s)" in proc.stdout  # 3 bad files, met in each of 2 epochs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "done" and records[-1]["bad_images"] == 3
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, records[-1]["steps"] + 1))  # train.log_every=1
    # the start-of-run block names what the run does
    block = proc.stderr[proc.stderr.index("run:"):]
    assert f"run folder:     {out.resolve()}" in block
    assert f"data:           {data.resolve()}: 27 images, 3 classes" in block
    assert "device:         cpu" in block and "step mode:      eager (train.step_mode=eager" in block
    assert "loader:         pil with 0 worker(s)" in block and "CPU threads:" in block
    assert "batch:          8 images, 4 views each" in block
    assert "steps:          6 (2 epochs x 3 steps); this run: step 0 -> 6" in block
    assert f"checkpoints:    {out.resolve() / 'checkpoints'}" in block
    assert f"metrics:        {out.resolve() / 'metrics.jsonl'}" in block
    assert "end-of-run kNN: off (eval.at_end=false)" in block


def test_overrides_anywhere_and_unknown_words(capsys):
    from swav_fast.cli import build_parser, parse_args

    parser = build_parser()
    args = parse_args(parser, ["train", "a.b=1", "--data", "D", "eval.at_end=false", "--no-progress",
                               "train.log_every=1"])
    assert args.overrides == ["a.b=1", "eval.at_end=false", "train.log_every=1"]
    assert args.data == "D" and args.no_progress
    with pytest.raises(SystemExit) as e:  # a subcommand without overrides
        parse_args(parser, ["eval", "knn", "--checkpoint", "c", "--data", "D", "a.b=1"])
    assert e.value.code == 2 and "unrecognized arguments: a.b=1" in capsys.readouterr().err
    assert main(["train", "--data", "D", "--no-progress", "bogus"]) == 2  # not a KEY=VALUE word
    assert "override 'bogus' must look like section.key=value" in capsys.readouterr().err


def _probe(argv: list[str]) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``swav-fast ARGV`` in a fresh interpreter: its exit code and the heavy modules it imported."""
    proc = subprocess.run([sys.executable, "-c", LIGHT_PROBE, json.dumps(argv)], capture_output=True,
                          text=True, timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc


LIGHT_PROBE = """
import json, sys
from swav_fast.cli import main
argv = json.loads(sys.argv[1])
try:
    code = main(argv)
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "torchvision", "nvidia.dali", "ffcv") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["train", "--help"], ["train", "--list-keys"], ["synth", "--help"], ["inspect", "--help"],
    ["inspect", "/nonexistent/prepared"], ["train", "--epochs", "x"], ["train", "--data", "D", "bogus"],
    ["train", "--recipe", "no_such_recipe"], ["eval", "knn", "--checkpoint"], ["report", "/nonexistent/run"],
])
def test_light_commands_do_not_import_torch(argv):
    """--help, --list-keys, inspect and argument errors answer without importing torch (issue 21.2)."""
    result, proc = _probe(argv)
    assert result["heavy"] == [], (argv, result)
    assert result["code"] in (0, 2), (argv, proc.stderr)


def test_synth_does_not_import_torch(tmp_path):
    argv = ["synth", "--out", str(tmp_path / "s"), "--images", "4", "--classes", "2", "--size", "32x24",
            "--workers", "1", "--no-progress"]
    assert _probe(argv)[0] == {"code": 0, "heavy": []}
    assert len(list((tmp_path / "s").rglob("*.jpg"))) == 4


def test_list_keys_prints_type_default_and_description(capsys):
    from swav_fast.config import valid_keys

    assert main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "description"]
    rows = {line.split()[0]: line.split(None, 3) for line in lines[1:]}
    assert sorted(rows) == sorted(valid_keys())  # every key, once
    assert all(len(r) == 4 and r[3].strip() for r in rows.values()), [k for k, r in rows.items() if len(r) < 4]
    assert rows["optim.base_lr"][1:3] == ["float", "4.8"]
    assert rows["data.path"][1:3] == ["str|null", "null"]
    assert rows["methods.swav.crops_for_assign"][1:3] == ["list[int]", "[0,1]"]  # as typed on the command line
    assert rows["data.crops.ratio"][2] == "[0.75,1.333]"
    assert rows["train.threads"][2] == "0" and "auto" in rows["train.threads"][3]
    assert rows["eval.at_end"][1:3] == ["bool", "true"]


def test_loader_help_lists_installed_backends(capsys):
    from swav_fast.commands.train import installed_loaders

    installed = installed_loaders()
    assert installed[:2] == ["pil", "torch"]  # torchvision comes with torch
    for name, module in (("dali", "nvidia.dali"), ("ffcv", "ffcv")):
        try:
            __import__(module)
            present = True
        except ImportError:
            present = False
        assert (name in installed) == present
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"installed here: {', '.join(installed)}" in help_text


def test_method_names_match_the_registry():
    from swav_fast.commands.train import METHOD_NAMES
    from swav_fast.methods import available_methods

    assert METHOD_NAMES == available_methods()


def test_launch_help_example_keeps_its_line_break():
    from swav_fast.commands.launch import EPILOG

    assert "--rdzv-endpoint node001:29500 -- \\\n      --recipe swav_800ep_bs4096 ...\n" in EPILOG


def test_eval_knn_json(tmp_path):
    data = write_image_folder(tmp_path / "data" / "train")
    write_image_folder(tmp_path / "data" / "val", per_class=3, seed=1)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--no-progress", *TINY]) == 0
    ckpt = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    proc = run_cli("eval", "knn", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data"), "--json",
                   "--image-size", "32")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["num_train"] == 24 and result["num_val"] == 9 and 0 <= result["top1"] <= 100


def test_eval_refuses_foreign_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    (tmp_path / "d" / "train").mkdir(parents=True)
    assert main(["eval", "knn", "--checkpoint", str(bad), "--data", str(tmp_path / "d")]) == 2
    assert "bad.pt" in capsys.readouterr().err
