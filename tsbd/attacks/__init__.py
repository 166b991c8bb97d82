"""Backdoor attacks: one class per file, registered by name in :data:`ATTACKS`."""

from tsbd.attacks.base import ATTACKS, Attack, AttackConfig, build_attack, load_trigger_image

__all__ = ["ATTACKS", "Attack", "AttackConfig", "build_attack", "load_trigger_image"]
