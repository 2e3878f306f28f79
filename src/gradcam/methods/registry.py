"""The one list of explanation methods: every front end finds, lists and describes methods here.

timm-style: an entry names the method, says what kind it is, whether it is slow, and gives a one-line
description with its paper. ``gradcam methods``, ``/v1/methods``, ``--guided``, the trust study and
``gradcam evaluate`` all read it; no other list of methods exists.

Kinds:

- ``cam``: a class-activation map of one layer (:class:`gradcam.methods.CAM` subclasses);
- ``attention``: a map read from a transformer's attention (rollout, Chefer);
- ``pixel``: input-resolution gradients (Guided Backpropagation, Guided Grad-CAM);
- ``baseline``: what a method has to beat: random channel weights on the layer (``randomcam``), and the
  model-free maps ``random``, ``center`` and ``sobel`` (:mod:`gradcam.methods.maps`), which need no model
  and are offered by the evaluation only;
- ``concepts``: no map per class but concepts shared by a batch (Deep Feature Factorization,
  :mod:`gradcam.methods.factorization`); only ``gradcam explain`` offers it, so the listings leave this
  kind out unless it is asked for (:data:`MAP_KINDS` is their default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from gradcam.errors import GradCAMError
from gradcam.methods.attention import AttentionRollout, GenericAttention
from gradcam.methods.base import CAM
from gradcam.methods.baseline import RandomCAM
from gradcam.methods.classic import ClassActivationMap
from gradcam.methods.eigen import EigenCAM, EigenGradCAM, KernelPCACAM
from gradcam.methods.factorization import DeepFeatureFactorization
from gradcam.methods.fullgrad import FullGrad
from gradcam.methods.gradient import (
    FinerCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ShapleyCAM,
    XGradCAM,
)
from gradcam.methods.guided import GuidedBackprop, GuidedGradCAM
from gradcam.methods.legrad import LeGrad
from gradcam.methods.maps import center_baseline, random_baseline, sobel_baseline
from gradcam.methods.noisy import ISCAM, SSCAM, SmoothGradCAMpp
from gradcam.methods.score import AblationCAM, ScoreCAM

Kind = Literal["cam", "attention", "pixel", "baseline", "concepts"]
#: The kinds that give maps per class and image: what :func:`entries` and :func:`names` list by default.
MAP_KINDS: tuple[Kind, ...] = ("cam", "attention", "pixel", "baseline")
KINDS: tuple[Kind, ...] = (*MAP_KINDS, "concepts")


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        name: the name every front end accepts (``--method``, ``"method"`` in the API).
        kind: see the module docstring.
        build: the class (a :class:`CAM` subclass, :class:`GuidedBackprop`, :class:`GuidedGradCAM`) or,
            for a model-free baseline, its map function of :mod:`gradcam.methods.maps`,
            ``(inputs, mean, std, generator) -> maps (B,h,w)``.
        description: one line: what it is and its paper.
        slow: one forward per channel of the layer and image (minutes on a CPU); a server offers it only
            when told to.
    """

    name: str
    kind: Kind
    build: Callable[..., Any]
    description: str
    slow: bool = False

    @property
    def needs_model(self) -> bool:
        """False for the model-free baselines: they cannot explain a prediction, only be compared."""
        return isinstance(self.build, type)

    @property
    def is_cam(self) -> bool:
        """True for the methods whose call returns an :class:`~gradcam.Explanation` of a layer or of the
        attention (every kind but ``pixel`` and the model-free baselines)."""
        return isinstance(self.build, type) and issubclass(self.build, CAM)


