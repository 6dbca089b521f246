"""Backdoor poisoning and adversarial example generation, for evaluating defences."""

from .badnets import BadNets
from .base import REGISTRY, BackdoorAttack, PoisonedData, TriggeredSet, make_attack, register

__all__ = ["REGISTRY", "BackdoorAttack", "BadNets", "PoisonedData", "TriggeredSet", "make_attack", "register"]
