r"""Attention-based explanations of vision transformers: attention rollout and Chefer's generic relevance.

Both read every attention block's probabilities A_l (B, heads, N, N) from ONE forward pass, also where
the model computes attention fused (``F.scaled_dot_product_attention`` in timm, Hugging Face's ``sdpa``,
``nn.MultiheadAttention`` in torchvision): see :func:`gradcam.attention.capture_attention`. The model is
left exactly as found (fused flags, ``config._attn_implementation``, hooks, train/eval flags,
``requires_grad`` and ``.grad``), also when the call raises.

**Which row is the map.** R (B, N, N) relates every token to every token; the map is the row(s) of the
token(s) the classifier head reads, over the patch tokens (the first ``prefix`` tokens, class,
distillation and register tokens, are left out), placed on the model's patch grid (B, h, w):

* a class token the head reads (timm ``global_pool='token'``, Hugging Face ``ViTForImageClassification``
  and ``DeiTForImageClassification``, torchvision's ``VisionTransformer``): the class token's row 0;
* distilled models whose head averages the class and distillation heads (timm ``deit_*_distilled``,
  Hugging Face ``DeiTForImageClassificationWithTeacher``): the mean of rows 0 and 1;
* no class token, or a head that pools the patch tokens (timm ``global_pool='avg'`` / ``'max'`` /
  ``'avgmax'``, ``class_token=False``; Hugging Face ``config.use_mean_pooling``): the mean of the patch
  tokens' rows, as the head averages them. For Chefer's R this includes the identity I, which adds the
  same constant 1/(h*w) to every patch.

timm's attention-pooling head (``global_pool='map'``) reads the tokens through its own cross-attention
and is refused, as are windowed attention (Swin), token counts that change between blocks (LeViT) and
models that declare no patch grid.

Examples:
    >>> import timm, gradcam
    >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=True).eval()
    >>> rollout = gradcam.AttentionRollout(model)(batch)   # class-agnostic, no gradients
    >>> rollout.raw.shape                                 # (B, 14, 14): the patch grid, not normalised
    >>> rollout.layer
    'attention: blocks.0.attn..blocks.11.attn (12)'
    >>> chefer = gradcam.GenericAttention(model)(batch, topk=3)   # one forward, batched backward
    >>> chefer.maps.shape                                 # (3, B, 224, 224), each map scaled to [0, 1]
    >>> gradcam.methods.get("chefer") is gradcam.GenericAttention
    True

From the command line they are the methods ``rollout`` and ``chefer`` (``--method chefer``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradcam.attention import AttentionMaps, capture_attention
from gradcam.capture import eval_mode
from gradcam.errors import GradCAMError
from gradcam.explanation import Explanation
from gradcam.layouts import MAX_DERIVED_PREFIX, ModelFacts, model_facts
from gradcam.methods.base import (
    Chooser,
    WholeModelCAM,
    _check_device,
    _check_inputs,
    _check_not_inference,
    row_explanation,
)

#: The readouts: the class token's row, the mean of the class and distillation rows, the patch rows' mean.
CLASS_TOKEN = "class token"
DISTILLED = "class and distillation tokens"
PATCHES = "patch tokens"


def readout_rule(model: nn.Module) -> str:
    """Which token(s) the classifier head reads (see the module docstring): :data:`CLASS_TOKEN`,
    :data:`DISTILLED` or :data:`PATCHES`. ``PATCHES`` is also used where the model turns out to have no
    prefix tokens."""
    family = type(model).__module__.split(".")[0]
    if family == "timm":
        pool = getattr(model, "global_pool", None)
        if pool == "map":
            raise GradCAMError(
                "this timm model pools its tokens with an attention head (global_pool='map'), a "
                "cross-attention that no row of the blocks' attention represents; rollout and chefer need "
                "a class-token or average-pooling head"
            )
        if getattr(model, "dist_token", None) is not None:
            return DISTILLED
        if isinstance(pool, str) and pool in ("avg", "max", "avgmax"):
            return PATCHES
        return CLASS_TOKEN
    if family == "transformers":
        if type(model).__name__.endswith("WithTeacher"):
            return DISTILLED
        if getattr(getattr(model, "config", None), "use_mean_pooling", False) is True:
            return PATCHES
    return CLASS_TOKEN


def _token_rows(
    rule: str, facts: ModelFacts, grid: tuple[int, int], tokens: int
) -> tuple[int, list[int] | None]:
    """(prefix, rows read out); rows None means the mean over the patch rows."""
    patches = grid[0] * grid[1]
    prefix = facts.prefix if facts.prefix is not None else tokens - patches
    if prefix < 0 or prefix + patches != tokens or (facts.prefix is None and prefix > MAX_DERIVED_PREFIX):
        declared = f"{facts.prefix} prefix + " if facts.prefix is not None else ""
        raise GradCAMError(
            f"the attention runs over {tokens} tokens, which do not fit {declared}the model's "
            f"{grid[0]}x{grid[1]} patch grid; rollout and chefer cannot place them on the image"
        )
    if rule == DISTILLED:
        if prefix < 2:
            raise GradCAMError(
                f"a distilled model needs class and distillation tokens; found {prefix} prefix tokens"
            )
        return prefix, [0, 1]
    if rule == PATCHES or prefix == 0:
        return prefix, None
    return prefix, [0]


def _read_out(
    relevance: torch.Tensor, prefix: int, rows: list[int] | None, grid: tuple[int, int]
) -> torch.Tensor:
    """(..., N, N) relevance -> (..., h, w) map: the chosen rows (averaged) over the patch columns."""
    patches = relevance[..., prefix:]
    picked = patches[..., prefix:, :] if rows is None else patches[..., rows, :]
    return picked.mean(dim=-2).reshape(*relevance.shape[:-2], *grid)


def _identity(like: torch.Tensor, leading: Sequence[int]) -> torch.Tensor:
    tokens = like.shape[-1]
    eye = torch.eye(tokens, device=like.device, dtype=torch.float32)
    return eye.expand(*leading, tokens, tokens).clone()


class _AttentionMethod(WholeModelCAM):
    """Shared call of the attention methods: the CAM call signature and Explanation, every block at once."""

    method = "attention"
    reads = "every attention block of the model"
    why_no_layout = "places the tokens on the model's patch grid itself; layout does not apply"

    def explain_rows(
        self,
        inputs: torch.Tensor,
        choose: Chooser,
        *,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
    ) -> list[Explanation]:
        """One (N,B) Explanation of ``inputs`` (B,C,H,W) whose ``raw`` is on the patch grid, not normalised;
        the CAM call (:meth:`CAM.__call__`) gives targets and shapes as for every method."""
        if eigen_smooth:
            raise GradCAMError(f"eigen_smooth applies to CAM layers; {self.method} has no channels to smooth")
        if aug_smooth:
            raise GradCAMError(f"aug_smooth is not available for {self.method}; explain the image as is")
        inputs = _check_inputs(inputs)
        if not (isinstance(inputs, torch.Tensor) and inputs.dim() == 4):
            raise GradCAMError(f"{self.method} explains a (B,C,H,W) batch of a vision transformer")
        _check_device(self.model, inputs)
        _check_not_inference(self.model)
        return [self._explain_attention(inputs, choose)]

    def relevance(self, maps: AttentionMaps, scores: torch.Tensor) -> torch.Tensor:
        """(n, B, N, N) token relevance for the n target rows of ``scores`` (N,B)."""
        raise NotImplementedError

    def _explain_attention(self, inputs: torch.Tensor, choose: Chooser) -> Explanation:
        size = (inputs.shape[2], inputs.shape[3])
        rule = readout_rule(self.model)
        facts = model_facts(self.model)
        grid = facts.patch_grid(size)
        if grid is None:
            raise GradCAMError(
                f"{type(self.model).__name__} declares no patch grid (timm patch_embed, Hugging Face "
                "config.patch_size or torchvision's VisionTransformer); rollout and chefer cannot place "
                "its tokens on the image"
            )
        with torch.inference_mode(False), eval_mode(self.model):
            # A copy: a model whose first operation is in place must not rewrite the caller's tensor.
            x = inputs.detach().clone()
            with capture_attention(self.model, graph=self.uses_gradients) as (maps, run):
                output = run(x)
                chosen = choose(output)
                scores = chosen.scores(output)  # (N, B)
                prefix, rows = _token_rows(rule, facts, grid, maps.probs[0].shape[-1])
                relevance = self.relevance(maps, scores)
                raw = _read_out(relevance, prefix, rows, grid).float()
                scored = chosen.scored(output, scores)
        return row_explanation(raw, scored, maps.describe(), self.method, size)


class AttentionRollout(_AttentionMethod):
    r"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

    With A_l (B, heads, N, N) the attention probabilities of block l = 1..L and I the identity (the
    residual connection):

        Ã_l = ½ mean_heads(A_l) + ½ I,  each row normalised to sum 1
        R   = Ã_L ⋯ Ã_1

    The map is the class token's row of R over the patch tokens, on the patch grid (B, h, w); see the
    module docstring for models without a class token (the mean of the patch rows) and distilled models
    (the mean of the class and distillation rows). Rollout ignores the class: every target row gets the
    same map, from one forward pass without gradients. ``layer`` must be None: every attention block is
    used, and ``Explanation.layer`` says which (``"attention: blocks.0.attn..blocks.11.attn (12)"``).

    Example:
        >>> explanation = AttentionRollout(vit)(batch)       # raw (B, h, w), maps (B, H, W)
    """

    method = "rollout"
    uses_gradients = False
    class_specific = False

    def relevance(self, maps: AttentionMaps, scores: torch.Tensor) -> torch.Tensor:
        first = maps.probs[0]
        eye = _identity(first, [])
        rolled = _identity(first, [first.shape[0]])
        for probs in maps.probs:
            mixed = 0.5 * probs.float().mean(dim=1) + 0.5 * eye
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rolled = mixed @ rolled
        return rolled[None].expand(scores.shape[0], *rolled.shape)


