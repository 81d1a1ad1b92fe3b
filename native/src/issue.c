/*
 * issue.c: a certification request and a profile in, a certificate signed by
 * the CA key out. The caller decides everything (serial, validity, subject,
 * extensions); this file adds only what needs the keys: the subject and
 * authority key identifiers (RFC 5280 sections 4.2.1.1 and 4.2.1.2).
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "internal.h"

static void fail(scep_issue_result *r, int status, const char *what)
{
    r->status = status;
    scep_set_error(r->error, sizeof(r->error), what);
}

static int set_serial(X509 *x, const scep_buf *serial)
{
    BIGNUM *bn = NULL;
    int ok = 0;

    /* RFC 5280 section 4.1.2.2: positive and at most 20 octets once encoded. A
       20-octet value with its top bit set needs a leading zero octet, which makes
       21, so the number itself may have at most 159 bits. */
    if (serial->data == NULL || serial->len == 0 || serial->len > 20)
        goto done;
    bn = BN_bin2bn(serial->data, (int)serial->len, NULL);
    if (bn == NULL || BN_is_zero(bn) || BN_num_bits(bn) > 159)
        goto done;
    ok = BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL;
done:
    BN_free(bn);
    return ok;
}

/*
 * RFC 5280 section 4.1.2.5: a time is UTCTime through 2049 and GeneralizedTime
 * after, always with a four-digit year. OpenSSL refuses a time it cannot
 * convert (and says why), but writes a negative or five-digit year for the
 * rest, which is not DER; those are refused here, after OpenSSL had its say.
 */
#define SCEP_FIRST_TIME (-62167219200LL) /* 0000-01-01T00:00:00Z */
#define SCEP_LAST_TIME 253402300799LL    /* 9999-12-31T23:59:59Z */

static int set_time(ASN1_TIME *t, int64_t when)
{
    return ASN1_TIME_set(t, (time_t)when) != NULL && when >= SCEP_FIRST_TIME
           && when <= SCEP_LAST_TIME;
}

static int add_subject_key_id(const scep_ctx *ctx, X509 *x)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    ASN1_OCTET_STRING *skid = ASN1_OCTET_STRING_new();
    int ok;

    /* RFC 5280 section 4.2.1.2, method (1): SHA-1 of the subjectPublicKey bits. */
    ok = skid != NULL && X509_pubkey_digest(x, scep_md(ctx, NID_sha1), md, &md_len)
         && ASN1_OCTET_STRING_set(skid, md, (int)md_len)
         && X509_add1_ext_i2d(x, NID_subject_key_identifier, skid, 0, X509V3_ADD_DEFAULT) == 1;
    ASN1_OCTET_STRING_free(skid);
    return ok;
}

/*
 * Copies the request's public key into the certificate without re-encoding the
 * key: X509_set_pubkey would go through OpenSSL 3.0's encoder and decoder
 * framework, which costs more than the CA's signature itself. Only the key bits
 * are copied; the AlgorithmIdentifier is written in its one canonical form, and
 * a request that spells it any other way is refused, so the CA never signs
 * parameters it did not choose:
 *   rsaEncryption: parameters NULL (RFC 3279 section 2.3.1), and the key
 *   itself, an RSAPublicKey, in DER;
 *   id-ecPublicKey: namedCurve, an OID (RFC 5480 section 2.1.1).
 * scep_pubkey_from_spki builds no other key type, so no other type gets here.
 */
