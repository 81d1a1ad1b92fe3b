/*
 * certrep_sign.c: the SignedData around a CertRep (RFC 8894 section 3.3.2,
 * RFC 5652 section 5), written as DER directly.
 *
 * The CMS API would build the same bytes through a tree of objects that it
 * duplicates, sorts and re-encodes, and would initialise a new signature
 * context per message; here the signed attributes are encoded once, sorted
 * as DER requires, and signed with a copy of the signing context prepared for
 * the RA key (algorithms.c). The output matches what CMS_sign wrote before:
 * one SignerInfo identified by issuerAndSerialNumber, the RA certificate, the
 * contentType, signingTime and messageDigest attributes beside the SCEP ones.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

#include "internal.h"

#define SCEP_N_ATTRS 10

/* 2.16.840.1.113733.1.9.N, the SCEP attributes (RFC 8894 section 3.2.1), N in the last octet. */
#define SCEP_OID(n) {0x06, 0x0A, 0x60, 0x86, 0x48, 0x01, 0x86, 0xF8, 0x45, 0x01, 0x09, (n)}
static const unsigned char oid_message_type[] = SCEP_OID(2);
static const unsigned char oid_pki_status[] = SCEP_OID(3);
static const unsigned char oid_fail_info[] = SCEP_OID(4);
static const unsigned char oid_sender_nonce[] = SCEP_OID(5);
static const unsigned char oid_recipient_nonce[] = SCEP_OID(6);
static const unsigned char oid_transaction_id[] = SCEP_OID(7);
/* 1.3.6.1.5.5.7.24.1 failInfoText (RFC 8894 section 3.2.1.4) */
static const unsigned char oid_fail_info_text[] = {0x06, 0x08, 0x2B, 0x06, 0x01, 0x05,
                                                   0x05, 0x07, 0x18, 0x01};
/* 1.2.840.113549.1.9.{3,4,5}: contentType, messageDigest, signingTime (RFC 5652 section 11) */
static const unsigned char oid_content_type[] = {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                                 0xF7, 0x0D, 0x01, 0x09, 0x03};
static const unsigned char oid_message_digest[] = {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                                   0xF7, 0x0D, 0x01, 0x09, 0x04};
static const unsigned char oid_signing_time[] = {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                                 0xF7, 0x0D, 0x01, 0x09, 0x05};
/* 1.2.840.113549.1.7.1 data and 1.2.840.113549.1.7.2 signedData */
static const unsigned char oid_data[] = {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                         0xF7, 0x0D, 0x01, 0x07, 0x01};
static const unsigned char oid_signed_data[] = {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                                0xF7, 0x0D, 0x01, 0x07, 0x02};
static const unsigned char version1[] = {0x02, 0x01, 0x01};

/* Attribute ::= SEQUENCE { attrType OID, attrValues SET { one value } } */
static int attribute(const unsigned char *oid, size_t oid_len, unsigned char tag,
                     const unsigned char *value, size_t value_len, scep_bytes *out)
{
    scep_bytes v = {NULL, 0}, set = {NULL, 0};
    scep_buf value_part[] = {{value, value_len}};
    int ok = scep_der_tlv(tag, value_part, 1, &v);

    if (ok) {
        scep_buf set_part[] = {{v.data, v.len}};

        ok = scep_der_tlv(V_ASN1_SET | V_ASN1_CONSTRUCTED, set_part, 1, &set);
    }
    if (ok) {
        scep_buf seq_parts[] = {{oid, oid_len}, {set.data, set.len}};

        ok = scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, seq_parts, 2, out);
    }
    scep_bytes_clear(&set);
    scep_bytes_clear(&v);
    return ok;
}

static int number_attribute(const unsigned char *oid, size_t oid_len, int value, scep_bytes *out)
{
    char text[16];
    int n = snprintf(text, sizeof(text), "%d", value);

    return n > 0 && (size_t)n < sizeof(text)
           && attribute(oid, oid_len, V_ASN1_PRINTABLESTRING, (const unsigned char *)text,
                        (size_t)n, out);
}

