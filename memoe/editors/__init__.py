"""The editing methods, one package each (``memoe/editors/<m>/``: ``config.py`` its settings class,
``editor.py`` its ``Editor``, ``__init__.py`` registering the two in ``memoe.methods.METHODS``,
which finds every package here); ``base.py`` the interface every editor implements, ``common.py``
the training helpers they share.

Importing this package imports no torch: ``Editor``, ``EditResult``, ``make_editor`` and
``load_edited`` come from ``memoe.editors.base`` on first use, and ``make_editor`` imports an
editor's module when it is first used.
"""

_FROM_BASE = ("Editor", "EditResult", "make_editor", "load_edited")


def __getattr__(name: str):
    if name in _FROM_BASE:
        from memoe.editors import base

        return getattr(base, name)
    raise AttributeError(f"module 'memoe.editors' has no attribute {name!r}")
