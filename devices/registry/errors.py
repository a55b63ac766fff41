"""The registry's own errors; every interface maps them to its way of saying no (HTTP status, exit code)."""

from __future__ import annotations


class RegistryError(Exception):
    """Base of the registry's errors; ``str()`` is a sentence for the user."""

    status = 400


class NotFoundError(RegistryError):
    """An identifier that names nothing in the registry."""

    status = 404


class ConflictError(RegistryError):
    """The change contradicts what is stored (duplicate id, overlapping assignment or prescription)."""

    status = 409


class InvalidError(RegistryError):
    """Input that is well-formed but makes no sense (an empty class range, an unknown zone)."""

    status = 422


class ContraindicatedError(ConflictError):
    """A prescription conflicts with a recorded contraindication and no override was given."""


class ConfirmationNeededError(ConflictError):
    """A change that can hide a safety alert (raising a boot's maximum pressure) was made without a reason."""


class ForbiddenError(RegistryError):
    """The caller's role or clinic does not allow this."""

    status = 403


class ThrottledError(RegistryError):
    """Too many wrong passwords for this account or from this address: try again after ``retry_after_s``."""

    status = 429

    def __init__(self, retry_after_s: float):
        self.retry_after_s = max(1, int(retry_after_s + 0.999))
        minutes = (self.retry_after_s + 59) // 60
        when = f"{self.retry_after_s} seconds" if self.retry_after_s < 90 else f"{minutes} minutes"
        super().__init__(f"too many wrong passwords for this e-mail or from this network; try again in {when}")
