"""GetCACert with an NDES-style RA pair: the client picks the RAs by key usage.

The pair is made by `scep_fast.runtime.pki.make_ra`, as `init --ra-pair` makes it.
"""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scep_fast.client import ResponseError, parse_ca_certs
from scep_fast.crypto import certs_only
from scep_fast.runtime import pki

DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def pair() -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """(CA, signing RA, encryption RA)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = pki.new_rsa_key(2048)
    ca = pki.make_ca(ca_key, "pair CA", now)
    signing = pki.make_ra(pki.new_rsa_key(2048), "pair RA", ca, ca_key, now, usage="signing")
    encryption = pki.make_ra(pki.new_rsa_key(2048), "pair RA enc", ca, ca_key, now,
                             usage="encryption")
    return ca, signing, encryption


def _usage(cert: x509.Certificate) -> tuple[bool, bool]:
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    return usage.digital_signature, usage.key_encipherment


def test_make_ra_splits_the_usages(pair):
    ca, signing, encryption = pair
    assert _usage(signing) == (True, False)
    assert _usage(encryption) == (False, True)
    with pytest.raises(ValueError, match="usage"):
        pki.make_ra(pki.new_rsa_key(2048), "x", ca, pki.new_rsa_key(2048),
                    datetime.datetime.now(datetime.UTC), usage="both-ish")


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 2, 0), (2, 1, 0), (0, 2, 1)])
def test_envelope_to_the_encryption_ra_verify_with_the_signing_ra(pair, order):
    certs = [pair[i].public_bytes(DER) for i in order]
    answer = parse_ca_certs(certs_only(certs), "application/x-x509-ca-ra-cert")
    ca, signing, encryption = pair
    assert answer.ra == encryption
    assert answer.signer == signing
    assert answer.ra_signer == signing
    assert answer.ca == ca
    assert len(answer.certificates) == 3


def test_single_ra_is_its_own_signer(ra, ca, ra_cert):
    answer = parse_ca_certs(certs_only([ra[0], ca[0]]), "application/x-x509-ca-ra-cert")
    assert answer.ra == ra_cert
    assert answer.signer == ra_cert
    assert answer.ra_signer is None


def test_an_encryption_ra_without_a_signing_ra_is_refused(pair):
    ca, _, encryption = pair
    with pytest.raises(ResponseError, match="no signing RA"):
        parse_ca_certs(certs_only([encryption.public_bytes(DER), ca.public_bytes(DER)]))
