"""Backdoor defenses: one class per file, registered by name in :data:`DEFENSES`."""

from tsbd.defenses.base import DEFENSES, Defense, DefenseConfig, DefenseResult, build_defense

__all__ = ["DEFENSES", "Defense", "DefenseConfig", "DefenseResult", "build_defense"]
