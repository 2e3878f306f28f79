"""Attention rollout and Chefer's generic attention relevance against hand-written unfused references.

Every numeric claim is checked against a reference computed here, straight from the formulas, on an
unfused copy of the model (timm with ``fused_attn = False``, torchvision's attention recomputed from
``in_proj_weight``, Hugging Face eager with ``output_attentions``), while the methods run on the ORIGINAL
fused model.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import gradcam
from conftest import require, tiny_vit_options
from gradcam import methods
from gradcam.attention import attention_modules, capture_attention, inside_attention, is_attention
from gradcam.errors import GradCAMError

timm = require("timm", "the reference models come from timm: pip install -e '.[zoo]'")
transformers = require("transformers", "the reference models come from transformers: pip install -e '.[zoo]'")

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# Models and references
# ---------------------------------------------------------------------------------------------------------


def sharpen(model: nn.Module) -> nn.Module:
    """Re-draw the weights so that attention is far from uniform (random init gives near-uniform maps)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, 1.2 / math.sqrt(module.in_features))
            if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                module.in_proj_weight.normal_(0, 1.2 / math.sqrt(module.embed_dim))
    return model.eval()


def vit(**kwargs) -> nn.Module:
    options = dict(pretrained=False, img_size=32, patch_size=8, depth=3, num_classes=7)
    return sharpen(timm.create_model("vit_tiny_patch16_224", **{**options, **kwargs}))


def deit_distilled() -> nn.Module:
    return sharpen(
        timm.create_model(
            "deit_tiny_distilled_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            depth=2,
            num_classes=7,
        )
    )


def torchvision_vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=7
    )
    return sharpen(model)


def hf_vit(implementation: str, teacher: bool = False) -> nn.Module:
    options = tiny_vit_options(num_labels=7, attn_implementation=implementation)
    if teacher:
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**options))
    else:
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**options))
    return sharpen(model)


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def timm_reference(model: nn.Module, x: torch.Tensor, targets: torch.Tensor):
    """(A_l, dy/dA_l) per block from an unfused deep copy: hooks on attn_drop, plain autograd."""
    ref = copy.deepcopy(model)
    probs: list[torch.Tensor] = []
    for name in attention_modules(ref):
        attn = ref.get_submodule(name)
        attn.fused_attn = False
        attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o))
    logits = ref(x)
    score = logits[torch.arange(len(x)), targets].sum()
    return [p.detach() for p in probs], [g.detach() for g in torch.autograd.grad(score, probs)], logits


class ReferenceMHA(nn.Module):
    """torchvision's self-attention written out from nn.MultiheadAttention's own parameters."""

    def __init__(self, mha: nn.MultiheadAttention, store: list[torch.Tensor]) -> None:
        super().__init__()
        self.mha, self.store = mha, store

    def forward(self, q, k, v, need_weights=False):
        batch, tokens, embed = q.shape
        heads = self.mha.num_heads
        qkv = F.linear(q, self.mha.in_proj_weight, self.mha.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, heads, embed // heads).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(embed // heads), dim=-1)
        self.store.append(probs)
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens, embed)
        return self.mha.out_proj(out), None


def torchvision_reference(model: nn.Module, x: torch.Tensor, targets: torch.Tensor):
    ref = copy.deepcopy(model)
    probs: list[torch.Tensor] = []
    for layer in ref.encoder.layers:
        layer.self_attention = ReferenceMHA(layer.self_attention, probs)
    logits = ref(x)
    score = logits[torch.arange(len(x)), targets].sum()
    return [p.detach() for p in probs], [g.detach() for g in torch.autograd.grad(score, probs)], logits


