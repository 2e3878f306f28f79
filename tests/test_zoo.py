"""gradcam.models' zoos: ``timm:<name>`` and ``hf:<folder|repo id>``, offline.

Nothing here touches the network: every test runs with socket connections refused, HF_HUB_OFFLINE=1 and
private, initially empty Hugging Face hub and torch hub caches; pretrained weights are random weights
the tests put into a fake hub cache laid out as huggingface_hub lays it out. Expected values come from
independent references: timm's own eval transform and model builder, the transformers image processor,
and the modules the files were saved from.
"""

from __future__ import annotations

import pathlib
import shutil
import socket
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from torch import nn
from torchvision.models import ResNet50_Weights
from typer.testing import CliRunner

import gradcam.models as models
from conftest import tiny_vit_options
from gradcam.cli import app
from gradcam.errors import GradCAMError
from gradcam.io import load_image
from gradcam.models.pool import ModelPool

# The project's copies of the CC0 sample photos in /work/shared/samples (byte-identical).
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
IMAGENET = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


# --------------------------------------------------------------------------------------------------
# fixtures and helpers


def _refuse_connection(self, *args, **kwargs):
    raise AssertionError(f"a test tried to open a network connection to {args}")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> Path:
    """No network, and empty private caches; returns the Hugging Face hub cache folder."""
    monkeypatch.setattr(socket.socket, "connect", _refuse_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "hf_hub"


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return load_image(EXAMPLES / "coffee.png")  # 600x400


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return load_image(EXAMPLES / "cat.png")  # 451x300


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay ``files`` out as huggingface_hub's cache does: blobs, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for index, (name, source) in enumerate(files.items()):
        blob = repo / "blobs" / f"{index:040d}"
        shutil.copyfile(source, blob)
        (snapshot / name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def randomised(module: nn.Module, seed: int = 1) -> nn.Module:
    """Every parameter and float buffer drawn afresh, so that any default init or skipped load shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return module.eval()


def save_safetensors(module: nn.Module, file: Path) -> Path:
    safetensors.torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()}, file)
    return file


def assert_same_state(actual: nn.Module, expected: nn.Module) -> None:
    mine, theirs = actual.state_dict(), expected.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert [k for k in theirs if not torch.equal(mine[k], theirs[k])] == []


def one_line(excinfo: pytest.ExceptionInfo, *words: str) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, GradCAMError) and isinstance(excinfo.value, ValueError)
    assert "\n" not in message
    for word in words:
        assert word in message
    return message


def test_the_network_guard_refuses_connections():
    with pytest.raises(AssertionError, match="network connection"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


# --------------------------------------------------------------------------------------------------
# timm: preprocessing against timm's own eval transform


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # centre crop, crop_pct 0.9, bicubic, mean/std 0.5
        ("vit_tiny_patch16_224", (248, 224, "bicubic")),
        # centre crop, crop_pct 0.875, bilinear, ImageNet mean/std
        ("resnet50.fb_ssl_yfcc100m_ft_in1k", (256, 224, "bilinear")),
        # squash: both sides to 192 / 0.9, then the central 192x192
        ("dm_nfnet_f0.dm_in1k", ((213, 213), 192, "bicubic")),
    ],
)
def test_timm_preprocess_matches_timms_eval_transform(name, expected, coffee, cat):
    with torch.device("meta"):  # only the preprocessing is compared: skip initialising weights
        loaded = models.load(f"timm:{name}", pretrained=False)
        reference_model = timm.create_model(name, pretrained=False)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference_model))

    resize, crop, interpolation = expected
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (resize, crop)
    assert loaded.preprocess.interpolation.value == interpolation
    for image in (coffee, cat, cat.transpose(Image.Transpose.TRANSPOSE)):  # landscape and portrait
        wanted = transform(image)
        actual = loaded.preprocess(image)
        assert actual.dtype == torch.float32 and actual.shape == wanted.shape
        assert loaded.input_size == tuple(wanted.shape[1:])
        torch.testing.assert_close(actual, wanted, rtol=0, atol=1e-6)


def test_timm_unsupported_crop_mode_is_one_line():
    config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "border"}
    config |= {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    from gradcam.models.timm_zoo import preprocess_from_config

    with pytest.raises(GradCAMError) as excinfo:
        preprocess_from_config(config, "timm:x")
    one_line(excinfo, "timm:x", "crop_mode 'border'", "center or squash")


# --------------------------------------------------------------------------------------------------
# timm: random weights, user weights


def test_timm_random_weights_with_imagenet_labels():
    first = models.load("timm:test_vit", pretrained=False)
    second = models.load("timm:test_vit", pretrained=False)

    assert first.name == "timm:test_vit"
    assert not any(m.training for m in first.module.modules())
    assert first.labels == IMAGENET and first.labels[285] == "Egyptian cat"
    reference = timm.create_model("test_vit", pretrained=False).state_dict()
    state = first.module.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    weight = "patch_embed.proj.weight"
    assert not torch.equal(state[weight], second.module.state_dict()[weight]) and state[weight].std() > 0
    with torch.no_grad():
        assert first.module(torch.zeros(1, 3, *first.input_size)).shape == (1, 1000)


@pytest.mark.parametrize(
    ("name", "classes", "suffix"),
    [
        ("test_vit", 1000, ".pth"),
        ("test_vit", 1000, ".safetensors"),
        ("deit_tiny_distilled_patch16_224", 5, ".safetensors"),
    ],
)
def test_timm_weights_file_round_trip(tmp_path, name, classes, suffix):
    # deit_tiny_distilled has two classifiers (head, head_dist): the class count comes from the first.
    source = randomised(timm.create_model(name, pretrained=False, num_classes=classes))
    file = tmp_path / f"finetuned{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.state_dict()}, file)  # wrapped, as training scripts do
    else:
        save_safetensors(source, file)

    loaded = models.load(f"timm:{name}", weights=file)

    assert loaded.name == f"timm:{name}"
    assert_same_state(loaded.module, source)
    assert loaded.labels == (IMAGENET if classes == 1000 else [f"class {i}" for i in range(classes)])
    x = torch.randn(1, 3, *loaded.input_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), source(x), rtol=0, atol=0)


def test_timm_weights_with_a_labels_file(tmp_path):
    source = randomised(timm.create_model("test_vit", num_classes=3))
    file = save_safetensors(source, tmp_path / "three.safetensors")
    (tmp_path / "labels.txt").write_text("ant\nbee\ncricket\n")

    loaded = models.load("timm:test_vit", weights=file, labels=tmp_path / "labels.txt")

    assert loaded.labels == ["ant", "bee", "cricket"]
    with pytest.raises(GradCAMError) as excinfo:
        (tmp_path / "two.txt").write_text("ant\nbee\n")
        models.load("timm:test_vit", weights=file, labels=tmp_path / "two.txt")
    one_line(excinfo, "two.txt", "2 names", "3 classes")


@pytest.mark.parametrize(
    ("other", "words"),
    [
        ("test_resnet", ["no 'head.weight' entry"]),  # another family: no classifier under that name
        ("vit_tiny_patch16_224", ["does not fit", "shape mismatch"]),  # same names, other shapes
    ],
)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_of_another_architecture_are_one_line(tmp_path, other, words, suffix):
    file = tmp_path / f"other{suffix}"
    module = timm.create_model(other)
    torch.save(module.state_dict(), file) if suffix == ".pth" else save_safetensors(module, file)

    with pytest.raises(GradCAMError) as excinfo:
        models.load("timm:test_vit", weights=file)
    one_line(excinfo, str(file), *words)


class _Touch:
    """Pickles as a call to Path.touch: loading the file with code execution would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_timm_weights_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    file = tmp_path / "evil.pth"
    torch.save({**timm.create_model("test_vit").state_dict(), "extra": _Touch(marker)}, file)

    with pytest.raises(GradCAMError) as excinfo:
        models.load("timm:test_vit", weights=file)
    one_line(excinfo, str(file), "refused")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_corrupt_weights_files_are_one_line(tmp_path, suffix):
    file = tmp_path / f"corrupt{suffix}"
    file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json" if suffix == ".safetensors" else b"<html>")

    with pytest.raises(GradCAMError) as excinfo:
        models.load("timm:test_vit", weights=file)
    expected = "not a valid .safetensors file" if suffix == ".safetensors" else "not a PyTorch state dict"
    one_line(excinfo, str(file), expected)


# --------------------------------------------------------------------------------------------------
# timm: pretrained weights from the Hugging Face hub cache, offline


def test_timm_pretrained_from_the_hub_cache_is_exactly_the_cached_file(tmp_path, offline):
    # vit_tiny's config has custom_load=True (timm's .npz loader for the original URL): the hub file is a
    # plain state dict, loaded as timm's hub path loads it.
    source = randomised(timm.create_model("vit_tiny_patch16_224"))
    cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224")
    assert cfg.hf_hub_id == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" and cfg.custom_load
    files = {"model.safetensors": save_safetensors(source, tmp_path / "model.safetensors")}
    put_in_hub_cache(offline, cfg.hf_hub_id, files)

    loaded = models.load("timm:vit_tiny_patch16_224")

    assert loaded.name == "timm:vit_tiny_patch16_224" and loaded.labels == IMAGENET
    assert not any(m.training for m in loaded.module.modules())
    assert_same_state(loaded.module, source)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), source(x), rtol=0, atol=0)


