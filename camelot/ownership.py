"""A CamelotModel owns its model exclusively, and one call runs at a time.

- After `unwrap()` (or once another wrapper took the model) every call on the old wrapper
  raises `UnwrappedError`: it no longer drives the model, never touches the attention hooks of a
  wrapper that took the model since, and a second `unwrap()` cannot undo the new wrap.
- Calls from several threads on one wrapper are serialised by a per-wrapper re-entrant lock:
  the state (open segment, memory) is one stream, so two interleaved documents would corrupt
  each other's results. Threads wait for each other; for parallel work, wrap one model copy
  per thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UnwrappedError(RuntimeError):
    """A call on a CamelotModel that no longer owns its model."""


def check_owner(cm: Any) -> None:
    """Raise unless `cm` still wraps its model."""
    if getattr(cm, "_unwrapped", False):
        raise UnwrappedError("this CamelotModel was unwrapped and no longer drives its model; wrap the model "
                             "again (camelot.wrap(model)) to use camelot")
    if getattr(cm.model, "_camelot_wrapper", None) is not cm:
        raise UnwrappedError("this CamelotModel no longer owns its model (it was unwrapped or wrapped anew)")


def exclusive(method: F) -> F:
    """Run the method under the wrapper's lock, after checking it still owns its model."""
    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            check_owner(self)
            return method(self, *args, **kwargs)
    return run  # type: ignore[return-value]


def exclusive_view(method: F) -> F:
    """`exclusive` for `cm.memory` (MemoryView) methods that read or replace the whole state."""
    @functools.wraps(method)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        with self.cm._lock:
            check_owner(self.cm)
            return method(self, *args, **kwargs)
    return run  # type: ignore[return-value]
