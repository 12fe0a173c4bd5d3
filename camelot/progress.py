"""Progress bars that stay out of the way when output is not a terminal or when disabled."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str = "", enabled: bool = True, **kwargs) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, leave=False, dynamic_ncols=True, **kwargs)
