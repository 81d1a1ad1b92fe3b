/*
 * fuzz_issue.c: scep_issue_batch, a CSR and a profile in, a certificate out.
 *
 * Input layout: one octet of flags, the serial (one-octet length), notBefore
 * and notAfter, the subject Name and the Extensions (two-octet lengths), then
 * the DER PKCS#10 request. Flags:
 *
 *   bit 0-3 == 0  issue with the test vectors' RSA-2048 CA (one input in 16:
 *                 an RSA signature costs as much as a few hundred others);
 *                 otherwise with a P-256 CA generated at start-up
 *   bit 4         issue from an unwrapped request (the test vectors, chosen by
 *                 the first octet of the rest) instead of the DER CSR
 *   bit 5         notBefore/notAfter as raw 64-bit values instead of small
 *                 offsets from a fixed time
 *   bit 6         the rest is a CertificationRequestInfo, which the harness
 *                 signs (bit 7: with the RSA-1024 key fuzz-recipient.key, else
 *                 with the P-256 key fuzz-device.key) into a request: a
 *                 mutated request no longer verifies, so this is how inputs
 *                 get past the signature check to the key and name handling
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/x509.h>

#include "fuzz_common.h"
#include "internal.h"

#define FUZZ_NOW 1767225600LL /* 2026-01-01T00:00:00Z */
#define MAX_REQUESTS 16

static scep_ctx *rsa_ctx, *ec_ctx;
static scep_unwrap_result *requests[MAX_REQUESTS];
static size_t n_requests;
static OSSL_LIB_CTX *parse_libctx;
static EVP_PKEY *device_ec, *device_rsa;

static const char *const vectors[] = {
    "vectors/scepclient-pkcsreq.der", "vectors/scepclient-get-pkcsreq.der",
    "vectors/ber-indefinite-pkcsreq.der", "vectors/ber-indefinite-envelope-pkcsreq.der",
    "vectors/oaep-aes256-sha512-pkcsreq.der", "vectors/ski-recipient-pkcsreq.der",
    "vectors/des3-sha1-nonce8-pkcsreq.der", "vectors/wrong-recipient-pkcsreq.der",
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    X509 *ra_cert = fuzz_file_cert("vectors/ra.pem"), *ca_cert = fuzz_file_cert("vectors/ca.pem");
    EVP_PKEY *ra_key = fuzz_file_key("vectors/ra.key"), *ca_key = fuzz_file_key("vectors/ca.key");
    EVP_PKEY *ec_ca_key = fuzz_ec_key("P-256");
    X509 *ec_ca_cert = fuzz_self_signed(ec_ca_key, "scep-fast fuzz CA");
    size_t i;

    (void)argc;
    (void)argv;
    rsa_ctx = fuzz_ctx_new(SCEP_ALLOW_LEGACY);
    ec_ctx = fuzz_ctx_new(SCEP_ALLOW_LEGACY);
    fuzz_ctx_set(rsa_ctx, FUZZ_RECIPIENT, ra_cert, ra_key);
    fuzz_ctx_set(rsa_ctx, FUZZ_ISSUER, ca_cert, ca_key);
    fuzz_ctx_set(ec_ctx, FUZZ_ISSUER, ec_ca_cert, ec_ca_key);
    /* Every vector, unwrapped or not: a failed unwrap is a request with no CSR. */
    for (i = 0; i < sizeof(vectors) / sizeof(vectors[0]); i++) {
        size_t len;
        unsigned char *der = fuzz_read_file(vectors[i], &len);
        scep_buf msg = {der, len};

        if (scep_unwrap_batch(rsa_ctx, &msg, 1, &requests[n_requests]) != 1)
            fuzz_die("cannot unwrap a test vector");
        n_requests++;
        free(der);
    }
    parse_libctx = fuzz_parse_libctx();
    device_ec = fuzz_file_key("fuzz/fuzz-device.key");
    device_rsa = fuzz_file_key("fuzz/fuzz-recipient.key");
    X509_free(ra_cert);
    X509_free(ca_cert);
    X509_free(ec_ca_cert);
    EVP_PKEY_free(ra_key);
    EVP_PKEY_free(ca_key);
    EVP_PKEY_free(ec_ca_key);
    return 0;
}

