"""The CA and RA material of a scep-fast directory: created by `init`, loaded by `serve`.

Keys are written with mode 0600 from the moment the file exists (never
chmod-ed after the fact), and the directory itself is 0700.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scep_fast.crypto import NativeKey, der_certificate, der_private_key
from scep_fast.crypto.x509sign import public_key, sign_certificate, signed_data
from scep_fast.runtime.config import Config
from scep_fast.runtime.keys import KeyRef, TokenKey, is_token_uri, native_key

CA_KEY_TYPES = ("rsa2048", "rsa3072", "rsa4096", "p256", "p384")
CA_VALIDITY_DAYS = 3650
RA_VALIDITY_DAYS = 730

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
# A key that signs what init and rollover build: held by this process, or by
# the native core (a token key, whose private part never leaves the token).
SigningKey = PrivateKey | NativeKey


def new_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def new_key(kind: str) -> PrivateKey:
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}[kind]
    return ec.generate_private_key(curve)


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _serial() -> int:
    # 127 random bits: positive, and far more than RFC 5280's 64 bits of entropy.
    return secrets.randbits(127) | 1


def _public(key: SigningKey) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    return public_key(key) if isinstance(key, NativeKey) else key.public_key()


def _signed(builder: x509.CertificateBuilder, key: SigningKey) -> x509.Certificate:
    if isinstance(key, NativeKey):
        return sign_certificate(builder, key)
    return builder.sign(key, _signature_hash(key))


def make_ca(key: SigningKey, cn: str, now: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ski = x509.SubjectKeyIdentifier.from_public_key(_public(key))
    return _signed(
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_public(key))
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(minutes=10))
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False),
            critical=True)
        .add_extension(ski, critical=False),
        key,
    )


# What an RA certificate is for: one RA does both (clients check both usages);
# an NDES-style pair splits them between a signing and an encryption RA.
RA_USAGES = ("both", "signing", "encryption")


def make_ra(key: SigningKey, cn: str, ca: x509.Certificate, ca_key: SigningKey,
            now: datetime.datetime, usage: str = "both") -> x509.Certificate:
    """An RA certificate, RSA: digitalSignature + keyEncipherment, or one of them.

    ``usage`` "signing" (digitalSignature only) and "encryption"
    (keyEncipherment only) make the two halves of an NDES-style RA pair:
    clients written against NDES envelope to the one without
    digitalSignature and verify replies with the other.
    """
    if usage not in RA_USAGES:
        raise ValueError(f"unknown RA usage {usage!r}")
    ra_public = _public(key)
    if not isinstance(ra_public, rsa.RSAPublicKey):
        raise ValueError("the RA key must be RSA (SCEP clients encrypt to it)")
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return _signed(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(ra_public)
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(minutes=10))
        .not_valid_after(now + datetime.timedelta(days=RA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=usage != "encryption", content_commitment=False,
                          key_encipherment=usage != "signing", data_encipherment=False,
                          key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ra_public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False),
        ca_key,
    )


def write_secret(path: Path, data: bytes) -> None:
    """Creates ``path`` with mode 0600 and writes ``data``; refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class PreviousCa:
    """A retired CA (DIR/previous/<id>/), DER; in CA mode ra_* repeat ca_*."""

    ca_cert: bytes
    ca_key: KeyRef
    ra_cert: bytes
    ra_key: KeyRef
    # The retired encryption RA of an NDES-style pair (certificate, key file DER).
    ra_encryption: tuple[bytes, bytes] | None = None


@dataclass(frozen=True, slots=True)
class Material:
    """DER certificates, and keys as DER or as references into a token.

    A token key is not opened here: whoever needs it (a worker, the CRL
    writer) opens it in its own process with ``keys.open_key``.
    """

    mode: str
    ca_cert: bytes
    ca_key: KeyRef
    ra_cert: bytes
    ra_key: KeyRef
    challenge: bytes
    # Retired CAs, newest first: their CRLs are still signed, and their RA
    # keys still decrypt requests from clients holding the old RA certificate.
    previous: tuple[PreviousCa, ...] = ()
    # The GetNextCACert body while a next CA waits in DIR/next (see rollover).
    next_message: bytes | None = None
    # The encryption RA of an NDES-style pair (certificate DER, key), or None:
    # requests enveloped to it are opened; ra_cert (the signing RA) signs.
    ra_encryption: tuple[bytes, KeyRef] | None = None

    @property
    def signer(self) -> tuple[bytes, KeyRef]:
        return (self.ca_cert, self.ca_key) if self.mode == "ca" else (self.ra_cert, self.ra_key)