def test_timm_pretrained_tag_and_pytorch_model_bin_fallback(tmp_path, offline):
    source = randomised(timm.create_model("test_resnet"))
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    put_in_hub_cache(
        offline, "timm/test_resnet.r160_in1k", {"pytorch_model.bin": tmp_path / "pytorch_model.bin"}
    )

    loaded = models.load("timm:test_resnet.r160_in1k")

    assert loaded.name == "timm:test_resnet.r160_in1k"
    assert_same_state(loaded.module, source)
    assert loaded.input_size == (160, 160)


def test_timm_pretrained_known_only_by_url_from_the_torch_hub_cache(tmp_path):
    cfg = timm.models.get_pretrained_cfg("gcvit_xxtiny")
    assert not cfg.hf_hub_id and cfg.url
    source = randomised(timm.create_model("gcvit_xxtiny"))
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(source.state_dict(), folder / cfg.url.rsplit("/", 1)[-1])

    loaded = models.load("timm:gcvit_xxtiny")

    assert_same_state(loaded.module, source)


def test_timm_pretrained_missing_from_the_cache_is_one_line(offline):
    with pytest.raises(GradCAMError) as excinfo:
        models.load("timm:vit_tiny_patch16_224")
    one_line(
        excinfo,
        "timm:vit_tiny_patch16_224",
        "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        str(offline),
        "--random-weights",
    )


