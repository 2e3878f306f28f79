"""Grad-CAM on vision transformers: exact against pytorch-grad-cam with the matching ``reshape_transform``
and against maps derived by hand with hooks and autograd; the automatic layer; layouts and refusals.

Random weights and small configs throughout (no download); each model is built once per module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torchvision
from pytorch_grad_cam import GradCAM as OracleGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as OracleGradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

import gradcam
from conftest import tiny_vit_options
from gradcam import layouts
from gradcam.explanation import normalise, upsample
from gradcam.layers import list_layers
from gradcam.metrics.saliency import make_saliency
from gradcam.metrics.sanity import cascading_randomisation
from gradcam.targets import model_logits


def _timm(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _hf_vit(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    config = ViTConfig(**tiny_vit_options(image_size=64, patch_size=16, num_labels=5, **kwargs))
    return ViTForImageClassification(config).eval()


def _tokens_to_map(prefix: int, grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """pytorch-grad-cam's ViT reshape_transform, written out for each prefix and grid."""

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        patches = tensor[:, prefix:, :]
        return patches.reshape(tensor.shape[0], grid[0], grid[1], tensor.shape[2]).permute(0, 3, 1, 2)

    return transform


def _channels_last_to_map(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


class _Logits(nn.Module):
    """What a pytorch-grad-cam user wraps a Hugging Face model in: a module returning the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def _oracle(
    model: nn.Module,
    layer: str,
    transform: Callable | None,
    x: torch.Tensor,
    classes: list[int],
    method: type = OracleGradCAM,
) -> np.ndarray:
    """ReLU of pytorch-grad-cam's un-normalised map (what it computes before min-max scaling and cv2
    resizing), on a copy of the model (it fills parameter gradients and switches the model to eval)."""
    reference = copy.deepcopy(model)
    module = reference.get_submodule(layer)
    cam = method(model=reference, target_layers=[module], reshape_transform=transform)
    try:
        outputs = cam.activations_and_grads(x)
        targets = [ClassifierOutputTarget(c) for c in classes]
        reference.zero_grad()
        sum(t(o) for t, o in zip(targets, outputs, strict=True)).backward()
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(x, module, targets, activations, gradients)
    finally:
        cam.activations_and_grads.release()
    return np.maximum(raw, 0)


def _close(ours: torch.Tensor, reference: np.ndarray) -> None:
    assert reference.max() > 0, "the reference map is all zero: the comparison would be vacuous"
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-4, atol=1e-4 * float(reference.max()))


def _random_head(model: nn.Module, head: str) -> nn.Module:
    """torchvision initialises a ViT's head to zeros, so every gradient would be zero: re-draw it."""
    torch.manual_seed(1)
    nn.init.normal_(model.get_submodule(head).weight, std=0.5)
    return model


