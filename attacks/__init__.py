"""Backdoor poisoning and adversarial example generation, for evaluating defences."""

from .adversarial import AdversarialResult, cw_l2, default_eps, fgsm, pgd, quantize, run_attack
from .badnets import BadNets
from .base import REGISTRY, BackdoorAttack, PoisonedData, TriggeredSet, make_attack, register
from .blend import Blend
from .label_consistent import LabelConsistent
from .sig import SIG
from .trojan import Trojan
from .wanet import WaNet, WaNetPoisonedData

__all__ = [
    "REGISTRY", "AdversarialResult", "BackdoorAttack", "BadNets", "Blend", "LabelConsistent", "PoisonedData", "SIG",
    "TriggeredSet", "Trojan", "WaNet", "WaNetPoisonedData", "cw_l2", "default_eps", "fgsm", "make_attack", "pgd",
    "quantize", "register", "run_attack",
]
