/*
 * fuzz_wrap.c: scep_wrap_batch, the CertRep builder.
 *
 * The requests answered are the test vectors, unwrapped once at start-up
 * (and no request at all). The input chooses the request and the reply, and
 * may replace the request's attributes and algorithms with other values that
 * unwrap can produce: any transactionID and senderNonce bytes, and the
 * digests, ciphers and key transports unwrap lets through.
 *
 * Layout: request index, pkiStatus, failInfo (signed), flags, algorithm
 * choices (one octet each); failInfoText and transactionID (two-octet
 * lengths), senderNonce (one-octet length), certificates (two-octet length),
 * then the CRLs. Flags:
 *
 *   bit 0-3 == 0  sign with the test vectors' RSA-2048 RA (one input in 16);
 *                 otherwise with a P-256 RA generated at start-up
 *   bit 4         replace the transactionID
 *   bit 5         replace the senderNonce
 *   bit 6         replace the algorithms
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/objects.h>

#include "fuzz_common.h"

#define MAX_REQUESTS 16

static scep_ctx *rsa_ctx, *ec_ctx;
static scep_unwrap_result *requests[MAX_REQUESTS];
static size_t n_requests;
static OSSL_LIB_CTX *parse_libctx;

static const char *const vectors[] = {
    "vectors/scepclient-pkcsreq.der", "vectors/scepclient-get-pkcsreq.der",
    "vectors/ber-indefinite-pkcsreq.der", "vectors/ber-indefinite-envelope-pkcsreq.der",
    "vectors/oaep-aes256-sha512-pkcsreq.der", "vectors/ski-recipient-pkcsreq.der",
    "vectors/des3-sha1-nonce8-pkcsreq.der", "vectors/wrong-recipient-pkcsreq.der",
};

/* What unwrap can report: any digest it could verify with, an allowed cipher, and
   for RSAES-OAEP an allowed digest other than MD5. */
static const int digest_nids[] = {NID_sha256, NID_sha1,   NID_sha512, NID_sha384,
                                  NID_sha224, NID_md5,    NID_sm3,    NID_sha3_256};
static const int cipher_nids[] = {NID_aes_128_cbc, NID_aes_192_cbc, NID_aes_256_cbc,
                                  NID_des_ede3_cbc, NID_des_cbc};
static const int oaep_nids[] = {NID_sha1, NID_sha224, NID_sha256, NID_sha384, NID_sha512};
static const int statuses[] = {SCEP_STATUS_SUCCESS, SCEP_STATUS_FAILURE, SCEP_STATUS_PENDING};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    X509 *ra_cert = fuzz_file_cert("vectors/ra.pem");
    EVP_PKEY *ra_key = fuzz_file_key("vectors/ra.key");
    EVP_PKEY *ec_ra_key = fuzz_ec_key("P-256");
    X509 *ec_ra_cert = fuzz_self_signed(ec_ra_key, "scep-fast fuzz RA");
    size_t i;

    (void)argc;
    (void)argv;
    rsa_ctx = fuzz_ctx_new(SCEP_ALLOW_LEGACY);
    ec_ctx = fuzz_ctx_new(SCEP_ALLOW_LEGACY);
    fuzz_ctx_set(rsa_ctx, FUZZ_RECIPIENT, ra_cert, ra_key);
    fuzz_ctx_set(rsa_ctx, FUZZ_SIGNER, ra_cert, ra_key);
    fuzz_ctx_set(ec_ctx, FUZZ_SIGNER, ec_ra_cert, ec_ra_key);
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
    X509_free(ra_cert);
    X509_free(ec_ra_cert);
    EVP_PKEY_free(ra_key);
    EVP_PKEY_free(ec_ra_key);
    return 0;
}

/* A CertRep that was built must parse back as one CMS SignedData. */
static void check(const scep_wrap_result *r)
{
    const unsigned char *p;
    CMS_ContentInfo *cms;

    fuzz_report(r->status, r->error);
    if (r->status < SCEP_OK || r->status > SCEP_ERR_INTERNAL || r->error[sizeof(r->error) - 1] != 0)
        abort();
    if (r->status != SCEP_OK) {
        if (r->error[0] == 0)
            abort();
        return;
    }
    p = r->message.data;
    cms = CMS_ContentInfo_new_ex(parse_libctx, NULL);
    if (cms == NULL || d2i_CMS_ContentInfo(&cms, &p, (long)r->message.len) == NULL
        || p != r->message.data + r->message.len
        || OBJ_obj2nid(CMS_get0_type(cms)) != NID_pkcs7_signed)
        abort();
    CMS_ContentInfo_free(cms);
    ERR_clear_error();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size};
    uint8_t index = fuzz_u8(&in), status = fuzz_u8(&in);
    int8_t fail_info = (int8_t)fuzz_u8(&in);
    uint8_t flags = fuzz_u8(&in), algs = fuzz_u8(&in);
    scep_buf tid, nonce;
    scep_unwrap_result request;
    scep_wrap_item item;
    scep_wrap_result *out[1] = {NULL};

    memset(&item, 0, sizeof(item));
    /* Mostly the three real statuses, sometimes any value. */
    item.pki_status = status < 0xf0 ? statuses[status % 3] : status - 0xf8;
    item.fail_info = fail_info;
    item.fail_info_text = fuzz_bytes16(&in);
    tid = fuzz_bytes16(&in);
    nonce = fuzz_bytes8(&in);
    item.certs = fuzz_bytes16(&in);
    item.crls = fuzz_rest(&in);
    if (index % (n_requests + 1) < n_requests) {
        /* A shallow copy: the bytes point into the input, the state is shared. */
        request = *requests[index % (n_requests + 1)];
        if (flags & 0x10) {
            request.transaction_id.data = (unsigned char *)tid.data;
            request.transaction_id.len = tid.len;
        }
        if (flags & 0x20) {
            request.sender_nonce.data = (unsigned char *)nonce.data;
            request.sender_nonce.len = nonce.len;
        }
        if (flags & 0x40) {
            request.digest_nid = digest_nids[algs & 7];
            request.cipher_nid = cipher_nids[(algs >> 3 & 7) % 5];
            request.key_transport = (algs & 0x40) ? SCEP_KT_RSA_OAEP : SCEP_KT_RSA_PKCS1;
            request.oaep_md_nid = oaep_nids[(algs >> 3 & 7) % 5];
            request.oaep_mgf1_md_nid = oaep_nids[(algs & 7) % 5];
        }
        item.request = &request;
    }
    if (scep_wrap_batch((flags & 0x0f) == 0 ? rsa_ctx : ec_ctx, &item, 1, out) != 1
        || out[0] == NULL)
        abort();
    check(out[0]);
    scep_wrap_result_free(out[0]);
    return 0;
}
