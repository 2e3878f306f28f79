r"""LeGrad: the ReLU'd gradients of every layer's attention, each layer scored by the model's own head.

Works on the models the attention methods read (:mod:`gradcam.methods.attention`) whose classifier can
be applied to any block's tokens: timm ``VisionTransformer`` (and its distilled DeiT), Hugging Face
``ViTForImageClassification`` / ``DeiTForImageClassification`` / ``DeiTForImageClassificationWithTeacher``
and torchvision's ``VisionTransformer``. The model is left exactly as found (fused flags,
``config._attn_implementation``, hooks, train/eval flags, ``requires_grad`` and ``.grad``), also when
the call raises.

Example:
    >>> legrad = gradcam.methods.LeGrad(vit)(batch, topk=2)
    >>> legrad.raw.shape                                 # (2, B, h, w): the patch grid, not normalised
    >>> gradcam.methods.get("legrad") is gradcam.methods.LeGrad
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradcam.attention import capture_attention
from gradcam.capture import eval_mode
from gradcam.errors import GradCAMError
from gradcam.explanation import Explanation
from gradcam.layouts import model_facts
from gradcam.methods.attention import _NO_GRADIENT, _AttentionMethod, _token_rows
from gradcam.methods.base import Chooser, row_explanation

Projection = Callable[[torch.Tensor], torch.Tensor]


def _timm_head(model: nn.Module) -> tuple[list[nn.Module], Projection] | None:
    blocks, norm = getattr(model, "blocks", None), getattr(model, "norm", None)
    head = getattr(model, "forward_head", None)
    if not isinstance(blocks, nn.Sequential) or not isinstance(norm, nn.Module) or head is None:
        return None
    return list(blocks), lambda tokens: head(norm(tokens))


def _hugging_face_head(model: nn.Module) -> tuple[list[nn.Module], Projection] | None:
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    norm = getattr(base, "layernorm", None)
    # transformers 5 keeps the blocks on the base model, earlier versions on base.encoder.layer.
    layers = getattr(base, "layers", None) or getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module):
        return None
    if type(model).__name__.endswith("WithTeacher"):
        cls, dist = model.cls_classifier, model.distillation_classifier

        def teacher(tokens: torch.Tensor) -> torch.Tensor:
            normed = norm(tokens)
            return (cls(normed[:, 0]) + dist(normed[:, 1])) / 2

        return list(layers), teacher
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Module):
        return None
    return list(layers), lambda tokens: classifier(norm(tokens)[:, 0])


def _torchvision_head(model: nn.Module) -> tuple[list[nn.Module], Projection] | None:
    encoder, heads = getattr(model, "encoder", None), getattr(model, "heads", None)
    layers, norm = getattr(encoder, "layers", None), getattr(encoder, "ln", None)
    if not isinstance(layers, nn.Sequential) or not isinstance(norm, nn.Module) or heads is None:
        return None
    return list(layers), lambda tokens: heads(norm(tokens)[:, 0])


_HEADS = {"timm": _timm_head, "transformers": _hugging_face_head, "torchvision": _torchvision_head}


def layer_heads(model: nn.Module) -> tuple[list[nn.Module], Projection]:
    """(the transformer blocks in order, the model's head as a map tokens (B, N, D) -> logits (B, C)):
    the final norm, the readout of the class (and distillation) token or the pooling, and the classifier,
    as the model applies them to its last block's tokens."""
    family = type(model).__module__.split(".")[0]
    reader = _HEADS.get(family)
    found = reader(model) if reader is not None else None
    if found is None:
        raise GradCAMError(
            f"legrad applies the model's classifier head to every block's tokens and does not know how "
            f"for {type(model).__name__}; it reads timm VisionTransformer, Hugging Face ViT/DeiT image "
            "classifiers and torchvision's VisionTransformer"
        )
    return found


def _block_output(output: object) -> torch.Tensor:
    tokens = output[0] if isinstance(output, tuple) else output
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise GradCAMError("legrad needs every transformer block to return tokens (B, N, D)")
    return tokens


class LeGrad(_AttentionMethod):
    r"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, "LeGrad: An Explainability Method for
    Vision Transformers via Feature Formation Sensitivity", arXiv 2404.03214, 2024; ICCV 2025).

    With z^l (B, N, D) the tokens after block l = 1..L, A^l (B, heads, N, N) that block's attention
    probabilities and C the model's own head (final norm, class-token readout or pooling, classifier), the
    score of target c at layer l is s^l = C(z^l)_c ("feature formation": how the class forms at that
    layer; s^L is the model's logit). Then

        E^l = mean_{heads, queries} ReLU( ∂s^l / ∂A^l )      (B, N): one value per key token
        E   = (1/L) Σ_l E^l

    and the map is E over the patch tokens (the prefix tokens — class, distillation, registers — left
    out), on the patch grid (B, h, w), not normalised (``maps`` are min-max scaled as for every method).
    Unlike Chefer's rule the gradient is not multiplied by the attention. All L layers are used; the
    official code's default reads only the last layers and scores CLIP by the mean of all tokens, and
    torchcam's default projection averages all tokens — here each layer is read the way the model's head
    reads its last layer, so the last layer's score is exactly the explained logit. One forward; the
    backward starts at the first block's probabilities, so no parameter gradient is computed. ``layer``
    must be None.

    Example:
        >>> explanation = LeGrad(vit)(batch, targets=[281, 243])
        >>> explanation.raw.shape                          # (2, h, w)
    """

    method = "legrad"
    uses_gradients = True
    class_specific = True

    def _explain_attention(self, inputs: torch.Tensor, choose: Chooser) -> Explanation:
        size = (inputs.shape[2], inputs.shape[3])
        blocks, head = layer_heads(self.model)
        facts = model_facts(self.model)
        grid = facts.patch_grid(size)
        if grid is None:
            raise GradCAMError(f"{type(self.model).__name__} declares no patch grid; legrad cannot place it")
        tokens: list[torch.Tensor] = []
        handles = [
            block.register_forward_hook(lambda module, args, output: tokens.append(_block_output(output)))
            for block in blocks
        ]
        try:
            with torch.inference_mode(False), eval_mode(self.model):
                x = inputs.detach().clone()
                with capture_attention(self.model, graph=True) as (maps, run):
                    output = run(x)
                    chosen = choose(output)
                    scores = chosen.scores(output)  # (N, B)
                    if len(tokens) != len(maps.probs):
                        raise GradCAMError(
                            f"legrad found {len(tokens)} block outputs but {len(maps.probs)} attention maps; "
                            "it needs one attention per block"
                        )
                    prefix, _ = _token_rows("", facts, grid, maps.probs[0].shape[-1])
                    layer_scores = [chosen.scores(head(z)) for z in tokens]  # L x (N, B)
                    relevance = self._relevance(maps.probs, layer_scores)  # (N, B, tokens)
                    raw = relevance[..., prefix:].reshape(*relevance.shape[:2], *grid).float()
                    scored = chosen.scored(output, scores)
        finally:
            for handle in handles:
                handle.remove()
        return row_explanation(raw, scored, maps.describe(), self.method, size)

    @staticmethod
    def _relevance(probs: list[torch.Tensor], layer_scores: list[torch.Tensor]) -> torch.Tensor:
        """(N, B, tokens): for every target row, the layers' mean of the ReLU'd attention gradients,
        averaged over heads and queries."""
        rows = layer_scores[0].shape[0]
        out = torch.zeros(rows, *probs[0].shape[:1], probs[0].shape[-1], device=probs[0].device)
        reached = False
        for n in range(rows):
            for attention, score in zip(probs, layer_scores, strict=True):
                (grad,) = torch.autograd.grad(score[n].sum(), attention, retain_graph=True, allow_unused=True)
                if grad is None:
                    continue
                reached = True
                out[n] += grad.float().clamp_min(0).mean(dim=(1, 2))
        if not reached:
            raise GradCAMError(_NO_GRADIENT)
        return out / len(probs)