/* A certificate that was issued must parse back, whole, as a certificate. */
static void check(const scep_issue_result *r)
{
    const unsigned char *p;
    X509 *x;

    fuzz_report(r->status, r->error);
    if (r->status < SCEP_OK || r->status > SCEP_ERR_INTERNAL || r->error[sizeof(r->error) - 1] != 0)
        abort();
    if (r->status != SCEP_OK) {
        if (r->error[0] == 0)
            abort();
        return;
    }
    p = r->cert.data;
    x = X509_new_ex(parse_libctx, NULL);
    if (x == NULL || d2i_X509(&x, &p, (long)r->cert.len) == NULL || p != r->cert.data + r->cert.len)
        abort();
    X509_free(x);
    ERR_clear_error();
}

/* CertificationRequest ::= SEQUENCE { info, signatureAlgorithm, signature BIT STRING },
   info exactly as given (RFC 2986 section 4.2). */
static int sign_request(int rsa, scep_buf info, scep_bytes *out)
{
    static const unsigned char ecdsa_sha256[] = {0x30, 0x0A, 0x06, 0x08, 0x2A, 0x86, 0x48,
                                                 0xCE, 0x3D, 0x04, 0x03, 0x02};
    static const unsigned char rsa_sha256[] = {0x30, 0x0D, 0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                               0xF7, 0x0D, 0x01, 0x01, 0x0B, 0x05, 0x00};
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    unsigned char sig[1 + 512];
    size_t sig_len = sizeof(sig) - 1;
    scep_bytes bits = {NULL, 0};
    int ok = 0;

    sig[0] = 0; /* no unused bits */
    if (mctx != NULL
        && EVP_DigestSignInit_ex(mctx, NULL, "SHA256", NULL, NULL, rsa ? device_rsa : device_ec,
                                 NULL) == 1
        && EVP_DigestSign(mctx, sig + 1, &sig_len, info.data, info.len) == 1) {
        scep_buf bit_string[] = {{sig, sig_len + 1}};

        if (scep_der_tlv(V_ASN1_BIT_STRING, bit_string, 1, &bits)) {
            scep_buf parts[] = {{info.data, info.len},
                                {rsa ? rsa_sha256 : ecdsa_sha256,
                                 rsa ? sizeof(rsa_sha256) : sizeof(ecdsa_sha256)},
                                {bits.data, bits.len}};

            ok = scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, parts, 3, out);
        }
    }
    scep_bytes_clear(&bits);
    EVP_MD_CTX_free(mctx);
    ERR_clear_error();
    return ok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size};
    uint8_t flags = fuzz_u8(&in);
    scep_issue_item item;
    scep_issue_result *out[1] = {NULL};
    scep_bytes signed_csr = {NULL, 0};

    memset(&item, 0, sizeof(item));
    item.serial = fuzz_bytes8(&in);
    if (flags & 0x20) {
        item.not_before = fuzz_i64(&in);
        item.not_after = fuzz_i64(&in);
    } else {
        item.not_before = FUZZ_NOW + (int16_t)fuzz_u16(&in);
        item.not_after = item.not_before + (int32_t)fuzz_u32(&in);
    }
    item.subject = fuzz_bytes16(&in);
    item.extensions = fuzz_bytes16(&in);
    if (flags & 0x10) {
        item.request = requests[fuzz_u8(&in) % n_requests];
    } else if (flags & 0x40) {
        if (sign_request(flags & 0x80, fuzz_rest(&in), &signed_csr)) {
            item.csr.data = signed_csr.data;
            item.csr.len = signed_csr.len;
        }
    } else {
        item.csr = fuzz_rest(&in);
    }
    if (scep_issue_batch((flags & 0x0f) == 0 ? rsa_ctx : ec_ctx, &item, 1, out) != 1
        || out[0] == NULL)
        abort();
    check(out[0]);
    scep_issue_result_free(out[0]);
    scep_bytes_clear(&signed_csr);
    return 0;
}