def test_timm_corrupt_file_in_the_cache_is_one_line(tmp_path, offline):
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    snapshot = put_in_hub_cache(
        offline, "timm/test_vit.r160_in1k", {"model.safetensors": tmp_path / "model.safetensors"}
    )

    with pytest.raises(GradCAMError) as excinfo:
        models.load("timm:test_vit")
    one_line(excinfo, str(snapshot / "model.safetensors"), "timm:test_vit", "cannot be loaded")


# --------------------------------------------------------------------------------------------------
# hf: transformers classifiers from a folder or the hub cache


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A tiny random ViT classifier and its image processor, saved with save_pretrained."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny-vit")
    labels = {0: "cat", 1: "dog", 2: "bird"}
    config = ViTConfig(**tiny_vit_options(id2label=labels, label2id={v: k for k, v in labels.items()}))
    torch.manual_seed(3)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model


def test_hf_folder_gives_the_saved_weights_and_labels(tiny_vit, coffee):
    folder, model = tiny_vit

    loaded = models.load(f"hf:{folder}")

    assert loaded.name == f"hf:{folder}"
    assert loaded.labels == ["cat", "dog", "bird"]
    assert loaded.input_size == (32, 32)
    assert not any(m.training for m in loaded.module.modules())
    assert_same_state(loaded.module, model)
    x = loaded.preprocess(coffee)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x).logits, model(x).logits, rtol=0, atol=0)


