"""Attention modules of a model: which modules are self-attention, for the layer choice and the attention
methods. A module counts as attention when it is ``nn.MultiheadAttention`` or declares its heads as an
integer ``num_heads`` (timm, torchvision's Swin), ``num_attention_heads`` (Hugging Face) or ``n_heads``
(torchvision's MaxViT). Everything computed inside one (queries, keys, per-head probabilities) is heads,
not a feature map.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradcam.capture import eval_mode
from gradcam.errors import GradCAMError

_HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads")


def is_attention(module: nn.Module) -> bool:
    """True for a self-attention module (see the module docstring)."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    for attribute in _HEAD_ATTRIBUTES:
        heads = getattr(module, attribute, None)
        if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0:
            return any(isinstance(child, nn.Linear) for child in module.modules())
    return False


def attention_modules(model: nn.Module) -> list[str]:
    """Qualified names of the attention modules of ``model`` in registration order, innermost only: a
    block that records its heads (torchvision's ``EncoderBlock``) is not itself the attention."""
    found = [name for name, module in model.named_modules() if name and is_attention(module)]
    return [name for name in found if not any(inner.startswith(name + ".") for inner in found)]


def inside_attention(name: str, attention: list[str]) -> bool:
    """True when module ``name`` is a strict descendant of one of the ``attention`` modules."""
    return any(name.startswith(outer + ".") for outer in attention)


# --------------------------------------------------------------------------------------------------------
# Capturing the attention probabilities of one forward pass, fused implementations included.
# --------------------------------------------------------------------------------------------------------

@dataclass
class AttentionMaps:
    """What one forward pass recorded: each attention call's probabilities, in the order they ran.

    ``names[i]`` is the attention module that computed ``probs[i]`` (B, heads, N, N) (for a call made
    outside any detected attention module, ``"scaled_dot_product_attention"``). With ``graph=True``
    the tensors are in the autograd graph of ``output``: the first is a root, so ``torch.autograd.grad``
    of a score with respect to them covers only the attention blocks and what follows them.
    """

    names: list[str] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    output: object = None

    def describe(self) -> str:
        """A short description of the recorded blocks: ``attention: blocks.0.attn..blocks.11.attn (12)``."""
        if not self.names:
            return "attention: none"
        first, last = self.names[0], self.names[-1]
        span = first if len(self.names) == 1 else f"{first}..{last}"
        return f"attention: {span} ({len(self.names)})"


def _sdpa_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> dict[str, Any]:
    return dict(locals())


def _functional_softmax(
    input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, int | None]:
    return input, dim


def _method_softmax(
    input: torch.Tensor, dim: int | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, int | None]:
    return input, dim


