/*
 * fuzz_unwrap.c: scep_unwrap_batch, the pkiMessage parser.
 *
 * A mutated message rarely keeps a valid signature, and unwrap stops at the
 * signature, so the input chooses one of three depths (first octet, low bits):
 *
 *   0, 3  the input is the whole pkiMessage, as a client sends it;
 *   1     the input is the pkcsPKIEnvelope: the harness signs it, with the
 *         SCEP attributes taken from the input, as a valid requester would;
 *   2     the input is the envelope's content (a CSR): the harness encrypts it
 *         to one of the context's keys, then signs as for 1.
 *
 * Bit 2 of the first octet picks a strict context (SHA-1 and 3DES refused), bit
 * 3 names the signer by subjectKeyIdentifier instead of issuerAndSerialNumber.
 *
 * Layout after the first octet, for 1 and 2: one octet of choices (digest,
 * content cipher, attribute string type), messageType, transactionID and
 * senderNonce each with a one-octet length, then the payload.
 *
 * Speed: the harness signs with a P-256 key generated at start-up, and the
 * context holds, beside the test vectors' RSA-2048 RA, the RSA-1024 test key
 * fuzz-recipient.key: mode 2 encrypts to it, and most mode 1 seeds are
 * envelopes addressed to it (make_seeds.py), so that an input costs a
 * fraction of an RSA-2048 decryption.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/objects.h>

#include "fuzz_common.h"

static scep_ctx *ctx;         /* legacy algorithms allowed */
static scep_ctx *strict_ctx;  /* SHA-1 and 3DES refused */
static X509 *device_cert;
static EVP_PKEY *device_key;
static X509 *fast_cert;
static STACK_OF(X509) *fast_recipients;
static ASN1_OBJECT *oid_message_type, *oid_transaction_id, *oid_sender_nonce;

static const char *const digests[] = {"SHA256", "SHA1", "SHA512", "SHA384", "SHA224", "MD5"};
static const char *const ciphers[] = {"AES-128-CBC", "AES-256-CBC", "DES-EDE3-CBC",
                                      "AES-192-CBC", "DES-CBC"};
static const int string_types[] = {V_ASN1_PRINTABLESTRING, V_ASN1_UTF8STRING, V_ASN1_IA5STRING,
                                   V_ASN1_OCTET_STRING, V_ASN1_T61STRING, V_ASN1_BMPSTRING};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    X509 *ra_cert = fuzz_file_cert("vectors/ra.pem");
    EVP_PKEY *ra_key = fuzz_file_key("vectors/ra.key");
    EVP_PKEY *fast_key = fuzz_file_key("fuzz/fuzz-recipient.key");

    (void)argc;
    (void)argv;
    ctx = fuzz_ctx_new(SCEP_ALLOW_LEGACY);
    strict_ctx = fuzz_ctx_new(SCEP_REFUSE_SHA1 | SCEP_REFUSE_3DES);
    fast_cert = fuzz_file_cert("fuzz/fuzz-recipient.pem");
    fuzz_ctx_set(ctx, FUZZ_RECIPIENT, ra_cert, ra_key);
    fuzz_ctx_set(ctx, FUZZ_RECIPIENT, fast_cert, fast_key);
    fuzz_ctx_set(strict_ctx, FUZZ_RECIPIENT, ra_cert, ra_key);
    fuzz_ctx_set(strict_ctx, FUZZ_RECIPIENT, fast_cert, fast_key);
    device_key = fuzz_ec_key("P-256");
    device_cert = fuzz_self_signed(device_key, "scep-fast fuzz device");
    fast_recipients = sk_X509_new_null();
    if (fast_recipients == NULL || !sk_X509_push(fast_recipients, fast_cert))
        fuzz_die("out of memory");
    oid_message_type = OBJ_txt2obj("2.16.840.1.113733.1.9.2", 1);
    oid_transaction_id = OBJ_txt2obj("2.16.840.1.113733.1.9.7", 1);
    oid_sender_nonce = OBJ_txt2obj("2.16.840.1.113733.1.9.5", 1);
    if (oid_message_type == NULL || oid_transaction_id == NULL || oid_sender_nonce == NULL)
        fuzz_die("cannot create the SCEP OIDs");
    X509_free(ra_cert);
    EVP_PKEY_free(ra_key);
    EVP_PKEY_free(fast_key);
    return 0;
}

static int add_attr(CMS_SignerInfo *si, const ASN1_OBJECT *obj, int type, scep_buf value)
{
    /* An empty value is left out, so that a missing attribute is tried too. */
    if (value.len == 0)
        return 1;
    return CMS_signed_add1_attr_by_OBJ(si, obj, type, value.data, (int)value.len);
}