def uses_token(config: Config) -> bool:
    """Whether a CA or RA key of the directory, current or retired, lives in a PKCS#11 token."""
    if any(is_token_uri(str(config.get("pki", name))) for name in ("ca_key", "ra_key")):
        return True
    return any((config.dir / PREVIOUS_DIR).glob(f"*/*{_URI_SUFFIX}"))


def _token_key(config: Config, uri: str) -> TokenKey:
    return TokenKey(uri=uri, module=str(config.get("pki", "pkcs11_module")),
                    pin_file=config.path("pki", "pkcs11_pin_file"))


def key_ref(config: Config, name: str) -> KeyRef:
    """``pki.<name>``: the DER of a key file, or a reference to a key in a token."""
    value = str(config.get("pki", name))
    if is_token_uri(value):
        return _token_key(config, value)
    return der_private_key((config.dir / value).read_bytes())


def load_material(config: Config, *, next_message: bool = True) -> Material:
    """The directory's CA and RA material.

    ``next_message=False`` leaves out the GetNextCACert body, which needs the
    signer key: the supervisor, which never opens a token, asks that way.
    """
    mode = str(config.get("pki", "mode"))
    ca_cert = der_certificate(config.path("pki", "ca_cert").read_bytes())
    ca_key = key_ref(config, "ca_key")
    if mode == "ca":
        ra_cert, ra_key = ca_cert, ca_key
    else:
        ra_cert = der_certificate(config.path("pki", "ra_cert").read_bytes())
        ra_key = key_ref(config, "ra_key")
    challenge_path = config.path("enrollment", "challenge_file")
    challenge = challenge_path.read_bytes().strip() if challenge_path.exists() else b""
    signer = (ca_cert, ca_key) if mode == "ca" else (ra_cert, ra_key)
    return Material(mode=mode, ca_cert=ca_cert, ca_key=ca_key, ra_cert=ra_cert, ra_key=ra_key,
                    challenge=challenge, previous=load_previous(config),
                    next_message=next_ca_message(config, signer, ca_cert) if next_message
                    else None,
                    ra_encryption=load_ra_encryption(config))


def has_ra_pair(config: Config) -> bool:
    """Whether the directory has an NDES-style RA pair (``init --ra-pair``)."""
    return bool(config.get("pki", "ra_encryption_cert"))


def load_ra_encryption(config: Config) -> tuple[bytes, KeyRef] | None:
    """The encryption RA of an RA pair, certificate DER and key DER, or None."""
    if not has_ra_pair(config):
        return None
    return (der_certificate(config.path("pki", "ra_encryption_cert").read_bytes()),
            der_private_key(config.path("pki", "ra_encryption_key").read_bytes()))


# ---- CA rollover ---------------------------------------------------------------
#
# DIR/next/      the next CA (ca.pem, ca.key) and, in RA mode, its RA (ra.pem,
#                ra.key; with an NDES-style pair also ra-encryption.pem and
#                ra-encryption.key), made by `scep-fast ca rollover` and offered
#                by GetNextCACert (RFC 8894 section 4.7) until `ca activate`.
# DIR/previous/<id>/  every retired CA with its RA (and encryption RA), <id>
#                being ca_id() of the CA: its CRL is still signed and its RA
#                keys still decrypt.

NEXT_DIR = "next"
PREVIOUS_DIR = "previous"
_CA_CERT, _CA_KEY, _RA_CERT, _RA_KEY = "ca.pem", "ca.key", "ra.pem", "ra.key"
# The encryption RA of an NDES-style pair, in next/ and previous/<id>/ (always a key file).
_RA_ENC_CERT, _RA_ENC_KEY = "ra-encryption.pem", "ra-encryption.key"
# A key in a token is kept in next/ and previous/<id>/ as its URI: ca.uri, ra.uri.
_URI_SUFFIX = ".uri"
_SLOTS = {"ca_key": "ca", "ra_key": "ra"}
CA_ID = re.compile(r"[0-9a-f]{16,128}")


class RolloverError(Exception):
    """A rollover or activation cannot be done; the text says why."""


def ca_id(ca_cert_der: bytes) -> str:
    """A stable name of a CA: its subjectKeyIdentifier in lower-case hex.

    A CA certificate without one is named by the SHA-1 of its
    subjectPublicKeyInfo (RFC 5280 section 4.2.1.2, method 1, over the
    whole SPKI), so the name depends on the key only.
    """
    cert = x509.load_der_x509_certificate(ca_cert_der)
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        if ski.digest:
            return ski.digest.hex()
    except x509.ExtensionNotFound:
        pass
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(spki, usedforsecurity=False).hexdigest()