# Every entry point of a softmax a Python attention implementation calls: Hugging Face's eager attention
# calls nn.functional.softmax(..., dim=-1), timm's unfused Attention calls attn.softmax(dim=-1).
_SOFTMAXES: dict[Callable[..., Any], Callable[..., tuple[torch.Tensor, int | None]]] = {
    F.softmax: _functional_softmax,
    torch.softmax: _method_softmax,
    torch.Tensor.softmax: _method_softmax,
    torch.special.softmax: _method_softmax,
}

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _causal(length: int, source: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive causal mask: query i attends to keys 0..i (-inf above the diagonal)."""
    allowed = torch.ones(length, source, dtype=torch.bool, device=device).tril()
    return _additive(allowed, dtype, masked_when=False)


def _additive(mask: torch.Tensor, dtype: torch.dtype, masked_when: bool) -> torch.Tensor:
    """A boolean mask as an additive one (-inf where ``mask == masked_when``); a float mask as is."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    blocked = mask if masked_when else ~mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(blocked, float("-inf"))


def _check_one_map(name: str, count: int) -> None:
    """Refuse an attention module's call that recorded ``count`` maps, unless exactly one."""
    if count == 0:
        raise GradCAMError(
            f"attention module '{name}' ran but no attention probabilities were seen (it calls "
            "neither F.scaled_dot_product_attention, nn.MultiheadAttention nor a softmax over "
            "the keys); rollout and chefer cannot read this implementation"
        )
    if count > 1:
        raise GradCAMError(
            f"attention module '{name}' computed {count} attention maps in one call; rollout "
            "and chefer need one (B, heads, N, N) map per block"
        )


class _Recorder(TorchFunctionMode):
    """Active only during the captured forward. Reroutes ``F.scaled_dot_product_attention`` and
    ``F.multi_head_attention_forward`` to explicit softmax(QK^T * scale + mask) V whose probabilities are
    recorded, and records the softmax outputs computed inside a detected attention module."""

    def __init__(self, maps: AttentionMaps, graph: bool, batch: int) -> None:
        super().__init__()
        self.maps = maps
        self.graph = graph
        self.batch = batch
        self.stack: list[str] = []  # the attention modules running, innermost last
        self.starts: list[int] = []  # for each of them, how many maps were recorded when it started
        self.graph_started = False

    # -- what counts as global self-attention --------------------------------------------------------------

    def _check(self, probs: torch.Tensor, where: str) -> None:
        shape = tuple(probs.shape)
        if probs.dim() != 4:
            raise GradCAMError(
                f"attention in '{where}' has shape {shape}; rollout and chefer need per-head attention "
                "probabilities (B, heads, N, N)"
            )
        if shape[-1] != shape[-2]:
            raise GradCAMError(
                f"attention in '{where}' has {shape[-2]} queries attending to {shape[-1]} keys "
                f"(shape {shape}): not self-attention over the tokens; rollout and chefer need "
                "(B, heads, N, N)"
            )
        if shape[0] != self.batch:
            raise GradCAMError(
                f"attention in '{where}' has shape {shape}: its leading axis {shape[0]} is not the batch "
                f"{self.batch} (windowed attention, as in Swin, runs on batch x windows); rollout and "
                "chefer need global self-attention (B, heads, N, N)"
            )
        if self.maps.probs and self.maps.probs[0].shape[-1] != shape[-1]:
            first, tokens = self.maps.names[0], self.maps.probs[0].shape[-1]
            raise GradCAMError(
                f"attention in '{where}' runs over {shape[-1]} tokens but '{first}' over {tokens}: the "
                "token count changes between blocks (as in LeViT or pooling transformers); rollout and "
                "chefer need the same tokens in every block"
            )

    def _record(self, probs: torch.Tensor, where: str) -> torch.Tensor:
        """Keep ``probs`` (checked) and return the tensor the forward continues from."""
        self._check(probs, where)
        if self.graph:
            if not probs.requires_grad:
                # A root of the blocks-only graph: the first block (nothing before it was recorded), or
                # a later one that no recorded probability feeds.
                probs = probs.detach().requires_grad_(True)
            if not self.graph_started:
                torch.set_grad_enabled(True)
                self.graph_started = True
        else:
            probs = probs.detach()
        self.maps.names.append(where)
        self.maps.probs.append(probs)
        return probs

    def _where(self) -> str:
        return self.stack[-1] if self.stack else "scaled_dot_product_attention"

    # -- which attention module is running -----------------------------------------------------------------

    def entering(self, name: str) -> Callable[..., None]:
        """The forward pre-hook of attention module ``name``: it is now running."""

        def hook(module: nn.Module, args: object) -> None:
            self.stack.append(name)
            self.starts.append(len(self.maps.probs))

        return hook

    def leaving(self, name: str) -> Callable[..., None]:
        """The forward hook of attention module ``name``: it has ended, having recorded exactly one map."""

        def hook(module: nn.Module, args: object, output: object) -> None:
            self.stack.pop()
            _check_one_map(name, len(self.maps.probs) - self.starts.pop())

        return hook

    # -- explicit attention --------------------------------------------------------------------------------

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float,
        dropout_p: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(Q K^T * scale + bias) V with the probabilities recorded; returns (output, probs)."""
        scores = torch.matmul(query, key.transpose(-2, -1)) * scale
        if bias is not None:
            scores = scores + bias
        low = scores.dtype in (torch.float16, torch.bfloat16)
        probs = torch.softmax(scores.float() if low else scores, dim=-1)
        probs = self._record(probs, self._where())
        used = F.dropout(probs, dropout_p, training=True) if dropout_p > 0 else probs
        return torch.matmul(used.to(value.dtype), value), probs

    def _sdpa(self, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        a = _sdpa_arguments(*args, **kwargs)
        query, key, value = a["query"], a["key"], a["value"]
        if a["enable_gqa"] and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(repeat, dim=-3)
            value = value.repeat_interleave(repeat, dim=-3)
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(query.shape[-1])
        length, source = query.shape[-2], key.shape[-2]
        bias = None
        if a["is_causal"]:
            bias = _causal(length, source, query.dtype, query.device)
        mask = a["attn_mask"]
        if mask is not None:
            # SDPA's boolean mask says where attention is allowed (True); a float mask is added.
            extra = _additive(mask, query.dtype, masked_when=False)
            bias = extra if bias is None else bias + extra
        output, _ = self._attend(query, key, value, bias, scale, float(a["dropout_p"]))
        return output

    def _mha(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls) computed explicitly."""
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        where = self._where()
        if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
            raise GradCAMError(
                f"attention module '{where}' uses bias_k/bias_v or add_zero_attn (an extra key beyond the "
                "tokens); rollout and chefer need attention over the tokens only"
            )
        if a["static_k"] is not None or a["static_v"] is not None:
            raise GradCAMError(f"attention module '{where}' uses static keys/values; not self-attention")
        query, key, value = a["query"], a["key"], a["value"]
        batched = query.dim() == 3
        key_padding = a["key_padding_mask"]
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding = None if key_padding is None else key_padding.unsqueeze(0)
        length, batch, embed = query.shape
        source, heads = key.shape[0], int(a["num_heads"])
        head_dim = embed // heads
        bias_in = a["in_proj_bias"]
        b_q, b_k, b_v = (None, None, None) if bias_in is None else bias_in.chunk(3)
        if a["use_separate_proj_weight"]:
            w_q, w_k, w_v = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
        else:
            w_q, w_k, w_v = a["in_proj_weight"].chunk(3)
        q = F.linear(query, w_q, b_q).reshape(length, batch, heads, head_dim).permute(1, 2, 0, 3)
        k = F.linear(key, w_k, b_k).reshape(source, batch, heads, head_dim).permute(1, 2, 0, 3)
        v = F.linear(value, w_v, b_v).reshape(source, batch, heads, -1).permute(1, 2, 0, 3)
        bias = None
        mask = a["attn_mask"]
        if mask is not None:
            # nn.MultiheadAttention's boolean masks say where attention is NOT allowed (True).
            extra = _additive(mask, q.dtype, masked_when=True)
            bias = extra.reshape(batch, heads, length, source) if extra.dim() == 3 else extra
        elif a["is_causal"]:
            bias = _causal(length, source, q.dtype, q.device)
        if key_padding is not None:
            extra = _additive(key_padding, q.dtype, masked_when=True).reshape(batch, 1, 1, source)
            bias = extra if bias is None else bias + extra
        dropout_p = float(a["dropout_p"]) if a["training"] else 0.0
        out, probs = self._attend(q, k, v, bias, 1.0 / math.sqrt(head_dim), dropout_p)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, -1)
        out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"])
        weights = None
        if a["need_weights"]:
            weights = probs.mean(dim=1) if a["average_attn_weights"] else probs.clone()
            weights = weights.to(out.dtype)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(args, kwargs)
        if func is F.multi_head_attention_forward:
            return self._mha(args, kwargs)
        output = func(*args, **kwargs)
        parse = _SOFTMAXES.get(func)
        if parse is None or not self.stack or not isinstance(output, torch.Tensor):
            return output
        source, dim = parse(*args, **kwargs)
        if dim is None or output.dim() == 0 or dim not in (-1, output.dim() - 1):
            return output
        # Recorded as the module produced it; the forward goes on with a copy, so an in-place operation
        # later in the model cannot rewrite what we keep.
        return self._record(output, self.stack[-1]).clone()