static int copy_public_key(X509 *x, X509_REQ *req)
{
    X509_PUBKEY *from = X509_REQ_get_X509_PUBKEY(req);
    X509_PUBKEY *to = X509_get_X509_PUBKEY(x);
    const ASN1_OBJECT *oid = NULL;
    const unsigned char *bits = NULL;
    unsigned char *bits_copy = NULL;
    const void *pval = NULL;
    void *params = NULL;
    X509_ALGOR *alg = NULL;
    int bits_len = 0, ptype = V_ASN1_UNDEF, key_nid, curve_nid, ok = 0;

    if (from == NULL || to == NULL
        || !X509_PUBKEY_get0_param(NULL, &bits, &bits_len, &alg, from) || alg == NULL
        || bits == NULL || bits_len <= 0)
        goto done;
    X509_ALGOR_get0(&oid, &ptype, &pval, alg);
    key_nid = OBJ_obj2nid(oid);
    if (key_nid == NID_rsaEncryption) {
        if (ptype != V_ASN1_NULL || !scep_rsa_public_key_is_der(bits, bits_len))
            goto done;
    } else if (key_nid == NID_X9_62_id_ecPublicKey) {
        /* OBJ_nid2obj returns OpenSSL's static object, which freeing leaves alone. */
        curve_nid = ptype == V_ASN1_OBJECT ? OBJ_obj2nid(pval) : NID_undef;
        params = curve_nid != NID_undef ? OBJ_nid2obj(curve_nid) : NULL;
        if (params == NULL)
            goto done;
    } else {
        goto done;
    }
    bits_copy = OPENSSL_memdup(bits, (size_t)bits_len);
    if (bits_copy == NULL
        || !X509_PUBKEY_set0_param(to, OBJ_nid2obj(key_nid), ptype, params, bits_copy,
                                   bits_len))
        goto done;
    bits_copy = NULL; /* owned by the certificate now */
    ok = 1;
done:
    OPENSSL_free(bits_copy);
    return ok;
}

/*
 * Adds the profile's extensions in the order given. RFC 5280 section 4.2: a
 * certificate must not carry an extension twice, and the key identifiers are
 * this file's to add, so a profile carrying either is refused.
 */
static int add_extensions(X509 *x, const scep_buf *exts_der, scep_issue_result *r)
{
    const unsigned char *p = exts_der->data;
    STACK_OF(X509_EXTENSION) *exts = NULL;
    const ASN1_OBJECT *obj;
    int i, nid, ok = 0;

    if (exts_der->data == NULL || exts_der->len == 0)
        return 1;
    exts = d2i_X509_EXTENSIONS(NULL, &p, (long)exts_der->len);
    if (exts == NULL || p != exts_der->data + exts_der->len) {
        fail(r, SCEP_ERR_ARGUMENT, "cannot parse the profile's extensions");
        goto done;
    }
    for (i = 0; i < sk_X509_EXTENSION_num(exts); i++) {
        obj = X509_EXTENSION_get_object(sk_X509_EXTENSION_value(exts, i));
        nid = OBJ_obj2nid(obj);
        if (nid == NID_subject_key_identifier || nid == NID_authority_key_identifier) {
            fail(r, SCEP_ERR_ARGUMENT,
                 "the profile must not carry the key identifiers; the core adds them");
            goto done;
        }
        if (X509_get_ext_by_OBJ(x, obj, -1) >= 0) {
            fail(r, SCEP_ERR_ARGUMENT, "the profile carries an extension twice");
            goto done;
        }
        if (!X509_add_ext(x, sk_X509_EXTENSION_value(exts, i), -1)) {
            fail(r, SCEP_ERR_INTERNAL, "cannot add the profile's extensions");
            goto done;
        }
    }
    ok = 1;
done:
    sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    return ok;
}