def _read_pair(config: Config, directory: Path, cert_name: str,
               key_name: str) -> tuple[bytes, KeyRef]:
    """A certificate and its key: a key file, or the URI of a key in a token."""
    uri_file = directory / key_name.replace(".key", _URI_SUFFIX)
    key: KeyRef
    if uri_file.exists():
        key = _token_key(config, uri_file.read_text().strip())
    else:
        key = der_private_key((directory / key_name).read_bytes())
    return der_certificate((directory / cert_name).read_bytes()), key


def load_previous(config: Config) -> tuple[PreviousCa, ...]:
    """The retired CAs of the directory, newest first."""
    root = config.dir / PREVIOUS_DIR
    if not root.is_dir():
        return ()
    found: list[tuple[datetime.datetime, PreviousCa]] = []
    for entry in sorted(root.iterdir()):
        # Half-written archives (a crash in `ca activate`) end in ".tmp".
        if not entry.is_dir() or CA_ID.fullmatch(entry.name) is None:
            continue
        ca_cert, ca_key = _read_pair(config, entry, _CA_CERT, _CA_KEY)
        if (entry / _RA_CERT).exists():
            ra_cert, ra_key = _read_pair(config, entry, _RA_CERT, _RA_KEY)
        else:
            ra_cert, ra_key = ca_cert, ca_key
        ra_encryption = None
        if (entry / _RA_ENC_CERT).exists():
            ra_encryption = (der_certificate((entry / _RA_ENC_CERT).read_bytes()),
                             der_private_key((entry / _RA_ENC_KEY).read_bytes()))
        not_before = x509.load_der_x509_certificate(ca_cert).not_valid_before_utc
        found.append((not_before, PreviousCa(ca_cert, ca_key, ra_cert, ra_key, ra_encryption)))
    found.sort(key=lambda item: item[0], reverse=True)
    return tuple(previous for _, previous in found)


def next_ca_certificates(config: Config) -> tuple[bytes, ...]:
    """The next RA (RA mode; signing then encryption RA for a pair) and CA certificates, DER.

    () when there is none.
    """
    directory = config.dir / NEXT_DIR
    if not (directory / _CA_CERT).exists():
        return ()
    names = [_RA_CERT, _RA_ENC_CERT, _CA_CERT]
    return tuple(der_certificate((directory / name).read_bytes()) for name in names
                 if (directory / name).exists())


def next_ca_message(config: Config, signer: tuple[bytes, KeyRef],
                    ca_cert: bytes) -> bytes | None:
    """The GetNextCACert body, or None while no next CA exists.

    RFC 8894 section 4.7.1: a SignedData signed by the current CA or RA
    key whose content is a degenerate certs-only SignedData (section 3.4)
    holding the new CA certificate and any new RA certificates. The
    signer's certificate and the current CA certificate travel in the
    outer SignedData so that a client can check the signature against the
    CA it trusts today.
    """
    from scep_fast.crypto import certs_only

    certs = next_ca_certificates(config)
    if not certs:
        return None
    # Signed by the core, whether the signer key is a file or in a token.
    extra = (ca_cert,) if signer[0] != ca_cert else ()
    return signed_data(certs_only(list(certs)), signer[0], native_key(signer[1]), extra)


def _next_cn(current: x509.Certificate) -> str:
    names = current.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else "scep-fast CA"
    # A fresh name per generation ("... G2", "... G3") keeps the issuer
    # names of old and new certificates apart, so a CRL or a GetCRL lookup
    # by issuer name is never ambiguous.
    match = re.fullmatch(r"(.*) G(\d+)", cn)
    if match:
        return f"{match.group(1)} G{int(match.group(2)) + 1}"
    return f"{cn} G2"


