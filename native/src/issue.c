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
    BIGNUM *bn;
    int ok;

    /* RFC 5280 section 4.1.2.2: positive, at most 20 octets. */
    if (serial->data == NULL || serial->len == 0 || serial->len > 20)
        return 0;
    bn = BN_bin2bn(serial->data, (int)serial->len, NULL);
    ok = bn != NULL && !BN_is_zero(bn) && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL;
    BN_free(bn);
    return ok;
}

static int add_subject_key_id(X509 *x)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    ASN1_OCTET_STRING *skid = ASN1_OCTET_STRING_new();
    int ok;

    /* RFC 5280 section 4.2.1.2, method (1): SHA-1 of the subjectPublicKey bits. */
    ok = skid != NULL && X509_pubkey_digest(x, EVP_sha1(), md, &md_len)
         && ASN1_OCTET_STRING_set(skid, md, (int)md_len)
         && X509_add1_ext_i2d(x, NID_subject_key_identifier, skid, 0, X509V3_ADD_DEFAULT) == 1;
    ASN1_OCTET_STRING_free(skid);
    return ok;
}

/* Copies the request's SubjectPublicKeyInfo into the certificate as it is.
   X509_set_pubkey would re-encode the key through OpenSSL 3.0's encoder and
   decoder framework, which costs more than the CA's signature itself. */
static int copy_public_key(X509 *x, X509_REQ *req)
{
    X509_PUBKEY *from = X509_REQ_get_X509_PUBKEY(req);
    X509_PUBKEY *to = X509_get_X509_PUBKEY(x);
    ASN1_OBJECT *alg_oid = NULL;
    const ASN1_OBJECT *oid;
    const unsigned char *bits;
    unsigned char *bits_copy = NULL;
    int bits_len, ptype;
    const void *pval;
    void *pval_copy = NULL;
    X509_ALGOR *alg;

    if (from == NULL || to == NULL
        || !X509_PUBKEY_get0_param(NULL, &bits, &bits_len, &alg, from))
        return 0;
    X509_ALGOR_get0(&oid, &ptype, &pval, alg);
    alg_oid = OBJ_dup(oid);
    bits_copy = OPENSSL_memdup(bits, (size_t)bits_len);
    if (ptype == V_ASN1_OBJECT)
        pval_copy = OBJ_dup(pval);
    else if (ptype == V_ASN1_SEQUENCE)
        pval_copy = ASN1_STRING_dup(pval);
    else if (ptype != V_ASN1_NULL && ptype != V_ASN1_UNDEF)
        goto err;
    if (alg_oid == NULL || bits_copy == NULL || (pval_copy == NULL && pval != NULL)
        || !X509_PUBKEY_set0_param(to, alg_oid, ptype, pval_copy, bits_copy, bits_len))
        goto err;
    return 1;
err:
    if (ptype == V_ASN1_OBJECT)
        ASN1_OBJECT_free(pval_copy);
    else
        ASN1_STRING_free(pval_copy);
    OPENSSL_free(bits_copy);
    ASN1_OBJECT_free(alg_oid);
    return 0;
}

static int add_extensions(X509 *x, const scep_buf *exts_der)
{
    const unsigned char *p = exts_der->data;
    STACK_OF(X509_EXTENSION) *exts;
    int i, ok = 1;

    if (exts_der->data == NULL || exts_der->len == 0)
        return 1;
    exts = d2i_X509_EXTENSIONS(NULL, &p, (long)exts_der->len);
    if (exts == NULL || p != exts_der->data + exts_der->len)
        ok = 0;
    for (i = 0; ok && i < sk_X509_EXTENSION_num(exts); i++)
        ok = X509_add_ext(x, sk_X509_EXTENSION_value(exts, i), -1);
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
        fail(r, SCEP_ERR_ARGUMENT, "the serial number must be 1 to 20 octets and not zero");
        goto done;
    }
    if (!X509_set_issuer_name(x, X509_get_subject_name(ctx->issuer.cert))
        || !X509_set_subject_name(x, subject != NULL ? subject : X509_REQ_get_subject_name(req))
        || ASN1_TIME_set(X509_getm_notBefore(x), (time_t)item->not_before) == NULL
        || ASN1_TIME_set(X509_getm_notAfter(x), (time_t)item->not_after) == NULL
        || !copy_public_key(x, req)) {
        fail(r, SCEP_ERR_ARGUMENT, "cannot set the certificate fields");
        goto done;
    }
    if (!add_extensions(x, &item->extensions)) {
        fail(r, SCEP_ERR_ARGUMENT, "cannot add the profile's extensions");
        goto done;
    }
    if (!add_subject_key_id(x) || !X509_add_ext(x, ctx->issuer_akid, -1)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot add the key identifiers");
        goto done;
    }
    if (X509_sign(x, ctx->issuer.key, ctx->issuer_md) <= 0) {
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
