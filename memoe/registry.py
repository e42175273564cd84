"""One registry per concept (editing methods, data formats, metrics): a name registered twice is an
error, never a silent overwrite, and everything that lists the concept's names reads its registry."""

from __future__ import annotations

from typing import Callable


class Registry(dict):
    """``name -> entry``. ``on_change`` is called after every addition or removal (the method registry
    rebuilds the config's method union with it); ``del registry[name]`` is for tests and plug-ins that
    register something for a while."""

    def __init__(self, kind: str, on_change: Callable[[], None] | None = None):
        super().__init__()
        self.kind, self.on_change = kind, on_change

    def __setitem__(self, name: str, entry) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        super().__setitem__(name, entry)
        if self.on_change:
            self.on_change()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        if self.on_change:
            self.on_change()
