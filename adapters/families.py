"""Built-in adapters, one per way positions enter attention."""

from __future__ import annotations

from camelot.adapters.base import Adapter
from camelot.adapters.registry import register_adapter


class RotaryAdapter(Adapter):
    """Rotary position embedding on the head (llama family and its many descendants)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    positions = "rotary"
    notes = "keys stored un-rotated; memory placed `memory_distance` positions before the segment"


register_adapter(RotaryAdapter())