/* The signingTime value, UTCTime through 2049 (RFC 5652 section 11.3), as CMS_sign adds it. */
static int signing_time(scep_bytes *out)
{
    ASN1_TIME *now = X509_gmtime_adj(NULL, 0);
    unsigned char *der = NULL;
    int len = now != NULL ? i2d_ASN1_TIME(now, &der) : 0;
    int ok = len > 2 && scep_bytes_set(out, der, (size_t)len);

    OPENSSL_free(der);
    ASN1_TIME_free(now);
    return ok;
}

/* DER order for SET OF (X.690 section 11.6). */
static int bytes_cmp(const void *a, const void *b)
{
    const scep_bytes *x = a, *y = b;
    int c = memcmp(x->data, y->data, x->len < y->len ? x->len : y->len);

    return c != 0 ? c : (x->len > y->len) - (x->len < y->len);
}

/*
 * The signed attributes, sorted, as the content of their SET. The SCEP ones
 * come from the request (transactionID, its senderNonce as our
 * recipientNonce) and from the reply (a fresh senderNonce as long as the
 * client's: older iOS sends 8 bytes).
 */
static int signed_attributes(const scep_wrap_item *item, const unsigned char *digest,
                             size_t digest_len, scep_bytes *attrs, size_t *n)
{
    const scep_unwrap_result *req = item->request;
    unsigned char nonce[SCEP_MAX_NONCE];
    scep_bytes time = {NULL, 0};
    int ok;

    *n = 0;
    if (RAND_bytes(nonce, (int)req->sender_nonce.len) != 1 || !signing_time(&time))
        return 0;
    ok = number_attribute(oid_message_type, sizeof(oid_message_type), 3, &attrs[(*n)++])
         && number_attribute(oid_pki_status, sizeof(oid_pki_status), item->pki_status,
                             &attrs[(*n)++])
         && attribute(oid_transaction_id, sizeof(oid_transaction_id), V_ASN1_PRINTABLESTRING,
                      req->transaction_id.data, req->transaction_id.len, &attrs[(*n)++])
         && attribute(oid_recipient_nonce, sizeof(oid_recipient_nonce), V_ASN1_OCTET_STRING,
                      req->sender_nonce.data, req->sender_nonce.len, &attrs[(*n)++])
         && attribute(oid_sender_nonce, sizeof(oid_sender_nonce), V_ASN1_OCTET_STRING, nonce,
                      req->sender_nonce.len, &attrs[(*n)++])
         && attribute(oid_content_type, sizeof(oid_content_type), V_ASN1_OBJECT, oid_data + 2,
                      sizeof(oid_data) - 2, &attrs[(*n)++])
         && attribute(oid_message_digest, sizeof(oid_message_digest), V_ASN1_OCTET_STRING,
                      digest, digest_len, &attrs[(*n)++]);
    /* signingTime is already a whole TLV; its SET and SEQUENCE are added here. */
    if (ok) {
        scep_bytes set = {NULL, 0};
        scep_buf set_part[] = {{time.data, time.len}};

        ok = scep_der_tlv(V_ASN1_SET | V_ASN1_CONSTRUCTED, set_part, 1, &set);
        if (ok) {
            scep_buf seq_parts[] = {{oid_signing_time, sizeof(oid_signing_time)},
                                    {set.data, set.len}};

            ok = scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, seq_parts, 2, &attrs[(*n)++]);
        }
        scep_bytes_clear(&set);
    }
    if (ok && item->pki_status == SCEP_STATUS_FAILURE) {
        ok = number_attribute(oid_fail_info, sizeof(oid_fail_info), item->fail_info,
                              &attrs[(*n)++]);
        if (ok && item->fail_info_text.data != NULL && item->fail_info_text.len > 0)
            ok = attribute(oid_fail_info_text, sizeof(oid_fail_info_text), V_ASN1_UTF8STRING,
                           item->fail_info_text.data, item->fail_info_text.len, &attrs[(*n)++]);
    }
    scep_bytes_clear(&time);
    OPENSSL_cleanse(nonce, sizeof(nonce));
    if (ok)
        qsort(attrs, *n, sizeof(attrs[0]), bytes_cmp);
    return ok;
}

