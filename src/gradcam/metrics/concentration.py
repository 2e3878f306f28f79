r"""How concentrated a map is: sparseness (the Gini index) and complexity (the entropy).

Both look at the map alone (no model, no annotation) and at the magnitudes |L| of its n = H W pixels, so
a signed map counts its negative evidence as mass too. Both are scale-invariant, which makes Quantus's
``normalise`` setting irrelevant to them (up to the epsilon it adds, see each function).
"""

from __future__ import annotations

import torch

from gradcam.metrics.map_checks import map_batch


def sparseness(maps: torch.Tensor) -> torch.Tensor:
    r"""The Gini index of each map's magnitudes (Chalasani, Chen, Chowdhury, Wu, Jha, "Concise
    Explanations of Neural Networks using Adversarial Training", ICML 2020).

    With a_(1) <= ... <= a_(n) the sorted values of |L| over the n = H W pixels,

        G = sum_i (2 i - n - 1) a_(i) / (n sum_i a_(i)),

    0 for a uniform map, (n - 1) / n for a map with a single non-zero pixel; higher is sparser (a
    more concise explanation). ``maps`` (B,H,W); returns (B,) float64, NaN for an all-zero map (there
    is no distribution of mass to measure).

    Quantus 0.6 ``Sparseness()`` with its defaults (abs=True, normalise=True) gives the same number up
    to an epsilon: it divides the batch by its largest |L| and adds 1e-7 to every value before the
    formula, which shifts G by G * 1e-7 n / sum|L^| relative (L^ the normalised map; below 1e-6 for any
    map whose mean |L^| exceeds 0.1), and gives 0 instead of NaN for an all-zero map. We follow the
    paper: no epsilon.
    """
    values = map_batch(maps).abs().flatten(1)
    n = values.shape[1]
    ordered = torch.sort(values, dim=1).values
    weights = 2 * torch.arange(1, n + 1, dtype=torch.float64) - n - 1
    total = ordered.sum(dim=1)
    gini = (ordered * weights).sum(dim=1) / (n * total)
    return torch.where(total > 0, gini, torch.full_like(gini, float("nan")))


def complexity(maps: torch.Tensor) -> torch.Tensor:
    r"""The entropy of each map's fractional contributions (Bhatt, Weller, Moura, "Evaluating and
    Aggregating Feature-based Model Explanations", IJCAI 2020, section 4.2).

    With P(i) = |L_i| / sum_j |L_j| over the n = H W pixels,

        H(L) = - sum_{i: P(i) > 0} P(i) ln P(i)          (natural logarithm, 0 ln 0 = 0),

    between 0 (all mass on one pixel) and ln n (a uniform map); lower is a simpler explanation.
    ``maps`` (B,H,W); returns (B,) float64, NaN for an all-zero map.

    Quantus 0.6 ``Complexity()`` with its defaults (abs=True, normalise=True) computes
    -sum P ln(P + 1e-12): the same number to within n * 1e-12, and NaN for an all-zero map too.
    """
    magnitudes = map_batch(maps).abs().flatten(1)
    total = magnitudes.sum(dim=1, keepdim=True)
    shares = magnitudes / total
    terms = torch.where(shares > 0, shares * torch.log(shares), torch.zeros_like(shares))
    entropy = -terms.sum(dim=1)
    return torch.where(total[:, 0] > 0, entropy, torch.full_like(entropy, float("nan")))