_ENTRIES: tuple[Method, ...] = (
    Method(
        "gradcam", "cam", GradCAM, "Grad-CAM (Selvaraju et al., ICCV 2017): ReLU(sum_k mean(dy/dA^k) A^k)"
    ),
    Method(
        "gradcam++", "cam", GradCAMPlusPlus,
        "Grad-CAM++ (Chattopadhay et al., WACV 2018): higher-order weights of the positive gradients",
    ),
    Method(
        "smoothgradcam++", "cam", SmoothGradCAMpp,
        "Smooth Grad-CAM++ (Omeiza et al., 2019): Grad-CAM++ of gradient moments averaged over noisy inputs",
    ),
    Method("xgradcam", "cam", XGradCAM, "XGrad-CAM (Fu et al., BMVC 2020): activation-weighted gradients"),
    Method(
        "hirescam", "cam", HiResCAM,
        "HiResCAM (Draelos & Carin, 2020): ReLU(sum_k dy/dA^k * A^k), element-wise, no averaging",
    ),
    Method("layercam", "cam", LayerCAM, "LayerCAM (Jiang et al., TIP 2021): ReLU(sum_k ReLU(dy/dA^k) * A^k)"),
    Method(
        "gradcam-elementwise", "cam", GradCAMElementWise,
        "Element-wise Grad-CAM (pytorch-grad-cam): ReLU(sum_k ReLU(dy/dA^k * A^k))",
    ),
    Method(
        "shapleycam", "cam", ShapleyCAM,
        "Shapley-CAM (Cai, 2025): mean of gradient minus half the Hessian-vector product, ReST target",
    ),
    Method(
        "finercam", "cam", FinerCAM,
        "Finer-CAM (Zhang et al., CVPR 2025): Grad-CAM of the class against its most similar classes",
    ),
    Method(
        "cam", "cam", ClassActivationMap,
        "CAM (Zhou et al., CVPR 2016): ReLU(sum_k w_k^c A^k), the classifier's weights on a pooled layer",
    ),
    Method(
        "scorecam", "cam", ScoreCAM,
        "Score-CAM (Wang et al., CVPR-W 2020): channels weighted by the confidence of masked inputs",
        slow=True,
    ),
    Method(
        "sscam", "cam", SSCAM,
        "SS-CAM (Wang et al., 2020): Score-CAM with each channel's score averaged over noisy masks",
        slow=True,
    ),
    Method(
        "iscam", "cam", ISCAM,
        "IS-CAM (Naidu et al., 2020): Score-CAM with each channel's score integrated over scaled masks",
        slow=True,
    ),
    Method(
        "ablationcam", "cam", AblationCAM,
        "Ablation-CAM (Desai & Ramaswamy, WACV 2020): channels weighted by the score drop when removed",
        slow=True,
    ),
    Method(
        "eigencam", "cam", EigenCAM,
        "Eigen-CAM (Bany Muhammad & Yeasin, IJCNN 2020): first principal component of the activations",
    ),
    Method(
        "eigengradcam", "cam", EigenGradCAM,
        "Eigen-Grad-CAM: first principal component of the gradient-weighted activations",
    ),
    Method(
        "kpcacam", "cam", KernelPCACAM,
        "KPCA-CAM (Karmani et al., 2024): first kernel principal component of the activations (sigmoid)",
    ),
    Method(
        "fullgrad", "cam", FullGrad,
        "FullGrad (Srinivas & Fleuret, NeurIPS 2019): |input x gradient| + |bias x gradient| of every layer",
    ),
    Method(
        "rollout", "attention", AttentionRollout,
        "Attention rollout (Abnar & Zuidema, ACL 2020): the product of head-averaged attention plus identity",
    ),
    Method(
        "chefer", "attention", GenericAttention,
        "Generic attention relevance (Chefer et al., ICCV 2021): gradient-weighted attention, accumulated",
    ),
    Method(
        "legrad", "attention", LeGrad,
        "LeGrad (Bousselham et al., 2024): ReLU'd gradients of every layer's attention, averaged",
    ),
    Method(
        "guided-backprop", "pixel", GuidedBackprop,
        "Guided Backpropagation (Springenberg et al., ICLR-W 2015): positive input gradients through ReLUs",
    ),
    Method(
        "guided-gradcam", "pixel", GuidedGradCAM,
        "Guided Grad-CAM (Selvaraju et al., ICCV 2017): Guided Backpropagation times the Grad-CAM map",
    ),
    Method(
        "randomcam", "baseline", RandomCAM,
        "Random CAM: ReLU(sum_k w_k A^k) with w_k ~ U(-1, 1), the layer's activations, no class",
    ),
    Method(
        "random", "baseline", random_baseline, "Random map: smooth U(0, 1) noise on a grid 1/32 of the input"
    ),
    Method(
        "center", "baseline", center_baseline, "Centre prior: a centred Gaussian, sigma 0.25 of height, width"
    ),
    Method(
        "sobel", "baseline", sobel_baseline,
        "Sobel edges of the picture's luma, an edge detector (Adebayo et al., NeurIPS 2018)",
    ),
    Method(
        "dff", "concepts", DeepFeatureFactorization,
        "Deep Feature Factorization (Collins et al., ECCV 2018): NMF of a batch's activations, V ~= W H",
    ),
)  # fmt: skip
_BY_NAME = {entry.name: entry for entry in _ENTRIES}


def entries(
    kinds: Iterable[Kind] | None = None, *, needs_model: bool | None = None, slow: bool | None = None
) -> list[Method]:
    """The registered methods in their listing order, optionally only of ``kinds`` (default
    :data:`MAP_KINDS`: not the ``concepts`` kind), only those that need (or do not need) a model, only slow
    (or only fast) ones."""
    wanted = set(MAP_KINDS if kinds is None else kinds)
    return [
        entry
        for entry in _ENTRIES
        if entry.kind in wanted
        and (needs_model is None or entry.needs_model == needs_model)
        and (slow is None or entry.slow == slow)
    ]


def names(kinds: Iterable[Kind] | None = None, *, needs_model: bool | None = None) -> list[str]:
    """Names of :func:`entries` with the same filters."""
    return [entry.name for entry in entries(kinds, needs_model=needs_model)]


def get(name: str, offered: Iterable[str] | None = None, *, hint: str = "") -> Method:
    """The entry registered as ``name``; a one-line GradCAMError listing the choices when it is not one
    (or not among ``offered``, when given; ``hint`` is added for a known method left out)."""
    choices = list(offered) if offered is not None else list(_BY_NAME)
    entry = _BY_NAME.get(name) if isinstance(name, str) else None
    if entry is None or entry.name not in choices:
        shown = name if len(str(name)) <= 60 else str(name)[:60] + "..."
        if entry is None:
            raise GradCAMError(f"method '{shown}' not found; available: {', '.join(choices)}")
        raise GradCAMError(f"method '{shown}' not offered{hint}; choose from {', '.join(choices)}")
    return entry


def describe(name: str) -> str:
    """The one-line description of ``name``."""
    return get(name).description
