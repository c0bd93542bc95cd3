"""Export to torchvision/timm and import of the official SwAV checkpoint layout."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision.models as tvm

from swav_fast.checkpoint import atomic_save, load_checkpoint
from swav_fast.cli import main
from swav_fast.config import load_config
from swav_fast.export import ExportError, export_trunk, import_official
from swav_fast.models import SwAVModel
from tests.helpers import write_image_folder


def _model(arch="resnet18", hidden=32, feat=16, protos=20, seed=0):
    """A SwAVModel with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = SwAVModel(arch, hidden, feat, protos)
    with torch.no_grad():  # make running stats and affine params differ from their init
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def _checkpoint(path, arch="resnet18", hidden=32, feat=16, protos=20):
    """A swav-fast checkpoint (model + config) of :func:`_model`."""
    model = _model(arch, hidden, feat, protos)
    cfg = load_config(None, [f"model.arch={arch}", f"model.hidden_dim={hidden}", f"model.feat_dim={feat}",
                             f"model.num_prototypes={protos}"])
    atomic_save({"format": "swav-fast/1", "model": model.state_dict(), "config": cfg.to_dict(), "step": 7,
                 "epoch": 1}, path)
    return model


def test_export_loads_strictly_into_torchvision_and_gives_same_features(tmp_path, capsys):
    ours = _checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "exported.pt"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt.pt"), "--to", "torchvision", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "resnet18" and info["target"] == "torchvision"
    sd = torch.load(out, weights_only=True)
    assert not any(k.startswith("trunk.") for k in sd)
    ref = tvm.resnet18()
    assert list(sd) == list(ref.state_dict())
    ref.load_state_dict(sd)  # strict, no renaming
    assert torch.count_nonzero(ref.fc.weight) == 0 and torch.count_nonzero(ref.fc.bias) == 0
    ref.fc = torch.nn.Identity()
    ref.eval()
    ours.trunk.eval()
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours.trunk(x), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    # timm's ResNets use torchvision's names (conv1, bn1, layer1.0.downsample.0, ..., fc): same layout
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt.pt"), "--to", "timm",
                 str(tmp_path / "timm.pt")]) == 0
    timm_sd = torch.load(tmp_path / "timm.pt", weights_only=True)
    assert list(timm_sd) == list(sd)
    assert all(torch.equal(timm_sd[k], sd[k]) for k in sd)


def test_export_without_fc_and_custom_classes(tmp_path):
    _checkpoint(tmp_path / "ckpt.pt")
    sd = export_trunk(load_checkpoint(tmp_path / "ckpt.pt"), "torchvision", include_fc=False)
    missing, unexpected = tvm.resnet18().load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    sd = export_trunk(load_checkpoint(tmp_path / "ckpt.pt"), "torchvision", num_classes=10)
    tvm.resnet18(num_classes=10).load_state_dict(sd)


def test_export_refuses_arch_without_torchvision_counterpart(tmp_path, capsys):
    _checkpoint(tmp_path / "ckpt.pt", arch="resnet10_half")
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt.pt"), "--to", "torchvision", str(out)]) == 2
    err = capsys.readouterr().err
    assert "resnet10_half" in err and "resnet50" in err and err.count("\n") == 1
    assert out.read_bytes() == b"precious"
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt.pt"), str(out)]) == 2  # no --to
    assert "--to" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0 and "untrained" in capsys.readouterr().out.lower()


def _official_layout(model: SwAVModel) -> dict:
    """Our weights renamed to the official SwAV file layout (``module.`` prefixes etc.)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("trunk."):
            name = k[len("trunk."):]
        elif k.startswith("head.mlp."):
            name = "projection_head." + k[len("head.mlp."):]
        else:
            name = k
        sd["module." + name] = v.clone()
    return sd


def test_import_official_resnet50_layout(tmp_path, capsys):
    ours = _model("resnet50", 2048, 128, 3000)  # the official model's sizes
    official = _official_layout(ours)
    assert "module.projection_head.3.weight" in official and "module.conv1.weight" in official
    # a training checkpoint: weights under "state_dict", plus epoch and optimiser-like plain data
    torch.save({"epoch": 800, "state_dict": official, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
               tmp_path / "swav_800ep_pretrain.pth.tar")
    out = tmp_path / "imported.pt"
    assert main(["export", "--from-official", str(tmp_path / "swav_800ep_pretrain.pth.tar"), str(out)]) == 0
    assert "resnet50" in capsys.readouterr().out
    state = load_checkpoint(out)
    m = state["config"]["model"]
    assert (m["arch"], m["hidden_dim"], m["feat_dim"], m["num_prototypes"]) == ("resnet50", 2048, 128, 3000)
    assert state["epoch"] == 800
    expected = ours.state_dict()
    assert list(state["model"]) == list(expected)
    for k, v in expected.items():
        assert torch.equal(state["model"][k], v), k


def test_import_official_without_prefix_or_bn_counters_then_eval_knn_and_export(tmp_path, capsys):
    ours = _model()
    raw = {k[len("module."):]: v for k, v in _official_layout(ours).items()
           if not k.endswith("num_batches_tracked")}  # the hub file's layout, from an older torch
    torch.save(raw, tmp_path / "official.pth")
    out = tmp_path / "imported.pt"
    assert main(["export", "--from-official", str(tmp_path / "official.pth"), str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "resnet18"
    state = load_checkpoint(out)
    assert state["config"]["model"]["hidden_dim"] == 32
    SwAVModel("resnet18", 32, 16, 20).load_state_dict(state["model"])  # strict

    data = tmp_path / "data"
    write_image_folder(data / "train", classes=2, per_class=3)
    write_image_folder(data / "val", classes=2, per_class=2, seed=1)
    assert main(["eval", "knn", "--checkpoint", str(out), "--data", str(data), "--image-size", "32",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_train"] == 6 and result["num_val"] == 4 and 0 <= result["top1"] <= 100
    # the imported checkpoint exports like any other
    assert main(["export", "--checkpoint", str(out), "--to", "torchvision", str(tmp_path / "r18.pt")]) == 0
    tvm.resnet18().load_state_dict(torch.load(tmp_path / "r18.pt", weights_only=True))


def test_import_official_rejects_multi_head_prototypes():
    raw = _official_layout(_model())
    raw["module.prototypes.prototypes0.weight"] = raw.pop("module.prototypes.weight")
    with pytest.raises(ExportError, match="multi-head"):
        import_official(raw)


def test_import_official_refuses_unsafe_and_foreign_files(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(1)}, "x": Evil()}, tmp_path / "evil.pth")
    assert main(["export", "--from-official", str(tmp_path / "evil.pth"), str(tmp_path / "o.pt")]) == 2
    assert "refusing" in capsys.readouterr().err
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(3, 3)}}, tmp_path / "odd.pth")
    assert main(["export", "--from-official", str(tmp_path / "odd.pth"), str(tmp_path / "o.pt")]) == 2
    assert "prototypes" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()
