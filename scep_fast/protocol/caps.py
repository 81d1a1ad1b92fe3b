"""The GetCACaps answer (RFC 8894 §3.5)."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Capabilities"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What this server really does, as GetCACaps advertises it.

    Every flag defaults to False: a capability is advertised only when the
    caller states that the server implements it. Clients pick algorithms
    and the POST transport from this list, so a keyword we cannot honour
    breaks them later and in a worse way than its absence would.
    """

    aes: bool = False
    des3: bool = False
    get_next_ca_cert: bool = False
    post_pki_operation: bool = False
    renewal: bool = False
    sha1: bool = False
    sha256: bool = False
    sha512: bool = False
    scep_standard: bool = False

    def __post_init__(self) -> None:
        for field in fields(self):
            if not isinstance(getattr(self, field.name), bool):
                raise TypeError(f"Capabilities.{field.name} must be a bool")
        # "SCEPStandard" implies "AES", "POSTPKIOperation" and "SHA-256"
        # (RFC 8894 §3.5.2), so it must not be claimed without them.
        if self.scep_standard and not (self.aes and self.post_pki_operation and self.sha256):
            raise ValueError("scep_standard requires aes, post_pki_operation and sha256")

    def keywords(self) -> tuple[str, ...]:
        """The advertised keywords, in a fixed order (RFC 8894 §3.5.2 table)."""
        # Quirk(various): some clients do not read SCEPStandard as implying
        # AES, POSTPKIOperation and SHA-256, so each one is listed on its own.
        table = (
            (self.aes, "AES"),
            (self.des3, "DES3"),
            (self.get_next_ca_cert, "GetNextCACert"),
            (self.post_pki_operation, "POSTPKIOperation"),
            (self.renewal, "Renewal"),
            (self.sha1, "SHA-1"),
            (self.sha256, "SHA-256"),
            (self.sha512, "SHA-512"),
            (self.scep_standard, "SCEPStandard"),
        )
        return tuple(keyword for enabled, keyword in table if enabled)

    def render(self) -> bytes:
        """The response body: case-sensitive keywords separated by LF.

        RFC 8894 §3.5.2 separates keywords with <LF>; an empty body (no
        capabilities) is valid and tells the client to assume none.
        """
        return "\n".join(self.keywords()).encode("ascii")
