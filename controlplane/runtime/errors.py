"""Errors raised by the container runtime; callers catch ``ContainerRuntimeError``."""

from __future__ import annotations


class ContainerRuntimeError(Exception):
    """Base of every runtime failure, so callers need one ``except`` for the engine."""


class ImageMissing(ContainerRuntimeError):
    """The image is not present on the engine; images are never pulled."""

    def __init__(self, image: str) -> None:
        super().__init__(f"image {image!r} is not present on the Docker engine (images are never pulled)")
        self.image = image


class PolicyViolation(ContainerRuntimeError):
    """The spec asks for something the operator has not allowed; ``code`` says what, for
    the outcome a caller reads (``image-not-allowed``, ``policy-refused``, ``name-taken``)."""

    def __init__(self, reason: str, code: str = "policy-refused") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class RuntimeUnavailable(ContainerRuntimeError):
    """The Docker engine does not answer."""