def test_hf_random_weights_keep_the_architecture_and_labels(tiny_vit):
    folder, model = tiny_vit

    loaded = models.load(f"hf:{folder}", pretrained=False)

    assert loaded.labels == ["cat", "dog", "bird"]
    state, saved = loaded.module.state_dict(), model.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in saved.items()}
    assert not torch.equal(state["classifier.weight"], saved["classifier.weight"])
    assert not any(m.training for m in loaded.module.modules())


def _processors():
    from transformers import ViTImageProcessor

    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    return [
        ViTImageProcessor(size={"height": 32, "width": 32}),  # warp, bilinear, mean/std 0.5
        # CLIP-style: shorter side to 40 (bicubic), central 32x32, ImageNet statistics
        ViTImageProcessor(
            size={"shortest_edge": 40}, do_center_crop=True, crop_size=32, resample=3, **imagenet
        ),
        # no normalisation, rescale to 0..2: mean and std are folded into a Preprocess
        ViTImageProcessor(size={"height": 24, "width": 40}, do_normalize=False, rescale_factor=2 / 255),
    ]


@pytest.mark.parametrize("index", range(3))
def test_hf_preprocess_matches_the_image_processor(index, coffee, cat):
    """Against the saved processor's own pixel_values. transformers 5's ViTImageProcessor resizes uint8
    tensors with torchvision and rounds to uint8, where a Preprocess resizes with PIL (as transformers'
    PIL backend does, and as transformers 4's ViTImageProcessor did): the two differ by at most one grey
    level in a few pixels. So: at most one grey level anywhere, and a mean difference far below it; the
    PIL backend, where present, must agree to float rounding."""
    from gradcam.models.hf_zoo import preprocess_from_processor

    processor = _processors()[index]
    preprocess = preprocess_from_processor(processor, "hf:test")
    scale = 255 * float(processor.rescale_factor)
    grey = (torch.tensor(processor.image_std) if processor.do_normalize else torch.ones(3)) / scale
    for image in (coffee, cat):
        wanted = processor(images=image, return_tensors="pt").pixel_values[0]
        actual = preprocess(image)
        assert actual.shape == wanted.shape and preprocess.size == tuple(wanted.shape[1:])
        levels = (actual - wanted).abs() / grey.view(3, 1, 1)  # in grey levels of the 0..255 image
        assert float(levels.max()) <= 1 + 1e-3
        assert float(levels.mean()) < 0.02
    try:
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    except ImportError:  # transformers 4: ViTImageProcessor is the PIL one, compared above
        return
    pil = ViTImageProcessorPil(**processor.to_dict())
    for image in (coffee, cat):
        wanted = pil(images=image, return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(preprocess(image), wanted, rtol=0, atol=1e-5)


def test_hf_unsupported_processor_is_one_line():
    from transformers import ViTImageProcessor

    from gradcam.models.hf_zoo import preprocess_from_processor

    with pytest.raises(GradCAMError) as excinfo:
        preprocess_from_processor(ViTImageProcessor(size={"shortest_edge": 40}), "hf:x")
    one_line(excinfo, "hf:x", "shorter side to 40 without a crop")
    with pytest.raises(GradCAMError) as excinfo:
        preprocess_from_processor(ViTImageProcessor(do_resize=False), "hf:x")
    one_line(excinfo, "hf:x", "does not resize")


def test_hf_repo_id_from_the_hub_cache(tiny_vit, offline):
    folder, model = tiny_vit
    put_in_hub_cache(offline, "org/tiny", {f.name: f for f in sorted(folder.iterdir())})

    loaded = models.load("hf:org/tiny")

    assert loaded.name == "hf:org/tiny" and loaded.labels == ["cat", "dog", "bird"]
    assert_same_state(loaded.module, model)
    assert models.check("hf:org/tiny") == "hf:org/tiny"


def test_hf_repo_id_missing_from_the_cache_is_one_line(offline):
    with pytest.raises(GradCAMError) as excinfo:
        models.load("hf:org/absent")
    one_line(excinfo, "hf:org/absent", "org/absent", str(offline), "nothing is downloaded")


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("timm:nosuchmodel", ["'timm:nosuchmodel' not found", "timm.list_models()"]),
        ("timm:vit_tiny_patch16_22", ["did you mean", "timm:vit_tiny_patch16_224"]),
        ("timm:resnet18.nosuch", ["no pretrained tag 'nosuch'", "a1_in1k"]),
        ("timm:", ["names nothing"]),
        ("timm:hf-hub:org/model", ["not found"]),
        ("hf:/no/such/folder", ["not found", "no such folder"]),
        ("hf:", ["names nothing"]),
    ],
)
def test_bad_zoo_names_are_one_line_with_hints(name, words):
    for call in (models.check, models.load):
        with pytest.raises(GradCAMError) as excinfo:
            call(name)
        one_line(excinfo, f"model '{name}'", *words)


