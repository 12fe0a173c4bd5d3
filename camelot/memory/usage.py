"""Attention mass that a slot bank's slots received in a read, for write rules that rank slots
by use (rules.py). The attention function calls `note_reads` once per forward where the
memory `wants_received`; nothing is computed otherwise."""

from __future__ import annotations


def note_reads(memory: object, attribution: object) -> None:
    """attribution.slots, .weights [B, Hkv, G, m, k]: the slots each query read and its share of
    attention on each (camelot.reads.ReadAttribution); their sum per slot goes to
    `memory.observe_reads`."""
    slots, weights = attribution.slots, attribution.weights
    b, hkv = weights.shape[:2]
    mass = weights.new_zeros(b, hkv, memory.slots)
    mass.scatter_add_(2, slots.reshape(b, hkv, -1), weights.reshape(b, hkv, -1).float())
    memory.observe_reads(mass)
