"""Score-CAM and Ablation-CAM against brute-force loops and closed forms, and their two code paths."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from conftest import TinyHead
from gradcam.errors import GradCAMError
from gradcam.methods import score
from gradcam.methods.score import AblationCAM, ScoreCAM

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Max absolute error within ``rel`` of the reference's largest magnitude."""
    expected = expected.detach().to(actual.dtype)
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual - expected).abs().max()
    assert error <= rel * scale, f"relative error {float(error / scale):.3g} > {rel}"


def cam_map(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations))


class SmallNet(nn.Module):
    """x -> stride-2 conv -> ReLU -> conv (the layer, at half the input size) -> ReLU -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.layer = nn.Conv2d(5, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.relu(self.stem(x)))

    def head(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(a).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


SKIP_SCALE = torch.tensor(0.5, dtype=torch.float64)


class SkipNet(nn.Module):
    """A skip connection from before the layer into the network after it:
    s = ReLU(stem(x)), y = fc(mean(ReLU(layer(s) + SKIP_SCALE * s))). ``SKIP_SCALE`` is a tensor that
    belongs to no module: torch.fx stores such constants on the module it traces (``_tensor_constant0``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layer = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        return self.fc(torch.relu(self.layer(s) + SKIP_SCALE * s).mean(dim=(2, 3)))


class InPlaceSkip(SkipNet):
    """The tail updates the skip in place: s = ReLU(stem(x)), s = s.add_(layer(s)), y = fc(mean(ReLU(s)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        s = s.add_(self.layer(s))
        return self.fc(torch.relu(s).mean(dim=(2, 3)))


class AliasedSkip(SkipNet):
    """As InPlaceSkip but without rebinding ``s``: the output depends on the layer only through the
    in-place update, which a traced graph does not show (fx records no aliasing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        s.add_(self.layer(s))
        return self.fc(torch.relu(s).mean(dim=(2, 3)))


class LateInPlace(SkipNet):
    """A value from before the layer changes in place after the layer ran, outside the layer's branch:
    s = ReLU(stem(x)), a = layer(s), s *= 2, y = fc(mean(ReLU(a + s))). A tail that reads s as it was
    computed gets the logits wrong; the check before use must catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        a = self.layer(s)
        s.mul_(2)
        return self.fc(torch.relu(a + s).mean(dim=(2, 3)))


class Branchy(TinyHead):
    """TinyHead whose forward branches on a tensor's value: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # always true; a symbolic trace cannot decide it
            return super().forward(x)
        return super().forward(-x)


# --- brute-force references: one full forward per channel, written without the library ---------------


def brute_score_cam_weights(
    model: nn.Module, activations: torch.Tensor, x: torch.Tensor, targets: list[int]
) -> torch.Tensor:
    """alpha_k = softmax(f(X o H^k))_c - softmax(f(0))_c, H^k = min-max(Up(A^k)), zero for constant A^k."""
    batch, channels = activations.shape[:2]
    alpha = torch.zeros(batch, channels, dtype=x.dtype)
    with torch.no_grad():
        baseline = torch.softmax(model(torch.zeros_like(x[:1])), dim=1)[0]
        for b in range(batch):
            for k in range(channels):
                a = activations[b, k]
                if a.max() == a.min():
                    continue  # zero mask: X o H^k is the baseline, alpha_k = 0
                up = F.interpolate(a[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[
                    0, 0
                ]
                mask = (up - up.min()) / (up.max() - up.min())
                probs = torch.softmax(model(x[b : b + 1] * mask), dim=1)[0]
                alpha[b, k] = probs[targets[b]] - baseline[targets[b]]
    return alpha


def brute_ablation_weights(
    head: Callable[[torch.Tensor, int], torch.Tensor], activations: torch.Tensor, targets: list[int]
) -> torch.Tensor:
    """alpha_k = (y^c - y^c_k) / |y^c| with ``head(A_b, b)`` the logits from image b's activation."""
    batch, channels = activations.shape[:2]
    alpha = torch.zeros(batch, channels, dtype=activations.dtype)
    with torch.no_grad():
        for b in range(batch):
            y = head(activations[b : b + 1], b)[0, targets[b]]
            for k in range(channels):
                ablated = activations[b : b + 1].clone()
                ablated[0, k] = 0
                alpha[b, k] = (y - head(ablated, b)[0, targets[b]]) / y.abs()
    return alpha


def tiny_with_constant_channel() -> TinyHead:
    model = TinyHead(channels=4, classes=3).double().eval()
    with torch.no_grad():
        model.conv.weight[3] = 0
        model.conv.bias[3] = 0.7  # channel 3 is constant: zero mask, weight 0
    return model


def forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``score.<name>`` fail the test if it is called: proves which path ran."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} was called")

    monkeypatch.setattr(score, name, refuse)


def ablation_cam(model: nn.Module, layer: str, tail: bool, **options: object) -> AblationCAM:
    cam = AblationCAM(model, layer, **options)
    cam._use_tail = tail
    return cam


def use_path(monkeypatch: pytest.MonkeyPatch, tail: bool) -> None:
    forbid(monkeypatch, "_rerun_whole_model" if tail else "_cut_after")


# --- Score-CAM -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["tiny", "small"])
def test_score_cam_matches_a_brute_force_loop(net: str) -> None:
    if net == "tiny":  # the layer at the input resolution, one constant channel
        model, layer = tiny_with_constant_channel(), "conv"
        x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
        activations = model.conv(x)
        targets = [2, 0]
    else:  # the layer at half the input resolution: the masks are upsampled
        model, layer = SmallNet().double().eval(), "layer"
        x = torch.randn(3, 3, 8, 10, dtype=torch.float64)
        activations = model.features(x)
        targets = [3, 1, 0]
    alpha = brute_score_cam_weights(model, activations.detach(), x, targets)
    expected = cam_map(alpha, activations.detach())
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    result = ScoreCAM(model, layer, batch_size=3)(x, targets)
    handle.remove()
    assert torch.equal(result.targets, torch.tensor(targets))
    assert_close(result.raw.double(), expected)
    # The zero baseline matters: the weights without it (the authors' code) give another map.
    with torch.no_grad():
        baseline = torch.softmax(model(torch.zeros_like(x[:1])), dim=1)[0, targets]
    without = cam_map(torch.where(alpha != 0, alpha + baseline[:, None], 0), activations.detach())
    assert (without - expected).abs().max() > 1e-3 * expected.abs().max()
    # One forward for the batch, one for the baseline, then the masked inputs 3 at a time.
    if net == "tiny":  # the constant channel costs no forward: 3 live channels, one chunk per image
        assert alpha[:, 3].eq(0).all() and alpha[:, :3].ne(0).all()
        assert sizes == [2, 1, 3, 3]
    else:  # 6 live channels: two chunks per image
        assert sizes == [3, 1] + [3, 3] * 3


# --- Ablation-CAM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", [True, False], ids=["fx-tail", "whole-model"])
@pytest.mark.parametrize("relu", ["none", "inplace"])
def test_ablation_cam_closed_form(monkeypatch: pytest.MonkeyPatch, tail: bool, relu: str) -> None:
    # y^c = sum_k W[c,k] mean(g(A^k)) + b_c with g = identity or ReLU; zeroing A^k removes its term:
    # alpha_k = W[c,k] mean(g(A^k)) / |y^c|.
    model = TinyHead(relu=relu != "none", inplace_relu=relu == "inplace").double().eval()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([3.0, -4.0, 3.0]))  # a negative y^c: the |y^c| convention
    x = torch.randn(3, 3, 5, 6, dtype=torch.float64)
    targets = [0, 1, 2]
    activations = model.conv(x).detach()
    kept = torch.relu(activations) if relu != "none" else activations
    terms = model.fc.weight.detach()[targets] * kept.mean(dim=(2, 3))
    y = model(x).detach().gather(1, torch.tensor(targets)[:, None])[:, 0]
    assert (y < 0).any() and (y > 0).any()
    expected = cam_map(terms / y.abs()[:, None], activations)
    use_path(monkeypatch, tail)
    result = ablation_cam(model, "conv", tail, batch_size=3)(x, targets)
    assert_close(result.raw.double(), expected)
    # Dividing by y^c itself (the paper's formula, which assumes y^c > 0) flips the negative row.
    signed = cam_map(terms / y[:, None], activations)
    assert (signed - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("tail", [True, False], ids=["fx-tail", "whole-model"])
def test_ablation_cam_with_a_skip_connection_into_the_tail(
    monkeypatch: pytest.MonkeyPatch, tail: bool
) -> None:
    model = SkipNet().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    targets = [1, 3]
    with torch.no_grad():
        skip = torch.relu(model.stem(x))
        activations = model.layer(skip)

    def head(a: torch.Tensor, b: int) -> torch.Tensor:
        return model.fc(torch.relu(a + SKIP_SCALE * skip[b : b + 1]).mean(dim=(2, 3)))

    expected = cam_map(brute_ablation_weights(head, activations, targets), activations)
    before = sorted(vars(model))
    use_path(monkeypatch, tail)
    result = ablation_cam(model, "layer", tail, batch_size=4)(x, targets)
    assert_close(result.raw.double(), expected)
    # torch.fx keeps tensor constants on the module it traces: that is not the user's model.
    assert sorted(vars(model)) == before and not hasattr(model, "_tensor_constant0")


@pytest.mark.parametrize(
    ("net", "factor", "fx_path"),
    [(InPlaceSkip, 1.0, True), (AliasedSkip, 1.0, False), (LateInPlace, 2.0, False)],
)
def test_ablation_cam_with_in_place_updates_of_the_skip(
    monkeypatch: pytest.MonkeyPatch, net: type, factor: float, fx_path: bool
) -> None:
    model = net().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    targets = [0, 2]
    with torch.no_grad():
        skip = torch.relu(model.stem(x))
        activations = model.layer(skip)

    def head(a: torch.Tensor, b: int) -> torch.Tensor:
        return model.fc(torch.relu(a + factor * skip[b : b + 1]).mean(dim=(2, 3)))

    expected = cam_map(brute_ablation_weights(head, activations, targets), activations)
    calls = []
    rerun = score._rerun_whole_model
    monkeypatch.setattr(score, "_rerun_whole_model", lambda context: calls.append(1) or rerun(context))
    result = AblationCAM(model, "layer", batch_size=4)(x, targets)
    assert_close(result.raw.double(), expected)
    assert calls == ([] if fx_path else [1])


def test_fx_tail_equals_the_whole_model_rerun_on_resnet18(monkeypatch: pytest.MonkeyPatch) -> None:
    # layer3.1.conv2 sits inside a residual block: the tail reads the block's input (the skip), then runs
    # bn2, the addition, layer4, pooling and fc.
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with monkeypatch.context() as patch:
        forbid(patch, "_rerun_whole_model")
        fast = ablation_cam(model, "layer3.1.conv2", True, batch_size=64)(x, [7])
    slow = ablation_cam(model, "layer3.1.conv2", False, batch_size=64)(x, [7])
    assert fast.raw.abs().max() > 0
    assert_close(fast.raw, slow.raw)


def test_untraceable_model_falls_back_to_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Branchy(relu=False).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    activations = model.conv(x).detach()
    y = model(x).detach()[:, 2]
    expected = cam_map(
        model.fc.weight.detach()[2] * activations.mean(dim=(2, 3)) / y.abs()[:, None], activations
    )
    calls = []
    rerun = score._rerun_whole_model
    monkeypatch.setattr(score, "_rerun_whole_model", lambda context: calls.append(1) or rerun(context))
    assert_close(AblationCAM(model, "conv")(x, 2).raw.double(), expected)
    assert calls == [1]


# --- both methods ---------------------------------------------------------------------------------------

METHODS = [ScoreCAM, AblationCAM]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.method)
def test_batched_equals_one_at_a_time(method: type) -> None:
    model = SmallNet().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    targets = [2, 0, 3]
    single = torch.cat(
        [method(model, "layer", batch_size=1)(x[i : i + 1], t).raw for i, t in enumerate(targets)]
    )
    assert single.abs().max() > 0
    for batch_size in (2, 5, 64):
        assert_close(method(model, "layer", batch_size=batch_size)(x, targets).raw, single)


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "tensors": [t.detach().clone() for t in [*model.parameters(), *model.buffers()]],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "attributes": [sorted(vars(m)) for m in model.modules()],
        "modules": [name for name, _ in model.named_modules()],
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key in ("training", "requires_grad", "hooks", "attributes", "modules"):
        assert before[key] == after[key], key
    for old, new in zip(before["grads"], after["grads"], strict=True):
        assert (old is None and new is None) or torch.equal(old, new)
    for old, new in zip(before["tensors"], after["tensors"], strict=True):
        assert torch.equal(old, new)


class NormNet(nn.Module):
    """SmallNet with BatchNorm after the layer and a module that refuses batches larger than ``limit``."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.layer = nn.Conv2d(5, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.guard = Guard(limit)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.guard(self.norm(self.layer(torch.relu(self.stem(x)))))
        return self.fc(torch.relu(a).mean(dim=(2, 3)))


class Guard(nn.Module):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise RuntimeError("batch too large")
        return x


def make_cam(
    kind: str, model: nn.Module, monkeypatch: pytest.MonkeyPatch, **options: object
) -> ScoreCAM | AblationCAM:
    """``kind``: scorecam, ablation-fx (the fx tail, which must be used) or ablation-whole."""
    if kind == "scorecam":
        return ScoreCAM(model, "layer", **options)
    tail = kind == "ablation-fx"
    use_path(monkeypatch, tail)
    return ablation_cam(model, "layer", tail, **options)


def mixed_state(model: nn.Module) -> nn.Module:
    """Train mode with one module in eval, a frozen parameter, a filled .grad, user hooks on leaves."""
    model.train()
    model.fc.eval()
    model.stem.weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)
    fired: list[str] = []
    model.stem.register_forward_pre_hook(lambda m, a: fired.append("pre"))
    model.fc.register_forward_hook(lambda m, a, o: fired.append("forward"))
    model.fired = fired
    return model


@pytest.mark.parametrize("kind", ["scorecam", "ablation-fx", "ablation-whole"])
def test_model_state_restored(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    # NormNet's guard branches on the batch size, untraceable: the fx path calls it as a black box.
    model = mixed_state(NormNet())
    x = torch.randn(2, 3, 6, 6)
    before = snapshot(model)
    make_cam(kind, model, monkeypatch)(x, [0, 3])
    assert_same_state(before, snapshot(model))
    assert torch.is_grad_enabled()
    # BatchNorm ran in eval mode (its running statistics did not move), the user's hooks still fire.
    model.fired.clear()
    model(x)
    assert model.fired == ["pre", "forward"]


@pytest.mark.parametrize("kind", ["scorecam", "ablation-fx", "ablation-whole"])
def test_model_state_restored_when_the_forward_raises(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    # The explained forward (batch 1) passes; the perturbed batches (4 at a time) make the guard raise.
    model = mixed_state(NormNet(limit=1))
    x = torch.randn(1, 3, 6, 6)
    before = snapshot(model)
    cam = make_cam(kind, model, monkeypatch, batch_size=4)
    with pytest.raises(RuntimeError, match="batch too large"):
        cam(x)
    assert_same_state(before, snapshot(model))
    assert torch.is_grad_enabled()


def test_hooks_on_the_layers_parents_fall_back_to_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tracing would run a forward hook of the model itself on symbolic values: such a model is not traced.
    model = SmallNet().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    reference = AblationCAM(model, "layer")(x, [1, 2]).raw
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append(type(o)))
    calls = []
    rerun = score._rerun_whole_model
    monkeypatch.setattr(score, "_rerun_whole_model", lambda context: calls.append(1) or rerun(context))
    assert_close(AblationCAM(model, "layer")(x, [1, 2]).raw, reference)
    assert calls == [1]
    assert seen and all(kind is torch.Tensor for kind in seen)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.method)
def test_no_grad_and_inference_mode_give_the_same_maps(method: type) -> None:
    model = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    reference = method(model, "layer")(x, [1, 2]).raw
    assert reference.abs().max() > 0
    with torch.no_grad():
        under_no_grad = method(model, "layer")(x, [1, 2]).raw
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        inference_input = x.clone()
        under_inference = method(model, "layer")(inference_input, [1, 2]).raw
        assert torch.is_inference_mode_enabled()
    for other in (under_no_grad, under_inference):
        assert torch.equal(other, reference)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.method)
def test_options_are_checked(method: type) -> None:
    model = SmallNet()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(GradCAMError, match="batch_size"):
            method(model, "layer", batch_size=bad)
    with pytest.raises(GradCAMError, match="progress"):
        method(model, "layer", progress="yes")
    assert not method.uses_gradients


@pytest.mark.parametrize("batch_size", [1, 64])
def test_progress_is_reported_through_a_callback(batch_size: int) -> None:
    reports: list[tuple[int, int]] = []
    model = SmallNet().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    AblationCAM(
        model, "layer", batch_size=batch_size, progress=lambda done, total: reports.append((done, total))
    )(x, [0, 1])
    live = int(model.features(x).flatten(2).ne(0).any(dim=2).sum())  # channels not zero everywhere
    expected = live if batch_size == 1 else 2
    assert reports == [(done, expected) for done in range(expected + 1)]
    with pytest.raises(GradCAMError, match="progress must be a callable"):
        AblationCAM(model, "layer", progress=True)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.method)
def test_several_targets_share_the_perturbed_forwards(method: type) -> None:
    model = SmallNet().double().eval()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    calls = {"images": 0}

    def count(module: nn.Module, args: tuple) -> None:
        calls["images"] += args[0].shape[0]

    handle = model.register_forward_pre_hook(count)
    try:
        together = method(model, "layer", batch_size=4)(x, topk=3)
        forwards_for_three = calls["images"]
        calls["images"] = 0
        method(model, "layer", batch_size=4)(x, together.targets[0])
        forwards_for_one = calls["images"]
    finally:
        handle.remove()
    assert forwards_for_three == forwards_for_one  # the masked forwards ran once for the three classes
    for n in range(3):  # and each row is what a call for that row alone gives
        alone = method(model, "layer", batch_size=4)(x, together.targets[n])
        torch.testing.assert_close(together.raw[n], alone.raw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", [ScoreCAM, AblationCAM])
def test_a_layer_without_any_varying_channel_gives_a_zero_map_not_an_error(method):
    # After global pooling every channel is one value: no channel has a spatial pattern to score, so
    # Score-CAM has no masked input to run (an empty batch used to reach the model) and the map is 0.
    class ViewHead(TinyHead):  # like EfficientNet, its flatten cannot take an empty batch
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.relu(self.conv(x))).view(x.shape[0], -1))

    model = ViewHead(channels=4, classes=3).double().eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    explanation = method(model, "pool")(x, [0, 2])
    if method is ScoreCAM:
        assert torch.equal(explanation.raw, torch.zeros_like(explanation.raw))
    assert explanation.raw.shape == (2, 1, 1)
