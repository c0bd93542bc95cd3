"""pipelines.decode: batched JPEG decoding through TorchCodec, torchvision.io as the fallback only."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import pipelines.torch_backend as tb
from pipelines import MultiCropSpec, build_loader
from pipelines.decode import decode_jpegs, decode_jpegs_each, decoder_status, resolve_decoder
from pipelines.options import TorchOptions
from swav_fast.errors import ConfigError, DataError

#: JPEG decoders may round the IDCT / chroma upsampling differently: a few grey levels at most
TOLERANCE = 3
CPU_DECODERS = ("torchcodec", "torchvision")


def photo(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = rng.uniform(40, 215, 3) + 40 * np.sin(x[..., None] / rng.uniform(3, 9, 3)) \
        + 30 * np.cos(y[..., None] / rng.uniform(4, 11, 3)) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, orientation: int = 1, **save: object) -> bytes:
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif
    im.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def pil_reference(data: bytes) -> torch.Tensor:
    """What the PIL backend sees: RGB as displayed (EXIF orientation applied), [3, H, W] uint8."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def samples() -> list[bytes]:
    """Sizes that are not multiples of the MCU, 4:2:0 and 4:4:4, grayscale, EXIF-rotated and mirrored."""
    return [jpeg(photo(70, 50, 0)), jpeg(photo(33, 17, 1), subsampling=0), jpeg(photo(64, 48, 2)[..., 0]),
            jpeg(photo(40, 24, 3), orientation=6), jpeg(photo(40, 24, 4), orientation=2),
            jpeg(photo(31, 45, 5), orientation=8)]


@pytest.fixture
def no_torchcodec(monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchCodec made unimportable (as on a machine without it)."""
    for name in [m for m in sys.modules if m == "torchcodec" or m.startswith("torchcodec.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)


def test_torchcodec_is_the_default() -> None:
    # torchcodec is a dependency of the project (pyproject.toml): the maintained path is the one used
    assert decoder_status()["torchcodec"] is None
    assert resolve_decoder("auto") == "torchcodec"
    assert resolve_decoder("torchvision") == "torchvision"
    with pytest.raises(ConfigError, match="unknown JPEG decoder 'nope'"):
        resolve_decoder("nope")


@pytest.mark.parametrize("decoder", CPU_DECODERS)
def test_pixels_equal_pil(samples: list[bytes], decoder: str) -> None:
    images = decode_jpegs(samples, "cpu", decoder=decoder)
    assert len(images) == len(samples)
    for data, img in zip(samples, images):
        ref = pil_reference(data)
        assert img.dtype == torch.uint8 and img.device.type == "cpu"
        assert img.shape == ref.shape  # EXIF orientation applied (5-8 swap width and height)
        assert (img.int() - ref.int()).abs().max() <= TOLERANCE


def test_decoders_agree_and_accept_tensors_and_bytes(samples: list[bytes]) -> None:
    as_tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in samples]
    a = decode_jpegs(as_tensors, "cpu", decoder="torchcodec")
    b = decode_jpegs([bytearray(d) for d in samples], "cpu", decoder="torchvision")
    for x, y in zip(a, b):
        assert x.shape == y.shape and (x.int() - y.int()).abs().max() <= TOLERANCE
    assert decode_jpegs([], "cpu") == []


def test_fallback_when_torchcodec_is_missing(no_torchcodec: None, samples: list[bytes]) -> None:
    status = decoder_status()
    assert status["torchcodec"] is not None and "torchcodec" in status["torchcodec"]
    assert resolve_decoder("auto") == "torchvision"
    with pytest.raises(ConfigError, match="torchcodec.*not usable"):
        resolve_decoder("torchcodec")
    images = decode_jpegs(samples, "cpu")  # auto
    for data, img in zip(samples, images):
        ref = pil_reference(data)
        assert img.shape == ref.shape and (img.int() - ref.int()).abs().max() <= TOLERANCE


def test_torch_backend_falls_back(no_torchcodec: None, tmp_path: Path) -> None:
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for k in range(2):
            (tmp_path / f"c{c}" / f"{k}.jpg").write_bytes(jpeg(photo(40, 30, 10 * c + k)))
    spec = MultiCropSpec(num_crops=[1], size_crops=[16], min_scale_crops=[0.3], max_scale_crops=[1.0])
    ld = build_loader(tmp_path, spec, 4, backend="torch")
    assert ld.decoder == "torchvision"
    assert next(iter(ld)).views[0].shape == (4, 3, 16, 16)
    ld.close()


@pytest.mark.parametrize("decoder", CPU_DECODERS)
def test_corrupt_bytes_raise_data_error_naming_the_sample(samples: list[bytes], decoder: str) -> None:
    good = samples[0]
    datas = [good, b"this is not a jpeg", good[: len(good) // 2], good]
    with pytest.raises(DataError, match=r"b\.jpg: not a decodable JPEG"):
        decode_jpegs(datas, "cpu", decoder=decoder, names=["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    with pytest.raises(DataError, match="item 1 of the batch"):
        decode_jpegs(datas, "cpu", decoder=decoder)
    images, errors = decode_jpegs_each(datas, "cpu", decoder=decoder)
    assert errors[0] is None and errors[3] is None and errors[1] is not None
    assert images[1] is None and images[0] is not None and torch.equal(images[0], images[3])


def test_torch_backend_decodes_through_pipelines_decode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                                        ) -> None:
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for k in range(4):
            (tmp_path / f"c{c}" / f"{k}.jpg").write_bytes(jpeg(photo(48 + 4 * k, 36, 10 * c + k)))
    spec = MultiCropSpec(num_crops=[2], size_crops=[24], min_scale_crops=[0.3], max_scale_crops=[1.0])
    calls: list[str] = []
    real = tb.decode_jpegs_each

    def spy(datas, device, decoder="auto"):  # type: ignore[no-untyped-def]
        calls.append(decoder)
        return real(datas, device, decoder)

    monkeypatch.setattr(tb, "decode_jpegs_each", spy)
    views = {}
    for decoder in CPU_DECODERS:
        ld = build_loader(tmp_path, spec, 4, backend="torch", seed=5, options=TorchOptions(decoder=decoder))
        views[decoder] = next(iter(ld)).views
        ld.close()
        assert calls and set(calls) == {decoder}  # one batched call per batch, with the chosen decoder
        calls.clear()
    for a, b in zip(views["torchcodec"], views["torchvision"]):
        assert (a - b).abs().max() <= 0.1  # normalised views of (nearly) the same pixels


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_nvimgcodec_needs_cuda() -> None:
    with pytest.raises(ConfigError, match="nvimgcodec.*CUDA"):
        resolve_decoder("nvimgcodec")
    with pytest.raises(ConfigError, match="data.torch.decoder|decoder"):
        TorchOptions(decoder="nvjpeg")


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision", "nvimgcodec"])
def test_cuda_pixels_equal_pil(samples: list[bytes], decoder: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run with -m gpu on the GPU machine)")
    images = decode_jpegs(samples, "cuda", decoder=decoder)
    for data, img in zip(samples, images):
        ref = pil_reference(data)
        assert img.device.type == "cuda" and img.shape == ref.shape
        # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a few levels
        assert (img.cpu().int() - ref.int()).abs().float().mean() <= 2.0