/* AlgorithmIdentifier DER of a digest, parameters as X509_ALGOR_set_md writes them. */
static int digest_algorithm(const EVP_MD *md, scep_bytes *out)
{
    X509_ALGOR *alg = X509_ALGOR_new();
    unsigned char *der = NULL;
    int len, ok = 0;

    if (alg != NULL) {
        X509_ALGOR_set_md(alg, md);
        len = i2d_X509_ALGOR(alg, &der);
        ok = len > 0 && scep_bytes_set(out, der, (size_t)len);
    }
    OPENSSL_free(der);
    X509_ALGOR_free(alg);
    return ok;
}

/* signatureAlgorithm as OpenSSL's CMS writes it: rsaEncryption for PKCS #1 v1.5,
   ecdsa-with-<digest> without parameters for ECDSA. */
static int signature_algorithm(EVP_PKEY *key, int md_nid, scep_bytes *out)
{
    static const unsigned char rsa_encryption[] = {0x30, 0x0D, 0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                                   0xF7, 0x0D, 0x01, 0x01, 0x01, 0x05, 0x00};
    X509_ALGOR *alg = NULL;
    unsigned char *der = NULL;
    int sig_nid = NID_undef, len, ok = 0;

    if (EVP_PKEY_get_base_id(key) == EVP_PKEY_RSA)
        return scep_bytes_set(out, rsa_encryption, sizeof(rsa_encryption));
    if (EVP_PKEY_get_base_id(key) != EVP_PKEY_EC
        || !OBJ_find_sigid_by_algs(&sig_nid, md_nid, NID_X9_62_id_ecPublicKey))
        return 0;
    alg = X509_ALGOR_new();
    if (alg != NULL && X509_ALGOR_set0(alg, OBJ_nid2obj(sig_nid), V_ASN1_UNDEF, NULL)) {
        len = i2d_X509_ALGOR(alg, &der);
        ok = len > 0 && scep_bytes_set(out, der, (size_t)len);
    }
    OPENSSL_free(der);
    X509_ALGOR_free(alg);
    return ok;
}