def rollover(config: Config, ca_key_type: str, now: datetime.datetime, *,
             ca_cn: str | None = None, ca_key_uri: str | None = None,
             ra_key_uri: str | None = None, generate_in_token: bool = False) -> Path:
    """Makes the next CA (and RA) in DIR/next; refuses when one exists already.

    New keys are files, generated here; or, for ``ca_key_uri`` / ``ra_key_uri``,
    keys in the directory's token (generated there with ``generate_in_token``),
    kept in DIR/next as their URIs.
    """
    from scep_fast.runtime import keys

    if ca_key_type not in CA_KEY_TYPES:
        raise RolloverError(f"unknown CA key type {ca_key_type!r}")
    mode = str(config.get("pki", "mode"))
    uris = {"ca_key": ca_key_uri}
    if mode == "ra":
        uris["ra_key"] = ra_key_uri
    token_uris = {name: uri for name, uri in uris.items() if uri}
    if generate_in_token and not token_uris:
        raise RolloverError("--generate-in-token needs --ca-key-uri or --ra-key-uri")
    if mode == "ca" and not ca_key_type.startswith("rsa") and (
            not ca_key_uri or generate_in_token):
        raise RolloverError("CA mode needs an RSA CA key (it decrypts requests)")
    target = config.dir / NEXT_DIR
    if target.exists():
        raise RolloverError(f"{target} exists: activate it (`scep-fast ca activate`) first")
    refs: dict[str, TokenKey] = {}
    if token_uris:
        if not config.get("pki", "pkcs11_module") or not config.get("pki", "pkcs11_pin_file"):
            raise RolloverError("keys in a token need pki.pkcs11_module and "
                                "pki.pkcs11_pin_file in the config")
        for name, uri in token_uris.items():
            keys.check_uri(uri)
            if uri == str(config.get("pki", name)):
                raise RolloverError(f"{uri} is the current key; name the next one")
            refs[name] = _token_key(config, uri)
    try:
        if generate_in_token:
            for ref in refs.values():
                if _token_has(ref):
                    raise RolloverError(f"{ref.uri} exists in the token; not generating another")
            for name, ref in refs.items():
                keys.generate_in_token(ref, ca_key_type if name == "ca_key" else "rsa2048")
        loaded = {name: native_key(ref) for name, ref in refs.items()}
    except keys.KeyLoadError as e:
        raise RolloverError(str(e)) from None
    decrypting = loaded.get("ra_key") or (loaded.get("ca_key") if mode == "ca" else None)
    if decrypting is not None and not isinstance(public_key(decrypting), rsa.RSAPublicKey):
        raise RolloverError("the key that decrypts requests (RA, or the CA in CA mode) must be RSA")
    current = x509.load_der_x509_certificate(
        der_certificate(config.path("pki", "ca_cert").read_bytes()))
    ca_key: SigningKey = loaded["ca_key"] if "ca_key" in loaded else new_key(ca_key_type)
    ca = make_ca(ca_key, ca_cn or _next_cn(current), now)
    staging = config.dir / f"{NEXT_DIR}.{secrets.token_hex(4)}.tmp"
    staging.mkdir(mode=0o700)
    try:
        _write_key(staging, _CA_KEY, ca_key, refs.get("ca_key"))
        write_public(staging / _CA_CERT, cert_pem(ca))
        if mode == "ra":
            ra_names = x509.load_der_x509_certificate(der_certificate(
                config.path("pki", "ra_cert").read_bytes())).subject.get_attributes_for_oid(
                    NameOID.COMMON_NAME)
            ra_cn = str(ra_names[0].value) if ra_names else "scep-fast RA"
            ra_key: SigningKey = loaded["ra_key"] if "ra_key" in loaded else new_rsa_key(2048)
            pair = has_ra_pair(config)
            _write_key(staging, _RA_KEY, ra_key, refs.get("ra_key"))
            write_public(staging / _RA_CERT, cert_pem(make_ra(
                ra_key, ra_cn, ca, ca_key, now, usage="signing" if pair else "both")))
            if pair:
                # The next encryption RA of an NDES-style pair: a new key file.
                enc_names = x509.load_der_x509_certificate(der_certificate(
                    config.path("pki", "ra_encryption_cert").read_bytes())
                ).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                enc_cn = str(enc_names[0].value) if enc_names else "scep-fast RA encryption"
                enc_key = new_rsa_key(2048)
                write_secret(staging / _RA_ENC_KEY, key_pem(enc_key))
                write_public(staging / _RA_ENC_CERT, cert_pem(make_ra(
                    enc_key, enc_cn, ca, ca_key, now, usage="encryption")))
        _fsync_dir(staging)
        # One rename: DIR/next appears complete or not at all.
        os.rename(staging, target)
        _fsync_dir(config.dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _token_has(ref: TokenKey) -> bool:
    from scep_fast.runtime.keys import KeyLoadError

    try:
        native_key(ref)
    except KeyLoadError:
        return False
    return True


def _write_key(directory: Path, name: str, key: SigningKey, ref: TokenKey | None) -> None:
    """A new key file (0600), or for a key in a token its URI."""
    if ref is not None:
        write_public(directory / name.replace(".key", _URI_SUFFIX), ref.uri.encode() + b"\n")
    elif isinstance(key, NativeKey):
        raise RolloverError("a key held by the core has no file")
    else:
        write_secret(directory / name, key_pem(key))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def activate(config: Config) -> tuple[str, str]:
    """Makes the next CA the current one; returns (old id, new id).

    The current CA and RA are first copied to DIR/previous/<id> (built
    aside, then renamed into place; a key in a token as its URI), then the
    next files replace the current ones one rename each, the CA certificate
    last. A next key in a token, or a next key file where the current key is
    in a token, changes ``pki.ca_key`` / ``pki.ra_key`` in scep-fast.toml,
    which is replaced in one rename before the certificates. A crash in
    between is repaired by running activate again: while DIR/next/ca.pem
    exists, the current CA certificate is still the old one.
    """
    source = config.dir / NEXT_DIR
    if not source.is_dir():
        raise RolloverError("no next CA: run `scep-fast ca rollover` first")
    pair = has_ra_pair(config)
    if pair and (source / _CA_CERT).exists() and not (source / _RA_ENC_CERT).exists():
        raise RolloverError(f"{source} has no {_RA_ENC_CERT} for the RA pair: remove it and "
                            "run `scep-fast ca rollover` again")
    names = ["ca_key"] + (["ra_key"] if str(config.get("pki", "mode")) == "ra" else [])
    cert_targets = {_CA_CERT: config.path("pki", "ca_cert")}
    if "ra_key" in names:
        cert_targets[_RA_CERT] = config.path("pki", "ra_cert")
    if pair:
        cert_targets[_RA_ENC_CERT] = config.path("pki", "ra_encryption_cert")
    if (source / _CA_CERT).exists():
        old_cert = der_certificate(cert_targets[_CA_CERT].read_bytes())
        new_cert = der_certificate((source / _CA_CERT).read_bytes())
        old_id, new_id = ca_id(old_cert), ca_id(new_cert)
        archive = config.dir / PREVIOUS_DIR / old_id
        if not archive.exists():
            archive.parent.mkdir(mode=0o700, exist_ok=True)
            staging = archive.with_name(f"{old_id}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700)
            for cert_name, path in cert_targets.items():
                write_public(staging / cert_name, path.read_bytes())
            for name in names:
                value = str(config.get("pki", name))
                file_name = f"{_SLOTS[name]}.key"
                if is_token_uri(value):
                    write_public(staging / file_name.replace(".key", _URI_SUFFIX),
                                 value.encode() + b"\n")
                else:
                    write_secret(staging / file_name, (config.dir / value).read_bytes())
            if pair:
                write_secret(staging / _RA_ENC_KEY,
                             config.path("pki", "ra_encryption_key").read_bytes())
            _fsync_dir(staging)
            os.rename(staging, archive)
            _fsync_dir(archive.parent)
    else:
        # Only the empty directory is left of an interrupted activation.
        new_id = ca_id(der_certificate(cert_targets[_CA_CERT].read_bytes()))
        old_id = ""
    values = {section: dict(table) for section, table in config.values.items()}
    values["profiles"] = config.values["profiles"]
    retired_files: list[Path] = []
    for name in names:
        value = str(config.get("pki", name))
        uri_file = source / f"{_SLOTS[name]}{_URI_SUFFIX}"
        key_file = source / f"{_SLOTS[name]}.key"
        if uri_file.exists():
            values["pki"][name] = uri_file.read_text().strip()
            if not is_token_uri(value):
                retired_files.append(config.dir / value)  # archived above
        elif key_file.exists():
            target_name = f"{_SLOTS[name]}.key" if is_token_uri(value) else value
            os.replace(key_file, config.dir / target_name)
            values["pki"][name] = target_name
    if pair and (source / _RA_ENC_KEY).exists():
        os.replace(source / _RA_ENC_KEY, config.path("pki", "ra_encryption_key"))
    if values["pki"] != config.values["pki"]:
        _replace_config(config, values)
    _fsync_dir(config.dir)
    for cert_name in (_RA_CERT, _RA_ENC_CERT, _CA_CERT):
        if cert_name in cert_targets and (source / cert_name).exists():
            os.replace(source / cert_name, cert_targets[cert_name])
    _fsync_dir(config.dir)
    for path in retired_files:
        # A key file whose successor is in a token: kept only in the archive.
        path.unlink(missing_ok=True)
    shutil.rmtree(source)
    _fsync_dir(config.dir)
    return old_id, new_id


def _replace_config(config: Config, values: dict[str, dict[str, object]]) -> None:
    """scep-fast.toml with new values, checked, then replaced in one rename."""
    from scep_fast.runtime import config as configuration

    text = configuration.render(values)
    configuration.parse(text, config.dir)
    path = config.dir / configuration.CONFIG_NAME
    staging = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)
