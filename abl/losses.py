"""The two losses of Anti-Backdoor Learning (Li et al., NeurIPS 2021): local gradient ascent and the ascent term.

:func:`lga_loss` is the isolation stage's loss, in the official code's flooding form by default (deviation:
``docs/abl.md#lga-form``); :func:`ascent_term` is the per-example term the unlearning stage minimises, the paper's
negated cross-entropy or a complementary-label variant kept as a switch (``docs/abl.md#measured-options``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ASCENT_FORMS, LGA_FORMS
from .train import log_odds_against


def lga_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, form: str = "flooding") -> torch.Tensor:
    """Local gradient ascent loss.

    ``flooding``: ``|L - gamma| + gamma`` on the batch-mean cross-entropy ``L`` (gradient ``sign(L - gamma) dL``).
    ``per-example``: ``mean_i sign(l_i - gamma) * l_i``; every example below ``gamma`` is pushed back up on its own.
    """
    if form == "flooding":
        return (F.cross_entropy(logits, labels) - gamma).abs() + gamma
    if form == "per-example":
        per = F.cross_entropy(logits, labels, reduction="none")
        return (torch.sign(per - gamma) * per).mean()
    raise ValueError(f"lga form must be one of {LGA_FORMS}, got {form!r}")


def ascent_term(logits: torch.Tensor, labels: torch.Tensor, form: str = "negated-ce") -> torch.Tensor:
    """Per-example loss whose *minimisation* unlearns ``labels`` (the ascent half of ABL's unlearning).

    ``negated-ce`` (the paper): ``-CE = log p_y``. Its gradient ``-(1 - p_y)`` on the label logit vanishes while the
    example is still fitted (``p_y`` near 1) and grows to 1 as ``p_y`` falls, so the ascent starts slowly and then
    runs away. ``complement``: ``-log(1 - p_y)``, the cross-entropy towards "any class but y" (a complementary
    label). Its gradient on the label logit is ``p_y``: full strength while the example is fitted, vanishing once
    ``p_y`` is small, so it breaks the link and then stops pushing by itself.
    """
    if form == "negated-ce":
        return -F.cross_entropy(logits, labels, reduction="none")
    if form == "complement":
        return F.softplus(-log_odds_against(logits, labels))
    raise ValueError(f"ascent form must be one of {ASCENT_FORMS}, got {form!r}")
