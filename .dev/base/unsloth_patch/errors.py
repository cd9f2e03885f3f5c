"""Errors meant for the user: they pass through the patches' failure containment."""


class UnslothPatchError(ValueError):
    """A request the plugin cannot honour (e.g. a toggle forced 'on' where it is impossible)."""
