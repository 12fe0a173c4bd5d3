"""Memory state beside the frozen model: consolidated slot banks, token stores, InfLLM blocks, raw KV
windows."""

from camelot.memory.bank import TELEMETRY_FIELDS, SlotBank
from camelot.memory.blocks import BlockMemory
from camelot.memory.store import RawWindow, SinkTokens, TokenStore

__all__ = ["BlockMemory", "SlotBank", "TokenStore", "RawWindow", "SinkTokens", "TELEMETRY_FIELDS"]
