"""Memory state beside the frozen model: consolidated slot banks, token stores, raw KV windows."""

from camelot.memory.bank import TELEMETRY_FIELDS, SlotBank
from camelot.memory.store import RawWindow, SinkTokens, TokenStore

__all__ = ["SlotBank", "TokenStore", "RawWindow", "SinkTokens", "TELEMETRY_FIELDS"]