# One model per family, shared by the tests below: (model, input, expected automatic layer, oracle layout).
CASES = {
    "timm-vit": lambda: (
        _timm("vit_tiny_patch16_224", img_size=64, depth=3),
        torch.randn(2, 3, 64, 64),
        "blocks.2.norm1",
        _tokens_to_map(1, (4, 4)),
    ),
    "timm-vit-384": lambda: (
        _timm("vit_tiny_patch16_384", depth=2),
        torch.randn(1, 3, 384, 384),
        "blocks.1.norm1",
        _tokens_to_map(1, (24, 24)),
    ),
    "timm-deit-distilled": lambda: (
        _timm("deit_tiny_distilled_patch16_224", img_size=64, depth=2),
        torch.randn(2, 3, 64, 64),
        "blocks.1.norm1",
        _tokens_to_map(2, (4, 4)),
    ),
    "timm-vit-registers": lambda: (
        _timm("vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=4),
        torch.randn(2, 3, 64, 64),
        "blocks.1.norm1",
        _tokens_to_map(5, (4, 4)),
    ),
    "timm-swin": lambda: (
        _timm("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1, 1, 2), num_heads=(1, 1, 1, 1)),
        torch.randn(1, 3, 224, 224),
        "layers.3.blocks.1.norm1",
        _channels_last_to_map,
    ),
    "torchvision-vit-b16": lambda: (
        _random_head(torchvision.models.vit_b_16().eval(), "heads.head"),
        torch.randn(1, 3, 224, 224),
        "encoder.layers.encoder_layer_11.ln_1",
        _tokens_to_map(1, (14, 14)),
    ),
    "hf-vit": lambda: (
        _hf_vit(),
        torch.randn(2, 3, 64, 64),
        "vit.layers.1.layernorm_before",
        _tokens_to_map(1, (4, 4)),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple:
    torch.manual_seed(0)
    return (request.param, *CASES[request.param]())


def test_gradcam_matches_pytorch_grad_cam_with_its_reshape_transform(case: tuple) -> None:
    """Also checks the automatic layer: the input of the last block's attention."""
    name, model, x, layer, transform = case
    classes = [3, 1][: len(x)]
    ours = gradcam.GradCAM(model)(x, classes)
    assert ours.layer == layer
    oracle_model = _Logits(model) if name.startswith("hf") else model
    oracle_layer = f"model.{layer}" if name.startswith("hf") else layer
    _close(ours.raw, _oracle(oracle_model, oracle_layer, transform, x, classes))
    assert ours.maps.shape == (len(x), *x.shape[2:])


def test_gradcam_plus_plus_on_tokens_matches_the_closed_form_and_the_peer() -> None:
    """Grad-CAM++ (eq. 19) written out in numpy from hooked A and autograd G; pytorch-grad-cam agrees once
    the gradients are large enough for the 1e-7 it adds to the denominator not to matter (on a ViT's
    small token gradients that constant changes its map by about 2x here; we add none)."""
    model, x, layer, transform = CASES["timm-vit"]()
    classes = [0, 2]
    kept = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: kept.__setitem__("a", o))
    scores = model(x)[torch.arange(2), classes]
    handle.remove()
    (grads,) = torch.autograd.grad(scores.sum(), kept["a"])
    a = transform(kept["a"].detach()).double().numpy()
    g = transform(grads).double().numpy()
    denominator = 2 * g**2 + a.sum(axis=(2, 3), keepdims=True) * g**3
    alpha = np.divide(g**2, denominator, out=np.zeros_like(g), where=denominator != 0)
    weights = (alpha * np.maximum(g, 0)).sum(axis=(2, 3))
    expected = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)
    _close(gradcam.GradCAMPlusPlus(model)(x, classes).raw, expected.astype(np.float32))

    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.head.weight.mul_(1e4)
        scaled.head.bias.mul_(1e4)
    ours = gradcam.GradCAMPlusPlus(scaled)(x, classes).raw
    _close(ours, _oracle(scaled, layer, transform, x, classes, OracleGradCAMPlusPlus))


def _hand_gradcam(
    model: nn.Module, layer: str, x: torch.Tensor, classes: list[int], prefix: int
) -> torch.Tensor:
    """Grad-CAM derived in the test: a forward hook keeps the layer's tokens, autograd gives their
    gradient, both are placed on the patch grid by hand and eq. 1-2 of the paper applied."""
    kept = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: kept.__setitem__("a", o))
    try:
        logits = model_logits(model(x))
    finally:
        handle.remove()
    tokens = kept["a"]
    scores = logits[torch.arange(len(classes)), classes]
    (grads,) = torch.autograd.grad(scores.sum(), tokens)
    side = int(round((tokens.shape[1] - prefix) ** 0.5))
    a = tokens.detach()[:, prefix:].reshape(len(x), side, side, -1).permute(0, 3, 1, 2)
    g = grads[:, prefix:].reshape(len(x), side, side, -1).permute(0, 3, 1, 2)
    return torch.relu((g.mean(dim=(2, 3))[:, :, None, None] * a).sum(dim=1))


@pytest.mark.parametrize("which", ["torchvision-vit-b16", "hf-vit"])
def test_gradcam_matches_a_hand_derived_map(which: str) -> None:
    model, x, layer, _ = CASES[which]()
    classes = [4, 0][: len(x)]
    expected = _hand_gradcam(model, layer, x, classes, prefix=1)
    _close(gradcam.GradCAM(model, layer)(x, classes).raw, expected.numpy())


def test_final_norm_of_a_class_token_model_gives_a_zero_map() -> None:
    """Why the automatic choice is never the final norm: the head reads only the class token there."""
    model, x, _, _ = CASES["timm-vit"]()
    assert torch.count_nonzero(gradcam.GradCAM(model, "norm")(x).raw) == 0
    assert torch.count_nonzero(gradcam.GradCAM(model)(x).raw) > 0


def test_all_targets_and_topk_on_tokens_equal_single_calls() -> None:
    model, x, _, _ = CASES["timm-deit-distilled"]()
    cam = gradcam.GradCAM(model)
    top = cam(x, topk=3)
    assert top.raw.shape == (3, 2, 4, 4)
    for row in range(3):
        torch.testing.assert_close(top.raw[row], cam(x, top.targets[row]).raw, rtol=1e-5, atol=1e-7)


def test_score_and_ablation_cam_on_tokens_match_a_hand_ablation() -> None:
    """Ablation-CAM on tokens: feature k is zeroed at the patch tokens (prefix tokens untouched), with the
    ablations written in the test as a forward hook on the layer."""
    model = _timm("vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=12, num_heads=2)
    x = torch.randn(1, 3, 32, 32)
    layer = "blocks.0.norm1"
    ours = gradcam.AblationCAM(model)(x, [1])
    module = model.get_submodule(layer)
    with torch.no_grad():
        y = model(x)[0, 1]
        kept = {}
        handle = module.register_forward_hook(lambda m, i, o: kept.__setitem__("a", o.clone()))
        model(x)
        handle.remove()
        weights = []
        for k in range(12):

            def ablate(m, i, o, k=k):
                o = o.clone()
                o[:, 1:, k] = 0
                return o

            handle = module.register_forward_hook(ablate)
            weights.append(float((y - model(x)[0, 1]) / y.abs()))
            handle.remove()
    a = kept["a"][:, 1:].reshape(1, 2, 2, 12).permute(0, 3, 1, 2)
    expected = torch.relu((torch.tensor(weights)[None, :, None, None] * a).sum(dim=1))
    _close(ours.raw, expected.numpy())
    tail_free = gradcam.AblationCAM(model)
    tail_free._use_tail = False
    torch.testing.assert_close(tail_free(x, [1]).raw, ours.raw)
    assert gradcam.ScoreCAM(model)(x, [1]).raw.shape == (1, 2, 2)


def test_explicit_layouts_agree_with_the_decided_one() -> None:
    model, x, layer, transform = CASES["timm-vit-registers"]()
    decided = gradcam.GradCAM(model)(x).raw
    for spec in ("tokens", "tokens:4x4+5", layouts.Layout.tokens((4, 4), 5), transform):
        torch.testing.assert_close(gradcam.GradCAM(model, layout=spec)(x).raw, decided)
    with pytest.raises(gradcam.GradCAMError, match=r"21 tokens; the layout's 1 prefix \+ 4x4 grid"):
        gradcam.GradCAM(model, layout="tokens:4x4+1")(x)
    with pytest.raises(gradcam.GradCAMError, match="layout 'sideways' not understood"):
        gradcam.GradCAM(model, layout="sideways")


def test_attention_internals_and_windows_are_refused_in_one_line() -> None:
    model, x, _, _ = CASES["timm-vit"]()
    refused = r"'blocks.2.attn.k_norm' outputs shape \(2, 3, 17, 64\): it is computed inside an attention"
    with pytest.raises(gradcam.GradCAMError, match=refused):
        gradcam.GradCAM(model, "blocks.2.attn.k_norm")(x)
    swin, sx, _, _ = CASES["timm-swin"]()
    with pytest.raises(gradcam.GradCAMError, match=r"leading axis is not the batch of 1") as error:
        gradcam.GradCAM(swin, "layers.0.blocks.0.attn")(sx)
    assert "\n" not in str(error.value)
    hf, hx, _, _ = CASES["hf-vit"]()
    with pytest.raises(gradcam.GradCAMError, match="returns tuple; expected a float tensor"):
        gradcam.GradCAM(hf, "vit.layers.1.attention")(hx)


class _Tokens(nn.Module):
    """A token model that declares no patch grid: a 4x4 patchify conv, one token mixer, a mean head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mix(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(torch.relu(tokens).mean(dim=1))


def test_tokens_without_a_patch_grid_are_refused() -> None:
    model = _Tokens().eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(gradcam.GradCAMError, match=r"declares no patch grid.*tokens:HxW\+PREFIX"):
        gradcam.GradCAM(model, "mix")(x)
    explicit = gradcam.GradCAM(model, "mix", layout="tokens:4x4+0")(x)
    by_hand = gradcam.GradCAM(model, "mix", layout=lambda t: t.reshape(len(t), 4, 4, 8).permute(0, 3, 1, 2))
    torch.testing.assert_close(explicit.raw, by_hand(x).raw)
    _close(explicit.raw, _hand_map(model, "mix", x, _tokens_to_map(0, (4, 4))).numpy())


def test_evaluation_and_sanity_take_the_layout_too() -> None:
    model = _Tokens().eval()
    x, targets = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    expected = gradcam.GradCAM(model, "mix", layout="tokens:4x4+0")(x, targets).raw
    saliency = make_saliency("gradcam", model, layer="mix", layout="tokens:4x4+0")
    torch.testing.assert_close(saliency(x, targets), expected)
    with pytest.raises(gradcam.GradCAMError, match="declares no patch grid"):
        make_saliency("gradcam", model, layer="mix")(x, targets)
    result = cascading_randomisation(model, x, targets, ["gradcam"], layer="mix", layout="tokens:4x4+0")
    original = result.methods["gradcam"][0].maps
    torch.testing.assert_close(original, normalise(upsample(expected, (16, 16)).abs()))


def test_layouts_decide_from_module_type_and_geometry() -> None:
    conv, norm, relu = nn.Conv2d(7, 7, 1), nn.LayerNorm(7), nn.ReLU()
    plain = layouts.ModelFacts()

    def kind(module: nn.Module, shape: tuple[int, ...], size: tuple[int, int], facts=plain) -> str:
        return layouts.decide(nn.Identity(), "x", module, shape, size, facts=facts).kind

    # Both readings fit a 14x14 input: the producing module decides.
    assert kind(conv, (1, 7, 7, 7), (14, 14)) == "channels-first"
    assert kind(norm, (1, 7, 7, 7), (14, 14)) == "channels-last"
    # Only one reading fits: the geometry decides.
    assert kind(relu, (1, 7, 7, 768), (224, 224)) == "channels-last"
    assert kind(relu, (1, 768, 7, 7), (224, 224)) == "channels-first"
    # Ambiguous without a module fact: a CNN follows PyTorch's convention, a transformer is refused.
    assert kind(relu, (1, 7, 7, 7), (14, 14)) == "channels-first"
    vit = layouts.ModelFacts(patch=(2, 2), prefix=1)
    with pytest.raises(gradcam.GradCAMError, match="both channels-first and channels-last fit"):
        kind(relu, (1, 7, 7, 7), (14, 14), vit)
    with pytest.raises(gradcam.GradCAMError, match="neither axes 2-3 nor 1-2"):
        kind(relu, (1, 6, 197, 64), (224, 224))
    # Tokens: declared prefix, derived prefix, and a later stage of a hierarchical model.
    assert layouts.decide(nn.Identity(), "t", relu, (1, 50, 8), (14, 14), facts=vit).grid == (7, 7)
    derived = layouts.ModelFacts(patch=(2, 2))
    assert layouts.decide(nn.Identity(), "t", relu, (1, 51, 8), (14, 14), facts=derived).prefix == 2
    stage = layouts.decide(nn.Identity(), "t", relu, (1, 16, 8), (14, 14), facts=derived)
    assert (stage.grid, stage.prefix) == ((4, 4), 0)


def test_layer_listing_shows_layout_and_grid() -> None:
    model, x, chosen, _ = CASES["timm-deit-distilled"]()
    infos = {info.name: info for info in list_layers(model, x)}
    assert infos[chosen].layout == "tokens 2+4x4" and infos[chosen].grid == (4, 4)
    assert infos[chosen].attention_input
    assert infos["blocks.1.attn.q_norm"].layout is None and "inside an attention module" in infos[
        "blocks.1.attn.q_norm"
    ].reason
    swin, sx, swin_layer, _ = CASES["timm-swin"]()
    swin_infos = {info.name: info for info in list_layers(swin, sx)}
    assert swin_infos[swin_layer].layout == "channels-last 7x7"
    assert swin_infos["layers.3.blocks.1.norm2"].layout == "tokens 0+7x7"


def test_model_state_is_left_as_found_also_on_error() -> None:
    model, x, _, _ = CASES["timm-vit"]()
    model.train()
    model.blocks[1].eval()
    model.blocks[0].attn.fused_attn = False
    fused = [block.attn.fused_attn for block in model.blocks]
    training = [m.training for m in model.modules()]
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        under_no_grad = gradcam.GradCAM(model)(x).raw
    with torch.inference_mode():
        under_inference = gradcam.GradCAM(model)(x).raw
    torch.testing.assert_close(under_no_grad, under_inference)
    with pytest.raises(gradcam.GradCAMError):
        gradcam.GradCAM(model, "blocks.2.attn.q_norm")(x)
    assert [block.attn.fused_attn for block in model.blocks] == fused
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_inputs_are_not_modified_in_place() -> None:
    model, x, _, _ = CASES["hf-vit"]()
    before = x.clone()
    gradcam.GradCAM(model)(x)
    assert torch.equal(x, before)
    assert model.config._attn_implementation in ("sdpa", "eager")


def test_model_outputs_follow_one_rule() -> None:
    logits = torch.randn(2, 3)
    assert model_logits(logits) is logits
    assert model_logits({"logits": logits, "aux": 1}) is logits
    assert model_logits((logits, torch.zeros(1))) is logits
    hf_output = _hf_vit()(torch.randn(2, 3, 64, 64))
    assert model_logits(hf_output, 2) is hf_output.logits
    with pytest.raises(gradcam.GradCAMError, match="model returned dict with keys boxes; expected logits"):
        model_logits({"boxes": logits})
    with pytest.raises(gradcam.GradCAMError, match=r"logits of shape \(3, classes\), got \(2, 3\)"):
        model_logits(logits, 3)


def _hand_map(model: nn.Module, layer: str, x: torch.Tensor, to_map: Callable) -> torch.Tensor:
    """Grad-CAM by hand for any layout: hook the layer, autograd the top-1 score, re-index with ``to_map``."""
    kept = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: kept.__setitem__("a", o))
    try:
        logits = model_logits(model(x))
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(logits.max(dim=1).values.sum(), kept["a"])
    a, g = to_map(kept["a"].detach()), to_map(grads)
    return torch.relu((g.mean(dim=(2, 3))[:, :, None, None] * a).sum(dim=1))


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# (loader, input size, automatic layer, the layer's layout as a hand-written re-indexing)
def _load(name: str) -> Callable:
    return lambda: gradcam.models.load(name, pretrained=False)


SWEEP = {
    "torchvision swin_t": (_load("swin_t"), 64, "features.7.1.norm1", _channels_last_to_map),
    "torchvision maxvit (small config)": (
        lambda: SimpleNamespace(module=torchvision.models.MaxVit(
            input_size=(64, 64), stem_channels=8, partition_size=2, block_channels=[8, 16],
            block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10,
        ).eval()),
        64,
        "blocks.1",
        _identity,
    ),
    "torchvision convnext_tiny": (_load("convnext_tiny"), 64, "features", _identity),
    "torchvision efficientnet_v2_s": (_load("efficientnet_v2_s"), 64, "features", _identity),
    "torchvision regnet_y_400mf": (_load("regnet_y_400mf"), 64, "trunk_output", _identity),
    "timm levit_128s": (_load("timm:levit_128s"), 224, "stages.2.blocks.2", _tokens_to_map(0, (4, 4))),
    "timm convnext_atto": (_load("timm:convnext_atto"), 64, "norm_pre", _identity),
    "timm vit without class token": (
        lambda: SimpleNamespace(
            module=_timm("vit_tiny_patch16_224", img_size=64, depth=2, class_token=False, global_pool="avg")
        ),
        64,
        "blocks.1.norm1",
        _tokens_to_map(0, (4, 4)),
    ),
}


@pytest.mark.parametrize("which", list(SWEEP))
def test_zoo_sweep_automatic_layer_and_exact_map(which: str) -> None:
    loader, size, layer, to_map = SWEEP[which]
    torch.manual_seed(0)
    module = loader().module
    for name in ("head", "heads.head", "classifier.5", "head.linear", "head.fc"):
        try:
            _random_head(module, name)  # some zoo heads start at zero: every gradient would be zero
        except AttributeError:
            continue
    x = torch.randn(1, 3, size, size)
    ours = gradcam.GradCAM(module)(x)
    assert ours.layer == layer
    _close(ours.raw, _hand_map(module, layer, x, to_map).numpy())


def test_aug_smooth_on_a_fixed_size_model_is_one_clear_line() -> None:
    model, x, _, _ = CASES["timm-vit"]()
    refused = r"aug_smooth: the model does not take the 1.25x-scaled 80x80 input \(Input height \(80\)"
    with pytest.raises(gradcam.GradCAMError, match=refused) as error:
        gradcam.GradCAM(model)(x, aug_smooth=True)
    assert "\n" not in str(error.value)
