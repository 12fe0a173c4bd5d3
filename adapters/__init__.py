"""Architecture adapters: the only code that knows model internals.

An adapter tells the core, for one family of HF decoder models, which modules are the
attention layers, how positions enter them (rotary, absolute, ALiBi) and how far positions
may go. Look one up with `get_adapter(model)`; an unsupported model type fails there, before
anything is patched.
"""

from __future__ import annotations

from camelot.adapters.base import Adapter, UnsupportedModelError
from camelot.adapters.registry import get_adapter, register_adapter, supported_model_types

__all__ = ["Adapter", "UnsupportedModelError", "get_adapter", "register_adapter", "supported_model_types"]