Runner = Callable[[torch.Tensor], object]


@contextmanager
def capture_attention(
    model: nn.Module, *, graph: bool = False, batch: int | None = None
) -> Iterator[tuple[AttentionMaps, Runner]]:
    """Record the attention probabilities of one forward pass of ``model``, fused or not.

    Yields ``(maps, run)``: call ``run(inputs)`` once inside the block; it returns the model output and
    fills ``maps`` (:class:`AttentionMaps`). During that forward only:

    * ``F.scaled_dot_product_attention`` calls (timm's fused attention, Hugging Face's ``sdpa``) are
      computed explicitly as softmax(Q K^T * scale + mask) V, the probabilities recorded (``attn_mask``
      boolean or additive, ``is_causal``, ``scale``, ``enable_gqa`` and ``dropout_p`` as SDPA has them);
    * ``F.multi_head_attention_forward``, which ``nn.MultiheadAttention`` calls (torchvision's ViT,
      with ``need_weights=False``), is computed explicitly from the module's own weights and inputs
      (packed or separate in-projections, biases, ``attn_mask``, ``key_padding_mask``, ``is_causal``;
      ``bias_k``/``bias_v``/``add_zero_attn`` and static keys are refused). Its output is the one the
      module returns, so the recorded probabilities are the ones in the graph;
    * a softmax over the last axis computed inside a detected attention module (Hugging Face eager
      ``nn.functional.softmax(..., dim=-1)``, timm's ``attn.softmax(dim=-1)`` when ``fused_attn`` is
      False) is recorded as produced; the forward continues with a copy.

    This is done with a :class:`torch.overrides.TorchFunctionMode` and with call-scoped hooks on the
    attention modules (to know which module is running); nothing on the model is changed: fused flags
    (timm ``attn.fused_attn``), ``config._attn_implementation``, ``requires_grad`` and ``.grad`` are
    never touched, the hooks are removed when the forward ends, every module's train/eval flag (the
    forward runs in eval mode) and the caller's grad mode are restored on exit, also on error.

    Only global self-attention is accepted: every recorded tensor must be (B, heads, N, N) with B the
    batch and the same N in every block; windowed attention (Swin: leading axis B x windows), cross
    attention and token counts that change between blocks (LeViT) are refused with one line, as is an
    attention module that ran without any probabilities being seen, or that produced several.

    ``batch`` is the batch size the probabilities must lead with; by default the inputs' first axis
    (images (B, C, H, W)).

    With ``graph=True`` the forward runs without recording gradients until the first probabilities are
    produced; they become a fresh leaf that requires grad and recording is switched on, so a backward
    from the output covers only the attention blocks and no parameter gradient is ever computed. With
    ``graph=False`` the whole forward runs under ``torch.no_grad()``.

    Example:
        >>> with capture_attention(vit, graph=True) as (maps, run):
        ...     logits = run(batch)
        ...     grads = torch.autograd.grad(logits[:, 281].sum(), maps.probs)
        >>> [tuple(p.shape) for p in maps.probs]      # one (B, heads, N, N) per block, in forward order
        >>> maps.describe()                           # 'attention: blocks.0.attn..blocks.11.attn (12)'
    """
    maps = AttentionMaps()
    names = attention_modules(model)
    modules = [(name, model.get_submodule(name)) for name in names]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    used = [False]

    def run(inputs: torch.Tensor) -> object:
        if used[0]:
            raise GradCAMError("capture_attention records one forward pass; run it once per block")
        used[0] = True
        recorder = _Recorder(maps, graph, int(inputs.shape[0]) if batch is None else batch)
        try:
            for name, module in modules:
                handles.append(module.register_forward_pre_hook(recorder.entering(name)))
                handles.append(module.register_forward_hook(recorder.leaving(name)))
            with torch.no_grad(), recorder:
                output = model(inputs)
        finally:
            # One forward is all the hooks are for.
            for handle in handles:
                handle.remove()
            handles.clear()
        if not maps.probs:
            raise GradCAMError(
                "no attention probabilities were seen during the forward pass: the model has no "
                "self-attention that rollout or chefer can read (a CNN? choose a CAM method)"
            )
        maps.output = output
        return output

    grad_mode = torch.is_grad_enabled()
    with torch.inference_mode(False), eval_mode(model):
        try:
            yield maps, run
        finally:
            for handle in handles:
                handle.remove()
            torch.set_grad_enabled(grad_mode)
