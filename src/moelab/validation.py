"""The one validation helper of moelab's config dataclasses.

Every config validates itself in ``__post_init__`` with :func:`require`, naming its *bare*
field (``require(self.beta < 1, "beta", self.beta, "need beta < 1")``). The error carries the
field name, so the config loader (``moelab.config``) can prefix the dotted path it built the
dataclass at (``model.default_moe.beta=1.5 is invalid: need beta < 1``) without parsing text.
"""

from __future__ import annotations

__all__ = ["FieldError", "require"]


class FieldError(ValueError):
    """A config field has an invalid value. ``field`` is relative to the dataclass that
    raised it (``"beta"``, or ``"momentum.adam_layers"`` for a cross-field check)."""

    def __init__(self, field: str, value: object, what: str) -> None:
        self.field, self.value, self.what = field, value, what
        super().__init__(f"{field}={value!r} is invalid: {what}")

    def at(self, path: str) -> FieldError:
        """The same error with ``path`` ("model.moe") prefixed to the field."""
        return FieldError(f"{path}.{self.field}" if path else self.field, self.value, self.what)


def require(cond: bool, field: str, value: object, what: str) -> None:
    """Raise ``FieldError(field, value, what)`` unless ``cond``."""
    if not cond:
        raise FieldError(field, value, what)