class GenericAttention(_AttentionMethod):
    r"""Generic attention relevance (Chefer, Gur & Wolf, "Generic Attention-model Explainability for
    Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021), the self-attention rule.

    With A_l (B, heads, N, N) the attention probabilities of block l and ∇A_l = dy^c/dA_l the gradient
    of the pre-softmax target score with respect to them, for the blocks in order:

        R ← I
        R ← R + E_heads[ (∇A_l ⊙ A_l)⁺ ] · R          (l = 1..L)

    The map is the class token's row of R over the patch tokens, on the patch grid (B, h, w); see the
    module docstring for models without a class token and distilled models. Several targets per image
    come from ONE forward pass and a batched backward (in chunks, as the CAM methods). The backward
    starts at the first block's probabilities: nothing before them is differentiated and no parameter
    gradient is computed. ``layer`` must be None: every attention block is used.

    Example:
        >>> explanation = GenericAttention(vit)(batch, targets=[281, 243])
        >>> explanation.raw.shape                          # (2, h, w)
    """

    method = "chefer"
    uses_gradients = True
    class_specific = True

    def relevance(self, maps: AttentionMaps, scores: torch.Tensor) -> torch.Tensor:
        # The CAM engine's chunked, batched backward, with the blocks' probabilities as the roots.
        first = maps.names[0] if maps.names else "attention"
        chunks = [
            self._relevance_rows(maps.probs, grads, rows.stop - rows.start)
            for rows, grads in self._gradient_chunks(scores, maps.probs, first)
        ]
        return torch.cat(chunks)

    @staticmethod
    def _relevance_rows(
        probs: list[torch.Tensor], grads: Sequence[torch.Tensor | None], rows: int
    ) -> torch.Tensor:
        if all(g is None for g in grads):
            raise GradCAMError(_NO_GRADIENT)
        first = probs[0]
        relevance = _identity(first, [rows, first.shape[0]])
        for attention, grad in zip(probs, grads, strict=True):
            if grad is None:  # this block does not reach the score: it adds nothing
                continue
            weighted = (grad.float() * attention.detach().float()).clamp_min(0).mean(dim=-3)
            relevance = relevance + weighted @ relevance
        return relevance


_NO_GRADIENT = (
    "no gradient reaches the attention probabilities from the model output "
    "(does the model run under torch.no_grad() or detach its tokens?)"
)