int scep_sign_certrep(const scep_ctx *ctx, const scep_wrap_item *item, int md_nid,
                      const scep_bytes *content, scep_bytes *out)
{
    const EVP_MD *md = scep_md(ctx, md_nid);
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int digest_len = 0;
    scep_bytes attrs[SCEP_N_ATTRS];
    scep_buf parts[SCEP_N_ATTRS];
    scep_bytes set = {NULL, 0}, sig = {NULL, 0}, dalg = {NULL, 0}, salg = {NULL, 0};
    scep_bytes t1 = {NULL, 0}, t2 = {NULL, 0}, t3 = {NULL, 0}, si = {NULL, 0}, sd = {NULL, 0};
    EVP_MD_CTX *mctx = NULL;
    size_t n = 0, i, sig_len;
    int ok = 0;

    memset(attrs, 0, sizeof(attrs));
    if (md == NULL || ctx->signer_cert_der.data == NULL
        || !EVP_Digest(content->data != NULL ? content->data : (const unsigned char *)"",
                       content->len, digest, &digest_len, md, NULL)
        || !signed_attributes(item, digest, digest_len, attrs, &n))
        goto done;
    for (i = 0; i < n; i++) {
        parts[i].data = attrs[i].data;
        parts[i].len = attrs[i].len;
    }
    /* The signature covers the attributes under their universal SET tag
       (RFC 5652 section 5.4); the SignerInfo carries them as [0] IMPLICIT. */
    if (!scep_der_tlv(V_ASN1_SET | V_ASN1_CONSTRUCTED, parts, n, &set))
        goto done;
    mctx = scep_signer_sign_ctx_new(ctx, md_nid);
    sig_len = (size_t)EVP_PKEY_get_size(ctx->signer.key);
    sig.data = mctx != NULL ? malloc(sig_len) : NULL;
    if (sig.data == NULL || EVP_DigestSign(mctx, sig.data, &sig_len, set.data, set.len) != 1)
        goto done;
    sig.len = sig_len;
    set.data[0] = 0xA0;
    if (!digest_algorithm(md, &dalg) || !signature_algorithm(ctx->signer.key, md_nid, &salg))
        goto done;
    {
        /* SignerInfo ::= SEQUENCE { version 1, sid issuerAndSerialNumber, digestAlgorithm,
           signedAttrs [0], signatureAlgorithm, signature OCTET STRING } */
        scep_buf sig_part[] = {{sig.data, sig.len}};

        if (!scep_der_tlv(V_ASN1_OCTET_STRING, sig_part, 1, &t1))
            goto done;
    }
    {
        scep_buf si_parts[] = {{version1, sizeof(version1)},
                               {ctx->signer_sid_der.data, ctx->signer_sid_der.len},
                               {dalg.data, dalg.len},
                               {set.data, set.len},
                               {salg.data, salg.len},
                               {t1.data, t1.len}};

        if (!scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, si_parts, 6, &si))
            goto done;
    }
    {
        /* encapContentInfo ::= SEQUENCE { id-data, [0] EXPLICIT OCTET STRING } */
        scep_buf content_part[] = {{content->data, content->len}};

        if (!scep_der_tlv(V_ASN1_OCTET_STRING, content_part, 1, &t1))
            goto done;
    }
    {
        scep_buf explicit0[] = {{t1.data, t1.len}};

        if (!scep_der_tlv(0xA0, explicit0, 1, &t2))
            goto done;
    }
    {
        scep_buf eci_parts[] = {{oid_data, sizeof(oid_data)}, {t2.data, t2.len}};
        scep_buf dalgs[] = {{dalg.data, dalg.len}};

        if (!scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, eci_parts, 2, &t3)
            || !scep_der_tlv(V_ASN1_SET | V_ASN1_CONSTRUCTED, dalgs, 1, &t1))
            goto done;
    }
    {
        /* certificates [0] IMPLICIT, then signerInfos SET */
        scep_buf cert[] = {{ctx->signer_cert_der.data, ctx->signer_cert_der.len}};
        scep_buf sis[] = {{si.data, si.len}};

        if (!scep_der_tlv(0xA0, cert, 1, &t2)
            || !scep_der_tlv(V_ASN1_SET | V_ASN1_CONSTRUCTED, sis, 1, &si))
            goto done;
    }
    {
        /* SignedData ::= SEQUENCE { version 1, digestAlgorithms, encapContentInfo,
           certificates, signerInfos } */
        scep_buf sd_parts[] = {{version1, sizeof(version1)}, {t1.data, t1.len}, {t3.data, t3.len},
                               {t2.data, t2.len}, {si.data, si.len}};

        if (!scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, sd_parts, 5, &sd))
            goto done;
    }
    {
        scep_buf explicit0[] = {{sd.data, sd.len}};

        if (!scep_der_tlv(0xA0, explicit0, 1, &t1))
            goto done;
    }
    {
        scep_buf ci_parts[] = {{oid_signed_data, sizeof(oid_signed_data)}, {t1.data, t1.len}};

        ok = scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, ci_parts, 2, out);
    }
done:
    EVP_MD_CTX_free(mctx);
    for (i = 0; i < SCEP_N_ATTRS; i++)
        scep_bytes_clear(&attrs[i]);
    scep_bytes_clear(&set);
    scep_bytes_clear(&sig);
    scep_bytes_clear(&dalg);
    scep_bytes_clear(&salg);
    scep_bytes_clear(&t1);
    scep_bytes_clear(&t2);
    scep_bytes_clear(&t3);
    scep_bytes_clear(&si);
    scep_bytes_clear(&sd);
    return ok;
}