/* A SignedData over payload, signed by the device key: what a requester sends. */
static unsigned char *sign_payload(int keyid, uint8_t choices, scep_buf mt, scep_buf tid,
                                   scep_buf nonce, const unsigned char *payload,
                                   size_t payload_len, int *len)
{
    EVP_MD *md = EVP_MD_fetch(NULL, digests[(choices & 7) % 6], NULL);
    int type = string_types[(choices >> 3) % 6];
    BIO *in = BIO_new_mem_buf(payload, (int)payload_len);
    CMS_ContentInfo *cms = NULL;
    CMS_SignerInfo *si;
    unsigned char *der = NULL;

    *len = 0;
    if (md == NULL || in == NULL)
        goto done;
    cms = CMS_sign(NULL, NULL, NULL, NULL, CMS_BINARY | CMS_PARTIAL);
    si = cms != NULL ? CMS_add1_signer(cms, device_cert, device_key, md,
                                       CMS_BINARY | CMS_NOSMIMECAP | (keyid ? CMS_USE_KEYID : 0))
                     : NULL;
    if (si == NULL || !add_attr(si, oid_message_type, type, mt)
        || !add_attr(si, oid_transaction_id, type, tid)
        || !add_attr(si, oid_sender_nonce, V_ASN1_OCTET_STRING, nonce)
        || !CMS_final(cms, in, NULL, CMS_BINARY))
        goto done;
    *len = i2d_CMS_ContentInfo(cms, &der);
done:
    CMS_ContentInfo_free(cms);
    BIO_free(in);
    EVP_MD_free(md);
    ERR_clear_error();
    return *len > 0 ? der : NULL;
}

/* An EnvelopedData of content to the fast recipient. */
static unsigned char *encrypt_content(uint8_t choices, scep_buf content, int *len)
{
    EVP_CIPHER *cipher = EVP_CIPHER_fetch(NULL, ciphers[(choices >> 6) % 5], NULL);
    BIO *in = BIO_new_mem_buf(content.len > 0 ? content.data : (const unsigned char *)"",
                              (int)content.len);
    CMS_ContentInfo *cms = NULL;
    unsigned char *der = NULL;

    *len = 0;
    if (cipher != NULL && in != NULL) {
        cms = CMS_encrypt(fast_recipients, in, cipher, CMS_BINARY);
        if (cms != NULL)
            *len = i2d_CMS_ContentInfo(cms, &der);
    }
    CMS_ContentInfo_free(cms);
    BIO_free(in);
    EVP_CIPHER_free(cipher);
    ERR_clear_error();
    return *len > 0 ? der : NULL;
}

static void check(const scep_unwrap_result *r)
{
    fuzz_report(r->status, r->error);
    if (r->status < SCEP_OK || r->status > SCEP_ERR_INTERNAL || r->error[sizeof(r->error) - 1] != 0)
        abort();
    if (r->status != SCEP_OK) {
        if (r->error[0] == 0)
            abort(); /* every failure says why */
        return;
    }
    if (r->content.len == 0 || r->transaction_id.data == NULL || r->sender_nonce.data == NULL
        || !fuzz_one_tlv(r->signer_cert.data, r->signer_cert.len, V_ASN1_SEQUENCE))
        abort();
    if (r->csr_parsed && !fuzz_one_tlv(r->csr_subject.data, r->csr_subject.len, V_ASN1_SEQUENCE))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size};
    uint8_t mode = fuzz_u8(&in);
    const scep_ctx *use = (mode & 4) ? strict_ctx : ctx;
    unsigned char *signed_der = NULL, *envelope = NULL;
    scep_buf msg = {NULL, 0};
    scep_unwrap_result *out[1] = {NULL};
    int len = 0;

    if ((mode & 3) == 1 || (mode & 3) == 2) {
        uint8_t choices = fuzz_u8(&in);
        scep_buf mt = fuzz_bytes8(&in), tid = fuzz_bytes8(&in), nonce = fuzz_bytes8(&in);
        scep_buf payload = fuzz_rest(&in);

        if ((mode & 3) == 2) {
            envelope = encrypt_content(choices, payload, &len);
            payload.data = envelope;
            payload.len = (size_t)len;
        }
        if (payload.len > 0)
            signed_der = sign_payload(mode & 8, choices, mt, tid, nonce, payload.data,
                                      payload.len, &len);
        msg.data = signed_der;
        msg.len = signed_der != NULL ? (size_t)len : 0;
    } else {
        msg = fuzz_rest(&in);
    }
    if (scep_unwrap_batch(use, &msg, 1, out) != 1 || out[0] == NULL)
        abort();
    check(out[0]);
    scep_unwrap_result_free(out[0]);
    OPENSSL_free(signed_der);
    OPENSSL_free(envelope);
    return 0;
}
