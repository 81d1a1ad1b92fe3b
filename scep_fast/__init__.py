"""scep-fast: a fast, trustworthy SCEP (RFC 8894) enrollment server."""

__version__ = "0.1.0"