def test_hf_folder_without_a_processor_and_weights_option_are_one_line(tiny_vit, tmp_path):
    folder, _ = tiny_vit
    with pytest.raises(GradCAMError) as excinfo:
        models.load(f"hf:{folder}", weights=tmp_path / "w.pth")
    one_line(excinfo, "--weights", "come from the folder")

    partial = tmp_path / "no-processor"
    partial.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folder / name, partial / name)
    with pytest.raises(GradCAMError) as excinfo:
        models.load(f"hf:{partial}")
    one_line(excinfo, f"hf:{partial}", "image processor")


# --------------------------------------------------------------------------------------------------
# the missing extra, the registry, the front ends


@pytest.mark.parametrize(("module", "name"), [("timm", "timm:resnet18"), ("transformers", "hf:org/tiny")])
def test_without_the_zoo_extra_prefixed_names_say_what_to_install(monkeypatch, module, name):
    monkeypatch.setitem(sys.modules, module, None)  # `import timm` now raises ImportError

    for call in (models.check, models.load):
        with pytest.raises(GradCAMError) as excinfo:
            call(name)
        one_line(excinfo, name, module, "pip install 'gradcam[zoo]'")
    assert not models.zoo_installed()
    assert "pip install 'gradcam[zoo]'" in models.zoo_note()
    assert models.check("resnet18") == "resnet18"  # plain names are unaffected


def test_available_and_names_stay_bundled_and_torchvision():
    assert [entry.name for entry in models.available()] == models.names()
    assert not [n for n in models.names() if ":" in n]
    note = models.zoo_note()
    assert "timm:<name>" in note and "hf:<folder|repo id>" in note and "installed" in note
    assert models.zoo_installed()


def test_model_pool_checks_prefixed_names_without_loading_them():
    pool = ModelPool(["timm:vit_tiny_patch16_224", "efficientnet-lite0"])
    assert pool.names == ["timm:vit_tiny_patch16_224", "efficientnet-lite0"] and pool.loaded() == []
    with pytest.raises(GradCAMError) as excinfo:
        ModelPool(["timm:nosuchmodel"])
    one_line(excinfo, "timm:nosuchmodel")


def test_cli_models_lists_the_zoo_line():
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.stderr
    assert "timm:<name>" in result.stdout and "hf:<folder|repo id>" in result.stdout
    assert "efficientnet-lite0" in result.stdout


def test_cli_layers_of_a_timm_model_with_random_weights():
    result = CliRunner().invoke(app, ["layers", "--model", "timm:vit_tiny_patch16_224", "--random-weights"])
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["layers", "--model", "timm:nosuchmodel", "--random-weights"],
        ["layers", "--model", "timm:vit_tiny_patch16_224"],  # pretrained, not in the (empty) cache
        ["layers", "--model", "hf:/no/such/folder"],
        ["serve", "--model", "timm:nosuchmodel"],
    ],
)
def test_cli_bad_zoo_models_exit_2_with_one_line(args):
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert args[2] in result.stderr
