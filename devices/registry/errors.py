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
