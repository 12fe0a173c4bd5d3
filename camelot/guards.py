"""Input checks of the low-level API (`cm.step`, `generate`'s pad token), raised before any
state changes: a bad id that reached the embedding would fail deep inside torch (on cuda: a
device assert that poisons the whole process) after the open segment was already advanced."""

from __future__ import annotations

from typing import Any

import torch


def check_int(name: str, value: Any, low: int) -> None:
    """An integer option (a bool is not one) of at least `low`, or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value}")


def check_step_ids(ids: Any, vocab: int) -> None:
    """Token ids [B, m] as the model takes them: an int64/int32 tensor, B >= 1 rows, m >= 1 ids in
    [0, vocab). `cm.step` takes only this; `as_batch` checks documents with it. One host sync."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"token ids must be a tensor [batch, m], got {type(ids).__name__}")
    if ids.dtype not in (torch.long, torch.int32):  # what an embedding takes
        raise TypeError(f"token ids must be integers, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"token ids must be [batch, m], got shape {tuple(ids.shape)} (use ids[None] for one row)")
    if ids.shape[0] == 0:
        raise ValueError(f"token ids hold a batch of 0 rows (shape {tuple(ids.shape)})")
    if ids.shape[1] == 0:
        raise ValueError("empty input: no tokens to read")
    if ids.device.type == "meta":  # holds no values: range checks and copies would fail inside torch
        raise ValueError("token ids are on the meta device and hold no values; give them on cpu or the "
                         "model's device")
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one sync for both
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}); got range [{lo}, {hi}]")


def check_pad_token(gc: Any, vocab: int) -> None:
    """The pad id of a prepared GenerationConfig (given, or defaulted from eos) lies in the
    vocabulary: finished rows step it into the model, so an id out of range would fail
    mid-generation, after the prompt was read."""
    pad = getattr(gc, "_pad_token_tensor", None)
    if pad is None:
        pad = getattr(gc, "pad_token_id", None)
    if pad is None:
        return
    ids = torch.as_tensor(pad).flatten()
    if ids.is_floating_point() or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab)):
        raise ValueError(f"generate: pad_token_id={gc.pad_token_id} is not a token id of this model "
                         f"(vocabulary [0, {vocab}))")


def as_batch(ids: Any, vocab: int, device: torch.device) -> torch.Tensor:
    """A document's ids ([N] or [B, N], tensor or list) as a long [B, N] tensor on `device`."""
    if isinstance(ids, (list, tuple)):
        # No dtype here: floats must reach the integer check below, not be truncated silently.
        ids = torch.tensor(ids)
        if ids.numel() == 0:
            ids = ids.long()
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"token ids must be a tensor or a list of ints, got {type(ids).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    check_step_ids(ids, vocab)
    return ids.to(device).long() if ids.device != device else ids.long()


def check_state_devices(modules, runtimes) -> None:
    """Memory stays on the device its layer had when it was written. A model moved since
    (`model.to(...)`) would meet it deep inside torch with a device-mismatch error, so refuse
    here, naming both devices. One attribute check per layer and step: cheap."""
    for m, rt in zip(modules, runtimes):
        held = rt.state.device()
        if held is None:
            continue
        p = next(m.parameters(), None)
        if p is not None and p.device != held:
            raise ValueError(
                f"layer {rt.layer_idx}: camelot memory is on {held} but the model's layer is now on {p.device}; "
                "move the model back, or call reset() (the memory is lost) to use the new device")
