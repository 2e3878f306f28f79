"""LeGrad against the formula written out with plain autograd, and against torchcam's LeGrad.

The method runs on the ORIGINAL (fused) model; the references run on unfused copies (timm with
``fused_attn = False``, Hugging Face eager with ``output_attentions``), so the attention capture is
checked too. torchcam's LeGrad reads torchvision's ``VisionTransformer`` only; given the score
projection LeGrad defines here (the model's head on each block's class token) its raw maps must be equal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradcam
from conftest import require
from gradcam import methods
from gradcam.errors import GradCAMError
from test_attention import assert_close, assert_same_state, hf_vit, images, snapshot, torchvision_vit, vit

timm = require("timm", "the reference models come from timm: pip install -e '.[zoo]'")
torchcam = require("torchcam", "the oracle is torchcam's LeGrad: pip install torchcam")

pytestmark = pytest.mark.usefixtures("one_thread")


def legrad_formula(probs: list[torch.Tensor], layer_scores: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """E = (1/L) sum_l mean_{heads, queries} ReLU(d s^l / d A^l), the patch keys, on the 4x4 grid (B,4,4)."""
    total = 0
    for attention, score in zip(probs, layer_scores, strict=True):
        (grad,) = torch.autograd.grad(score.sum(), attention, retain_graph=True)
        total = total + grad.relu().mean(dim=(1, 2))
    mean = total / len(probs)
    return mean[:, prefix:].reshape(-1, 4, 4)


def timm_formula(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model).eval()
    probs: list[torch.Tensor] = []
    tokens: list[torch.Tensor] = []
    for block in ref.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o))
        block.register_forward_hook(lambda m, i, o: tokens.append(o))
    logits = ref(x)
    picked = torch.arange(x.shape[0])
    scores = [ref.head(ref.norm(z)[:, 0])[picked, targets] for z in tokens]  # class-token head
    assert_close(scores[-1], logits[picked, targets], rtol=1e-5)  # s^L is the explained logit
    return legrad_formula(probs, scores, prefix=1)


def test_timm_fused_vit_matches_the_formula() -> None:
    model = vit()
    x = images()
    explanation = methods.LeGrad(model)(x, targets=[3, 5])
    expected = timm_formula(model, x, torch.tensor([3, 5]))
    assert explanation.raw.shape == (2, 4, 4)
    assert explanation.maps.shape == (2, 32, 32)
    assert explanation.raw.min() >= 0 and explanation.raw.std() > 0
    assert_close(explanation.raw, expected, rtol=1e-5)
    assert explanation.layer == "attention: blocks.0.attn..blocks.2.attn (3)"


def test_topk_rows_equal_single_target_calls() -> None:
    model = vit(depth=2)
    x = images()
    both = methods.LeGrad(model)(x, topk=2)
    for k in range(2):
        single = methods.LeGrad(model)(x, targets=both.targets[k].tolist())
        assert_close(both.raw[k], single.raw, rtol=1e-6)
    assert not torch.allclose(both.raw[0], both.raw[1])  # the map depends on the class


def hf_formula(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    ref = hf_vit("eager")
    ref.load_state_dict(model.state_dict())
    out = ref(pixel_values=x, output_attentions=True, output_hidden_states=True)
    picked = torch.arange(x.shape[0])
    hidden = out.hidden_states[1:]  # the output of each layer
    scores = [ref.classifier(ref.vit.layernorm(z)[:, 0])[picked, targets] for z in hidden]
    assert_close(scores[-1], out.logits[picked, targets], rtol=1e-5)
    return legrad_formula(list(out.attentions), scores, prefix=1)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hugging_face_vit_matches_the_formula(implementation: str) -> None:
    model = hf_vit(implementation)
    model.train()
    before = snapshot(model)
    x = images()
    explanation = methods.LeGrad(model)(x, targets=[1, 6])
    assert_same_state(model, before)
    assert model.config._attn_implementation == implementation
    assert_close(explanation.raw, hf_formula(model, x, torch.tensor([1, 6])), rtol=1e-5)


def test_hugging_face_teacher_eager_equals_sdpa() -> None:
    eager, sdpa = hf_vit("eager", teacher=True), hf_vit("sdpa", teacher=True)
    sdpa.load_state_dict(eager.state_dict())
    x = images()
    a, b = methods.LeGrad(eager)(x, topk=2), methods.LeGrad(sdpa)(x, topk=2)
    assert torch.equal(a.targets, b.targets)
    assert_close(a.raw, b.raw, rtol=1e-5)
    assert a.raw.shape == (2, 2, 4, 4) and a.raw.std() > 0


def test_equal_to_torchcam_legrad_on_torchvision_vit() -> None:
    from torchcam.methods import LeGrad as TorchcamLeGrad

    model = torchvision_vit()
    x = images()
    ours = methods.LeGrad(model)(x, targets=[2, 4])
    oracle = copy.deepcopy(model).eval()

    def class_token_head(tokens: torch.Tensor) -> torch.Tensor:  # the definition LeGrad uses here
        return oracle.heads(oracle.encoder.ln(tokens)[:, 0])

    layers = list(oracle.encoder.layers)
    with TorchcamLeGrad(oracle, layers, score_projection=class_token_head) as extractor:
        oracle(x)
        theirs = extractor([2, 4], normalized=False)[0]
    assert_close(ours.raw, theirs.detach(), rtol=1e-5)
    # torchcam's default projection averages all tokens (the official CLIP code's pooling): another score.
    with TorchcamLeGrad(oracle, layers) as extractor:
        oracle(x)
        pooled = extractor([2, 4], normalized=False)[0].detach()
    assert not torch.allclose(ours.raw, pooled, rtol=1e-3)


def test_model_state_is_left_as_found_also_on_error() -> None:
    model = vit(depth=2)
    model.train()
    model.blocks[1].eval()
    model.patch_embed.proj.weight.requires_grad_(False)
    calls = []
    model.blocks[0].register_forward_hook(lambda m, i, o: calls.append(1))
    before = snapshot(model)
    x = images()
    expected = methods.LeGrad(copy.deepcopy(model).eval())(x).raw
    assert_close(methods.LeGrad(model)(x).raw, expected, rtol=1e-6)
    assert_same_state(model, before)
    with pytest.raises(GradCAMError, match="out of range"):
        methods.LeGrad(model)(x, targets=99)  # fails after the forward, inside the capture and hooks
    assert_same_state(model, before)
    assert calls
    assert all(p.grad is None for p in model.parameters())
    assert all(block.attn.fused_attn for block in model.blocks)


def test_works_under_inference_mode() -> None:
    model = vit(depth=2)
    expected = methods.LeGrad(model)(images(), topk=2).raw
    with torch.inference_mode():
        got = methods.LeGrad(model)(images(), topk=2).raw
    assert_close(got, expected, rtol=1e-6)


def test_unreadable_models_and_options_are_refused_in_one_line() -> None:
    with pytest.raises(GradCAMError) as error:
        methods.LeGrad(gradcam_cnn())(torch.randn(1, 3, 16, 16))
    assert "\n" not in str(error.value) and "legrad" in str(error.value)
    with pytest.raises(GradCAMError, match="every attention block"):
        methods.LeGrad(vit(depth=2), "blocks.0")


def gradcam_cnn() -> nn.Module:
    layers = (nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return nn.Sequential(*layers)


def test_registry_entry() -> None:
    entry = methods.registry.get("legrad")
    assert entry.kind == "attention" and entry.build is methods.LeGrad
    assert methods.get("legrad") is methods.LeGrad
    assert "legrad" in methods.names()
    assert gradcam.Explanation is type(methods.LeGrad(vit(depth=1))(images(1)))


def one_block_formula(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """With one block, s^1 is the model's own logit: E = mean_{heads, queries} ReLU(d y^c / d A), taken from
    the model output with no head written here (the check of each model's readout), all keys (B, N)."""
    ref = copy.deepcopy(model).eval()
    probs: list[torch.Tensor] = []
    for module in ref.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        if type(module).__name__ == "Attention":
            module.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o))
    if hasattr(ref, "config"):
        out = ref(pixel_values=x, output_attentions=True)
        logits, probs = out.logits, list(out.attentions)
    else:
        logits = ref(x)
    assert len(probs) == 1
    score = logits[torch.arange(x.shape[0]), targets]
    (grad,) = torch.autograd.grad(score.sum(), probs[0])
    return grad.relu().mean(dim=(1, 2))


def one_block_models() -> dict[str, nn.Module]:
    import transformers

    from conftest import tiny_vit_options
    from test_attention import sharpen

    options = tiny_vit_options(num_labels=7, num_hidden_layers=1, attn_implementation="eager")
    return {
        "timm avg pool, no class token": vit(depth=1, global_pool="avg", class_token=False),
        "timm avg pool with class token": vit(depth=1, global_pool="avg"),
        "timm distilled": sharpen(
            timm.create_model(
                "deit_tiny_distilled_patch16_224",
                pretrained=False,
                img_size=32,
                patch_size=8,
                depth=1,
                num_classes=7,
            )
        ),
        "hugging face teacher": sharpen(
            transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**options))
        ),
    }


@pytest.mark.parametrize("name", list(one_block_models()))
def test_each_readout_scores_the_explained_logit(name: str) -> None:
    model = one_block_models()[name]
    x = images()
    explanation = methods.LeGrad(model)(x, targets=[0, 4])
    full = one_block_formula(model, x, torch.tensor([0, 4]))
    prefix = full.shape[-1] - 16
    assert_close(explanation.raw, full[:, prefix:].reshape(-1, 4, 4), rtol=1e-5)
    assert explanation.raw.std() > 0
