"""Built-in adapters, one per way positions enter attention. `FAMILY_ADAPTERS` is the single list
the registry, the tests (via camelot.adapters.testing) and the compatibility table read."""

from __future__ import annotations

from camelot.adapters.absolute import AbsoluteAdapter
from camelot.adapters.base import Adapter
from camelot.adapters.forward_hooks import BloomAdapter, FalconAdapter
from camelot.adapters.rotary import (
    GPTJAdapter,
    InterleavedRotaryAdapter,
    NoPERotaryAdapter,
    PartialRotaryAdapter,
    RotaryAdapter,
)

FAMILY_ADAPTERS: tuple[Adapter, ...] = (
    RotaryAdapter(), NoPERotaryAdapter(), PartialRotaryAdapter(), InterleavedRotaryAdapter(), GPTJAdapter(),
    AbsoluteAdapter(), FalconAdapter(), BloomAdapter(),
)
