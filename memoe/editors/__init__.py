"""Editors behind one interface (``memoe.editors.base.Editor``).

Each method is registered with its settings class and its editor in ``memoe.config.METHODS``
(``register_method``); ``make_editor`` imports the editor's module when it is first used.
"""
from memoe.editors.base import Editor, load_edited, make_editor  # noqa: F401