static void issue_one(const scep_ctx *ctx, const scep_issue_item *item, scep_issue_result *r)
{
    const unsigned char *p;
    const scep_request_state *state = item->request != NULL ? item->request->priv : NULL;
    X509_REQ *parsed = NULL, *req;
    EVP_PKEY *parsed_key = NULL, *pub;
    X509_NAME *subject = NULL;
    X509 *x = NULL;
    EVP_MD_CTX *sign = NULL;
    unsigned char *der = NULL;
    int der_len;

    r->status = SCEP_ERR_INTERNAL;
    if (ctx->issuer.key == NULL) {
        fail(r, SCEP_ERR_ARGUMENT, "no issuing CA configured");
        goto done;
    }
    if (item->request != NULL) {
        req = state != NULL ? state->csr : NULL;
        pub = state != NULL ? state->csr_key : NULL;
    } else {
        req = parsed = scep_parse_csr(ctx, item->csr.data, item->csr.len, &parsed_key);
        pub = parsed_key;
    }
    if (req == NULL) {
        fail(r, SCEP_ERR_CSR, "cannot parse the certification request");
        goto done;
    }
    if (pub == NULL) {
        fail(r, SCEP_ERR_CSR, "unsupported public key in the certification request");
        goto done;
    }
    if (X509_REQ_verify_ex(req, pub, NULL, NULL) != 1) {
        fail(r, SCEP_ERR_CSR, "the certification request signature does not verify");
        goto done;
    }
    if (item->subject.data != NULL && item->subject.len > 0) {
        p = item->subject.data;
        subject = d2i_X509_NAME(NULL, &p, (long)item->subject.len);
        if (subject == NULL || p != item->subject.data + item->subject.len) {
            fail(r, SCEP_ERR_ARGUMENT, "cannot parse the subject name");
            goto done;
        }
    }
    if (item->not_after <= item->not_before) {
        fail(r, SCEP_ERR_ARGUMENT, "notAfter must follow notBefore");
        goto done;
    }
    x = X509_new();
    if (x == NULL || !X509_set_version(x, X509_VERSION_3)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot create a certificate");
        goto done;
    }
    if (!set_serial(x, &item->serial)) {
        fail(r, SCEP_ERR_ARGUMENT,
             "the serial number must be positive and at most 159 bits (RFC 5280 4.1.2.2)");
        goto done;
    }
    if (!X509_set_issuer_name(x, X509_get_subject_name(ctx->issuer.cert))
        || !X509_set_subject_name(x, subject != NULL ? subject : X509_REQ_get_subject_name(req))) {
        fail(r, SCEP_ERR_ARGUMENT, "cannot set the certificate names");
        goto done;
    }
    if (!set_time(X509_getm_notBefore(x), item->not_before)
        || !set_time(X509_getm_notAfter(x), item->not_after)) {
        fail(r, SCEP_ERR_ARGUMENT,
             "the validity must lie within 0000-01-01 and 9999-12-31 (RFC 5280 4.1.2.5)");
        goto done;
    }
    if (!copy_public_key(x, req)) {
        fail(r, SCEP_ERR_CSR, "the certification request's public key is not in its canonical "
                              "DER form (RFC 3279 2.3.1, RFC 5480 2.1.1)");
        goto done;
    }
    if (!add_extensions(x, &item->extensions, r))
        goto done;
    if (!add_subject_key_id(ctx, x) || !X509_add_ext(x, ctx->issuer_akid, -1)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot add the key identifiers");
        goto done;
    }
    /* The signing context is a copy of the one prepared for the CA key. */
    sign = scep_sign_ctx_new(ctx->issuer_sign);
    if (sign == NULL || X509_sign_ctx(x, sign) <= 0) {
        fail(r, SCEP_ERR_INTERNAL, "cannot sign the certificate");
        goto done;
    }
    der_len = i2d_X509(x, &der);
    if (der_len <= 0 || !scep_bytes_set(&r->cert, der, (size_t)der_len)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot encode the certificate");
        goto done;
    }
    r->status = SCEP_OK;
done:
    OPENSSL_free(der);
    EVP_MD_CTX_free(sign);
    X509_free(x);
    X509_NAME_free(subject);
    EVP_PKEY_free(parsed_key);
    X509_REQ_free(parsed);
    ERR_clear_error();
}

size_t scep_issue_batch(const scep_ctx *ctx, const scep_issue_item *items, size_t n,
                        scep_issue_result **out)
{
    size_t i;

    for (i = 0; i < n; i++) {
        out[i] = calloc(1, sizeof(*out[i]));
        if (out[i] == NULL)
            break;
        issue_one(ctx, &items[i], out[i]);
    }
    return i;
}

void scep_issue_result_free(scep_issue_result *r)
{
    if (r == NULL)
        return;
    scep_bytes_clear(&r->cert);
    free(r);
}