def hf_reference(model: nn.Module, x: torch.Tensor, targets: torch.Tensor):
    """From an eager copy with output_attentions (the returned tensors are the ones in the graph)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    out = ref(x, output_attentions=True)
    probs = list(out.attentions)
    score = out.logits[torch.arange(len(x)), targets].sum()
    return [p.detach() for p in probs], [g.detach() for g in torch.autograd.grad(score, probs)], out.logits


def rollout_reference(probs: list[torch.Tensor]) -> torch.Tensor:
    tokens = probs[0].shape[-1]
    eye = torch.eye(tokens)
    result = eye.repeat(probs[0].shape[0], 1, 1)
    for attention in probs:
        mixed = 0.5 * attention.mean(dim=1) + 0.5 * eye
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        result = mixed @ result
    return result


def chefer_reference(probs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    tokens = probs[0].shape[-1]
    result = torch.eye(tokens).repeat(probs[0].shape[0], 1, 1)
    for attention, grad in zip(probs, grads, strict=True):
        result = result + (grad * attention).clamp(min=0).mean(dim=1) @ result
    return result


def class_row(relevance: torch.Tensor, prefix: int, grid=(4, 4)) -> torch.Tensor:
    return relevance[:, 0, prefix:].reshape(-1, *grid)


def distilled_rows(relevance: torch.Tensor, prefix: int, grid=(4, 4)) -> torch.Tensor:
    return ((relevance[:, 0, prefix:] + relevance[:, 1, prefix:]) / 2).reshape(-1, *grid)


def patch_rows(relevance: torch.Tensor, prefix: int, grid=(4, 4)) -> torch.Tensor:
    return relevance[:, prefix:, prefix:].mean(dim=1).reshape(-1, *grid)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rtol * scale, f"max error {error:.3g} vs scale {scale:.3g}"


def not_uniform(probs: list[torch.Tensor]) -> None:
    """The test is meaningful: attention is far from uniform and gradients are not negligible."""
    tokens = probs[0].shape[-1]
    assert max(p.max().item() for p in probs) > 3.0 / tokens


def snapshot(model: nn.Module) -> dict:
    modules = {}
    for name, module in model.named_modules():
        modules[name] = (
            module.training,
            getattr(module, "fused_attn", None),
            dict(module._forward_hooks),
            dict(module._forward_pre_hooks),
            dict(module._backward_hooks),
            dict(module._forward_hooks_with_kwargs),
            dict(module._forward_hooks_always_called),
            dict(module._forward_pre_hooks_with_kwargs),
        )
    params = [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()]
    config = getattr(model, "config", None)
    return {
        "modules": modules,
        "params": params,
        "attn": getattr(config, "_attn_implementation", None),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["attn"] == before["attn"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


# ---------------------------------------------------------------------------------------------------------
# Numbers against the hand references
# ---------------------------------------------------------------------------------------------------------


def test_timm_fused_vit_matches_unfused_reference() -> None:
    model = vit()
    assert all(model.get_submodule(n).fused_attn for n in attention_modules(model))
    x = images()
    rollout = gradcam.AttentionRollout(model)(x)
    chefer = gradcam.GenericAttention(model)(x)
    targets = chefer.targets
    probs, grads, logits = timm_reference(model, x, targets)
    not_uniform(probs)
    assert torch.equal(targets, logits.argmax(dim=1))
    assert_close(rollout.raw, class_row(rollout_reference(probs), 1))
    assert_close(chefer.raw, class_row(chefer_reference(probs, grads), 1))
    assert_close(chefer.logits, logits.detach(), rtol=1e-5)
    assert_close(chefer.scores, logits.detach()[torch.arange(2), targets], rtol=1e-5)
    assert rollout.raw.shape == chefer.raw.shape == (2, 4, 4)
    assert chefer.layer == "attention: blocks.0.attn..blocks.2.attn (3)"
    assert chefer.method == "chefer" and rollout.method == "rollout"
    assert chefer.input_size == (32, 32) and chefer.maps.shape == (2, 32, 32)
    assert all(model.get_submodule(n).fused_attn for n in attention_modules(model))


def test_timm_without_class_token_reads_the_mean_of_the_patch_rows() -> None:
    model = vit(class_token=False, global_pool="avg")
    assert model.num_prefix_tokens == 0
    x = images()
    rollout = gradcam.AttentionRollout(model)(x)
    chefer = gradcam.GenericAttention(model)(x, targets=3)
    probs, grads, _ = timm_reference(model, x, torch.tensor([3, 3]))
    assert_close(rollout.raw, patch_rows(rollout_reference(probs), 0))
    assert_close(chefer.raw, patch_rows(chefer_reference(probs, grads), 0))


def test_timm_average_pool_with_class_token_reads_the_patch_rows() -> None:
    model = vit(global_pool="avg", depth=2)
    x = images()
    chefer = gradcam.GenericAttention(model)(x, targets=[1, 2])
    probs, grads, _ = timm_reference(model, x, torch.tensor([1, 2]))
    assert_close(chefer.raw, patch_rows(chefer_reference(probs, grads), 1))


def test_timm_distilled_reads_the_mean_of_class_and_distillation_rows() -> None:
    model = deit_distilled()
    x = images()
    rollout = gradcam.AttentionRollout(model)(x)
    chefer = gradcam.GenericAttention(model)(x)
    probs, grads, _ = timm_reference(model, x, chefer.targets)
    assert probs[0].shape[-1] == 18
    assert_close(rollout.raw, distilled_rows(rollout_reference(probs), 2))
    assert_close(chefer.raw, distilled_rows(chefer_reference(probs, grads), 2))


def test_torchvision_vit_through_multihead_attention() -> None:
    model = torchvision_vit()
    x = images()
    rollout = gradcam.AttentionRollout(model)(x)
    chefer = gradcam.GenericAttention(model)(x)
    probs, grads, logits = torchvision_reference(model, x, chefer.targets)
    with torch.no_grad():
        assert_close(logits.detach(), model(x), rtol=1e-5)  # the reference is the model
    not_uniform(probs)
    assert_close(rollout.raw, class_row(rollout_reference(probs), 1))
    assert_close(chefer.raw, class_row(chefer_reference(probs, grads), 1))
    assert_close(chefer.logits, logits.detach(), rtol=1e-5)
    assert chefer.layer == (
        "attention: encoder.layers.encoder_layer_0.self_attention.."
        "encoder.layers.encoder_layer_1.self_attention (2)"
    )


@pytest.mark.parametrize("teacher", [False, True])
def test_hugging_face_eager_and_sdpa_give_the_same_map(teacher: bool) -> None:
    sdpa = hf_vit("sdpa", teacher)
    eager = hf_vit("eager", teacher)
    eager.load_state_dict(sdpa.state_dict())
    x = images()
    maps = {}
    for model, implementation in ((sdpa, "sdpa"), (eager, "eager")):
        maps[implementation] = (
            gradcam.AttentionRollout(model)(x).raw,
            gradcam.GenericAttention(model)(x, targets=[2, 5]).raw,
        )
        assert model.config._attn_implementation == implementation
    probs, grads, _ = hf_reference(sdpa, x, torch.tensor([2, 5]))
    not_uniform(probs)
    readout = distilled_rows if teacher else class_row
    prefix = 2 if teacher else 1
    for implementation in ("sdpa", "eager"):
        rollout, chefer = maps[implementation]
        assert_close(rollout, readout(rollout_reference(probs), prefix))
        assert_close(chefer, readout(chefer_reference(probs, grads), prefix))
    assert_close(maps["sdpa"][1], maps["eager"][1])


# ---------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------


def test_topk_equals_single_target_calls() -> None:
    model = vit(depth=2)
    x = images()
    chefer = gradcam.GenericAttention(model)
    many = chefer(x, topk=2)
    assert many.raw.shape == (2, 2, 4, 4) and many.targets.shape == (2, 2)
    for row in range(2):
        one = chefer(x, many.targets[row].tolist())
        assert torch.equal(one.targets, many.targets[row])
        assert_close(many.raw[row], one.raw, rtol=1e-5)
        assert_close(many.scores[row], one.scores, rtol=1e-6)
    assert not torch.allclose(many.raw[0], many.raw[1])  # class-specific


def test_all_targets_and_grid_tensor() -> None:
    model = vit(depth=2)
    x = images()
    everything = gradcam.GenericAttention(model)(x, "all")
    assert everything.raw.shape == (7, 2, 4, 4) and everything.probs.shape == (7, 2)
    grid = torch.tensor([[4, 1], [0, 6]])
    chosen = gradcam.GenericAttention(model)(x, grid)
    assert torch.equal(chosen.targets, grid)
    assert_close(chosen.raw[0, 0], everything.raw[4, 0], rtol=1e-5)
    assert_close(chosen.raw[1, 1], everything.raw[6, 1], rtol=1e-5)
    rollout = gradcam.AttentionRollout(model)(x, topk=3)
    assert rollout.raw.shape == (3, 2, 4, 4)
    assert torch.equal(rollout.raw[0], rollout.raw[2])  # rollout ignores the class
    assert torch.equal(rollout.raw[0], gradcam.AttentionRollout(model)(x).raw)


def test_chunked_backward_matches_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    model = vit(depth=2)
    x = images()
    whole = gradcam.GenericAttention(model)(x, topk=3)
    monkeypatch.setattr("gradcam.methods.base.GRADIENT_CHUNK_ELEMENTS", 1)
    chunked = gradcam.GenericAttention(model)(x, topk=3)
    assert_close(chunked.raw, whole.raw, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The model and the caller are left as found
# ---------------------------------------------------------------------------------------------------------


def test_model_state_is_left_as_found_also_on_error() -> None:
    model = vit(depth=2)
    model.train()
    model.blocks[1].eval()
    model.patch_embed.proj.weight.requires_grad_(False)
    calls = []
    model.blocks[0].register_forward_hook(lambda m, i, o: calls.append(1))
    model.blocks[1].attn.register_forward_pre_hook(lambda m, a: None)
    before = snapshot(model)
    x = images()
    expected = gradcam.GenericAttention(copy.deepcopy(model).eval())(x).raw
    for method in (gradcam.AttentionRollout, gradcam.GenericAttention):
        assert_close(method(model)(x).raw, method(copy.deepcopy(model).eval())(x).raw, rtol=1e-6)
        assert_same_state(model, before)
        with pytest.raises(GradCAMError, match="out of range"):
            method(model)(x, targets=99)  # fails after the forward, inside the capture
        assert_same_state(model, before)
    assert_close(gradcam.GenericAttention(model)(x).raw, expected, rtol=1e-6)
    assert calls  # the user's hook still runs
    assert all(p.grad is None for p in model.parameters())


def test_hugging_face_state_is_left_as_found() -> None:
    model = hf_vit("sdpa")
    model.train()
    before = snapshot(model)
    gradcam.GenericAttention(model)(images(), topk=2)
    gradcam.AttentionRollout(model)(images())
    assert_same_state(model, before)
    assert model.config._attn_implementation == "sdpa"


def test_refusal_inside_the_forward_leaves_the_model_as_found() -> None:
    model = swin()
    model.train()
    before = snapshot(model)
    with pytest.raises(GradCAMError) as error:
        gradcam.GenericAttention(model)(torch.randn(1, 3, 56, 56))
    message = str(error.value)
    assert "\n" not in message and "window" in message and "leading axis" in message
    assert_same_state(model, before)
    with pytest.raises(GradCAMError, match="window"):
        gradcam.AttentionRollout(model)(torch.randn(2, 3, 56, 56))
    assert_same_state(model, before)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_works_under_no_grad_and_inference_mode(mode: str) -> None:
    model = vit(depth=2)
    x = images()
    expected = (gradcam.AttentionRollout(model)(x).raw, gradcam.GenericAttention(model)(x, topk=2).raw)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        inputs = images()
        got = (
            gradcam.AttentionRollout(model)(inputs).raw,
            gradcam.GenericAttention(model)(inputs, topk=2).raw,
        )
        assert not torch.is_grad_enabled()
        assert torch.is_inference_mode_enabled() == (mode == "inference_mode")
    assert torch.is_grad_enabled()
    assert_close(got[0], expected[0], rtol=1e-6)
    assert_close(got[1], expected[1], rtol=1e-6)


def test_the_input_tensor_is_not_modified() -> None:
    class InPlaceFirst(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.patch_embed = inner.patch_embed

        def forward(self, x):
            return self.inner(x.mul_(2))

    model = vit(depth=2)
    x = images().requires_grad_(False)
    kept, version = x.clone(), x._version
    gradcam.GenericAttention(model)(x)
    gradcam.AttentionRollout(model)(x)
    assert torch.equal(x, kept) and x._version == version
    wrapped = InPlaceFirst(model)
    wrapped.__class__.__module__ = "timm.models.wrapped"  # so model_facts reads its patch_embed
    gradcam.GenericAttention(wrapped)(x)
    assert torch.equal(x, kept) and x._version == version


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------


def swin() -> nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        depths=(1, 1),
        num_heads=(1, 2),
        embed_dim=16,
        num_classes=5,
    ).eval()


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_layer_and_smoothing_options_are_refused_in_one_line() -> None:
    model = vit(depth=2)
    for method in (gradcam.AttentionRollout, gradcam.GenericAttention):
        with pytest.raises(GradCAMError) as error:
            method(model, "blocks.0.attn")
        assert "every attention block" in one_line(error)
        with pytest.raises(GradCAMError) as error:
            method(model, model.blocks[0])
        assert "every attention block" in one_line(error)
        with pytest.raises(GradCAMError) as error:
            method(model)(images(), eigen_smooth=True)
        assert "eigen_smooth" in one_line(error)
        with pytest.raises(GradCAMError) as error:
            method(model)(images(), aug_smooth=True)
        assert "aug_smooth" in one_line(error)
        with pytest.raises(GradCAMError) as error:
            method(model, counterfactual=True)
        assert "counterfactual" in one_line(error)
        with pytest.raises(GradCAMError) as error:
            method(model, layout="tokens")
        assert "layout does not apply" in one_line(error)


def test_models_without_readable_attention_are_refused() -> None:
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(GradCAMError) as error:
        gradcam.GenericAttention(cnn)(images())
    assert "patch grid" in one_line(error)
    pooled = sharpen(
        timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            depth=1,
            num_classes=3,
            global_pool="map",
        )
    )
    with pytest.raises(GradCAMError) as error:
        gradcam.AttentionRollout(pooled)(images())
    assert "global_pool='map'" in one_line(error)


class TokenAttention(nn.Module):
    """A minimal attention module calling F.scaled_dot_product_attention with the given options."""

    def __init__(self, dim: int = 8, heads: int = 2, kv_heads: int | None = None, **options) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.options = heads, kv_heads or heads, options
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim // heads * self.kv_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q = self.q(x).reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(x).reshape(batch, tokens, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, **self.options)
        return out.transpose(1, 2).reshape(batch, tokens, dim)


def test_token_count_change_is_refused() -> None:
    class Shrinking(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = TokenAttention(), TokenAttention()

        def forward(self, x):
            return self.second(self.first(x)[:, ::2]).mean(dim=1)

    with capture_attention(Shrinking()) as (_, run), pytest.raises(GradCAMError) as error:
        run(torch.randn(2, 6, 8))
    assert "token count changes" in one_line(error)


def test_attention_module_whose_probabilities_cannot_be_seen_is_refused() -> None:
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads = 2
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    model = nn.Sequential(TokenAttention(), Opaque())
    with capture_attention(model) as (_, run), pytest.raises(GradCAMError) as error:
        run(torch.randn(2, 6, 8))
    assert "'1' ran but no attention probabilities" in one_line(error)


def test_multihead_attention_with_extra_keys_is_refused() -> None:
    class Extra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    with capture_attention(Extra()) as (_, run), pytest.raises(GradCAMError) as error:
        run(torch.randn(2, 5, 8))
    assert "bias_k" in one_line(error)


# ---------------------------------------------------------------------------------------------------------
# The explicit attention is the fused one
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"is_causal": True},
        {"scale": 0.7},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"enable_gqa": True},
    ],
    ids=["plain", "causal", "scale", "bool-mask", "float-mask", "gqa"],
)
def test_rerouted_sdpa_equals_sdpa(options: dict) -> None:
    tokens = 6
    if options.get("attn_mask") == "bool":
        options = {
            "attn_mask": (torch.rand(2, 1, tokens, tokens) > 0.3) | torch.eye(tokens, dtype=torch.bool)
        }
    elif options.get("attn_mask") == "float":
        options = {"attn_mask": torch.randn(2, 2, tokens, tokens)}
    kv_heads = 1 if options.get("enable_gqa") else None
    model = sharpen(nn.Sequential(TokenAttention(kv_heads=kv_heads, **options)))
    x = torch.randn(2, tokens, 8)
    with torch.no_grad():
        expected = model(x)
    with capture_attention(model) as (maps, run):
        got = run(x)
    assert_close(got, expected, rtol=1e-5)
    (probs,) = maps.probs
    assert probs.shape == (2, 2, tokens, tokens) and maps.names == ["0"]
    assert torch.allclose(probs.sum(dim=-1), torch.ones(2, 2, tokens))
    if "is_causal" in options:
        assert probs.triu(1).abs().max() == 0


class MHA(nn.Module):
    def __init__(self, batch_first: bool, separate: bool, **call) -> None:
        super().__init__()
        kdim = 6 if separate else None
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.separate, self.call = separate, call

    def forward(self, x):
        kv = x[..., :6] if self.separate else x
        return self.attn(x, kv, kv, **self.call)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "case", ["plain", "separate", "bool-mask", "float-3d-mask", "padding", "causal", "weights", "unbatched"]
)
def test_rerouted_multihead_attention_equals_the_module(batch_first: bool, case: str) -> None:
    tokens, batch = 5, 3
    call: dict = {"need_weights": False}
    if case == "bool-mask":
        call["attn_mask"] = (torch.rand(tokens, tokens) > 0.6) & ~torch.eye(tokens, dtype=torch.bool)
    if case == "float-3d-mask":
        call["attn_mask"] = torch.randn(batch * 2, tokens, tokens)
    if case == "padding":
        call["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 3 + [True] * 2])
    if case == "causal":
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(tokens)
        call["is_causal"] = True
    if case == "weights":
        call = {"need_weights": True, "average_attn_weights": False}
    model = sharpen(MHA(batch_first, case == "separate", **call))
    shape = (tokens, 8) if case == "unbatched" else (batch, tokens, 8) if batch_first else (tokens, batch, 8)
    x = torch.randn(shape)
    with torch.no_grad():
        expected, expected_weights = model(x)
    with capture_attention(model, batch=1 if case == "unbatched" else batch) as (maps, run):
        got, weights = run(x)
    assert_close(got, expected, rtol=1e-5)
    (probs,) = maps.probs
    assert probs.shape == (1 if case == "unbatched" else batch, 2, tokens, tokens)
    assert maps.names == ["attn"]
    if case == "weights":
        assert_close(weights, expected_weights, rtol=1e-5)
        assert_close(probs, expected_weights, rtol=1e-5)
    else:
        assert weights is None


# ---------------------------------------------------------------------------------------------------------
# Registry and detection
# ---------------------------------------------------------------------------------------------------------


def test_registry_names_resolve() -> None:
    assert methods.get("rollout") is gradcam.AttentionRollout
    assert methods.get("chefer") is gradcam.GenericAttention
    assert {"rollout", "chefer"} <= set(methods.names())
    assert methods.describe("rollout").startswith("Attention rollout")
    assert methods.describe("chefer").startswith("Generic attention relevance")
    for cls in (gradcam.AttentionRollout, gradcam.GenericAttention):
        assert isinstance(cls(vit(depth=1)), methods.CAM)
        assert cls(vit(depth=1)).counterfactual is False
    assert (
        gradcam.AttentionRollout.uses_gradients is False and gradcam.AttentionRollout.class_specific is False
    )
    assert gradcam.GenericAttention.uses_gradients is True and gradcam.GenericAttention.class_specific is True


def test_attention_detection_is_unchanged() -> None:
    model = torchvision_vit()
    names = attention_modules(model)
    assert names == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert is_attention(model.get_submodule(names[0])) and not is_attention(model.encoder)
    assert inside_attention(names[0] + ".out_proj", names) and not inside_attention(names[0], names)
