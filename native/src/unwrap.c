/*
 * unwrap.c: a pkiMessage in; its verified signed attributes, the requester's
 * algorithms and the decrypted pkcsPKIEnvelope out (RFC 8894 section 3).
 *
 * The outer SignedData is verified with the certificate the requester
 * embedded, without chain validation: a PKCSReq is signed by a self-signed,
 * sometimes odd, device certificate. Renewal checks belong to the caller,
 * which receives the signer certificate.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/cms.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/rsa.h>
#include <openssl/x509v3.h>

#include "internal.h"

static void fail(scep_unwrap_result *r, int status, const char *what)
{
    r->status = status;
    scep_set_error(r->error, sizeof(r->error), what);
}

static int string_type_ok(int type)
{
    return type == V_ASN1_PRINTABLESTRING || type == V_ASN1_UTF8STRING
           || type == V_ASN1_IA5STRING || type == V_ASN1_T61STRING;
}

/* The value of a signed attribute present exactly once with exactly one value
   of an acceptable type, or NULL. */
static const ASN1_STRING *signed_attr(CMS_SignerInfo *si, const ASN1_OBJECT *obj, int want_octets)
{
    int idx = CMS_signed_get_attr_by_OBJ(si, obj, -1);
    X509_ATTRIBUTE *attr;
    ASN1_TYPE *value;
    int type;

    if (idx < 0 || CMS_signed_get_attr_by_OBJ(si, obj, idx) >= 0)
        return NULL;
    attr = CMS_signed_get_attr(si, idx);
    if (attr == NULL || X509_ATTRIBUTE_count(attr) != 1)
        return NULL;
    value = X509_ATTRIBUTE_get0_type(attr, 0);
    if (value == NULL)
        return NULL;
    type = ASN1_TYPE_get(value);
    if (want_octets ? type != V_ASN1_OCTET_STRING : !string_type_ok(type))
        return NULL;
    return value->value.asn1_string;
}

static int copy_string(scep_bytes *dst, const ASN1_STRING *s)
{
    return scep_bytes_set(dst, ASN1_STRING_get0_data(s), (size_t)ASN1_STRING_length(s));
}

/* messageType is a PrintableString of decimal digits (RFC 8894 section 3.2.1.2). */
static int parse_message_type(const ASN1_STRING *s)
{
    const unsigned char *d = ASN1_STRING_get0_data(s);
    int len = ASN1_STRING_length(s), i, v = 0;

    if (len < 1 || len > 3)
        return -1;
    for (i = 0; i < len; i++) {
        if (d[i] < '0' || d[i] > '9')
            return -1;
        v = v * 10 + (d[i] - '0');
    }
    return v;
}

static int read_attributes(const scep_ctx *ctx, CMS_SignerInfo *si, scep_unwrap_result *r)
{
    const ASN1_STRING *mt = signed_attr(si, ctx->oids.message_type, 0);
    const ASN1_STRING *tid = signed_attr(si, ctx->oids.transaction_id, 0);
    const ASN1_STRING *nonce = signed_attr(si, ctx->oids.sender_nonce, 1);

    if (mt == NULL || tid == NULL || nonce == NULL) {
        fail(r, SCEP_ERR_MALFORMED,
             mt == NULL    ? "missing or invalid messageType attribute"
             : tid == NULL ? "missing or invalid transactionID attribute"
                           : "missing or invalid senderNonce attribute");
        return 0;
    }
    r->message_type = parse_message_type(mt);
    if (!copy_string(&r->transaction_id, tid) || !copy_string(&r->sender_nonce, nonce)) {
        fail(r, SCEP_ERR_INTERNAL, "out of memory");
        return 0;
    }
    return 1;
}

/* The default and only label we accept: pSpecified with an empty OCTET STRING. */
static int oaep_label_empty(const X509_ALGOR *psource)
{
    const ASN1_OBJECT *obj = NULL;
    int ptype = V_ASN1_UNDEF;
    const void *pval = NULL; /* X509_ALGOR_get0 leaves it alone for absent parameters */

    if (psource == NULL)
        return 1;
    X509_ALGOR_get0(&obj, &ptype, &pval, psource);
    return OBJ_obj2nid(obj) == NID_pSpecified && ptype == V_ASN1_OCTET_STRING
           && ASN1_STRING_length((const ASN1_STRING *)pval) == 0;
}

static int algor_md_nid(const X509_ALGOR *alg, int dflt)
{
    const ASN1_OBJECT *obj;

    if (alg == NULL)
        return dflt;
    X509_ALGOR_get0(&obj, NULL, NULL, alg);
    return OBJ_obj2nid(obj);
}

/* Records how the content-encryption key was transported (RFC 8017 A.2.1). */
static int read_key_transport(const scep_ctx *ctx, X509_ALGOR *kalg, scep_unwrap_result *r)
{
    const ASN1_OBJECT *obj;
    RSA_OAEP_PARAMS *oaep = NULL;
    X509_ALGOR *mgf1_md = NULL;
    int ok = 0;

    X509_ALGOR_get0(&obj, NULL, NULL, kalg);
    switch (OBJ_obj2nid(obj)) {
    case NID_rsaEncryption:
        r->key_transport = SCEP_KT_RSA_PKCS1;
        return 1;
    case NID_rsaesOaep:
        break;
    default:
        fail(r, SCEP_ERR_BAD_ALG, "unsupported key transport algorithm");
        return 0;
    }
    r->key_transport = SCEP_KT_RSA_OAEP;
    r->oaep_md_nid = NID_sha1; /* RFC 8017 defaults */
    r->oaep_mgf1_md_nid = NID_sha1;
    if (kalg->parameter != NULL && ASN1_TYPE_get(kalg->parameter) != V_ASN1_NULL) {
        oaep = ASN1_TYPE_unpack_sequence(ASN1_ITEM_rptr(RSA_OAEP_PARAMS), kalg->parameter);
        if (oaep == NULL)
            goto bad;
        r->oaep_md_nid = algor_md_nid(oaep->hashFunc, NID_sha1);
        if (oaep->maskGenFunc != NULL) {
            X509_ALGOR_get0(&obj, NULL, NULL, oaep->maskGenFunc);
            if (OBJ_obj2nid(obj) != NID_mgf1 || oaep->maskGenFunc->parameter == NULL)
                goto bad;
            mgf1_md = ASN1_TYPE_unpack_sequence(ASN1_ITEM_rptr(X509_ALGOR),
                                                oaep->maskGenFunc->parameter);
            if (mgf1_md == NULL)
                goto bad;
            r->oaep_mgf1_md_nid = algor_md_nid(mgf1_md, NID_sha1);
        }
        if (!oaep_label_empty(oaep->pSourceFunc))
            goto bad;
    }
    if (!scep_digest_allowed(ctx, r->oaep_md_nid) || !scep_digest_allowed(ctx, r->oaep_mgf1_md_nid)
        || r->oaep_md_nid == NID_md5 || r->oaep_mgf1_md_nid == NID_md5)
        goto bad;
    ok = 1;
bad:
    if (!ok)
        fail(r, SCEP_ERR_BAD_ALG, "unsupported RSAES-OAEP parameters");
    X509_ALGOR_free(mgf1_md);
    RSA_OAEP_PARAMS_free(oaep);
    return ok;
}

/* Finds the RecipientInfo addressed to one of our keys. */
static const scep_keypair *find_recipient(const scep_ctx *ctx, CMS_ContentInfo *env,
                                          CMS_RecipientInfo **found, X509_ALGOR **kalg)
{
    STACK_OF(CMS_RecipientInfo) *ris = CMS_get0_RecipientInfos(env);
    int i;
    size_t k;

    for (i = 0; i < sk_CMS_RecipientInfo_num(ris); i++) {
        CMS_RecipientInfo *ri = sk_CMS_RecipientInfo_value(ris, i);

        if (CMS_RecipientInfo_type(ri) != CMS_RECIPINFO_TRANS)
            continue;
        for (k = 0; k < ctx->n_recipients; k++) {
            /* Matches issuerAndSerialNumber or subjectKeyIdentifier. */
            if (CMS_RecipientInfo_ktri_cert_cmp(ri, ctx->recipients[k].cert) == 0) {
                if (!CMS_RecipientInfo_ktri_get0_algs(ri, NULL, NULL, kalg))
                    return NULL;
                *found = ri;
                return &ctx->recipients[k];
            }
        }
    }
    return NULL;
}

/* The DER of a KeyTransRecipientInfo's rid, as OpenSSL encodes it in the
   envelope it re-encoded (RFC 5652 section 6.2.1). */
static int recipient_rid_der(CMS_RecipientInfo *ri, scep_bytes *out)
{
    ASN1_OCTET_STRING *keyid = NULL;
    X509_NAME *issuer = NULL;
    ASN1_INTEGER *serial = NULL;
    unsigned char *name_der = NULL, *serial_der = NULL;
    int name_len, serial_len, ok;
    scep_buf parts[2];

    if (!CMS_RecipientInfo_ktri_get0_signer_id(ri, &keyid, &issuer, &serial))
        return 0;
    if (keyid != NULL) { /* subjectKeyIdentifier [0] IMPLICIT OCTET STRING */
        parts[0].data = ASN1_STRING_get0_data(keyid);
        parts[0].len = (size_t)ASN1_STRING_length(keyid);
        return scep_der_tlv(V_ASN1_CONTEXT_SPECIFIC | 0, parts, 1, out);
    }
    name_len = issuer != NULL ? i2d_X509_NAME(issuer, &name_der) : -1;
    serial_len = serial != NULL ? i2d_ASN1_INTEGER(serial, &serial_der) : -1;
    parts[0].data = name_der;
    parts[0].len = name_len > 0 ? (size_t)name_len : 0;
    parts[1].data = serial_der;
    parts[1].len = serial_len > 0 ? (size_t)serial_len : 0;
    ok = name_len > 0 && serial_len > 0
         && scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, parts, 2, out);
    OPENSSL_free(serial_der);
    OPENSSL_free(name_der);
    return ok;
}

/* ContentInfo { id-encryptedData, [0] EncryptedData { version 0, eci } }. */
static CMS_ContentInfo *encrypted_data(scep_buf eci)
{
    static const unsigned char oid_encrypted_data[] = {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                                       0xF7, 0x0D, 0x01, 0x07, 0x06};
    static const unsigned char version0[] = {0x02, 0x01, 0x00};
    scep_bytes inner = {NULL, 0}, tagged = {NULL, 0}, outer = {NULL, 0};
    scep_buf parts[2];
    CMS_ContentInfo *cms = NULL;
    const unsigned char *p;

    parts[0].data = version0;
    parts[0].len = sizeof(version0);
    parts[1] = eci;
    if (!scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, parts, 2, &inner))
        goto done;
    parts[0].data = inner.data;
    parts[0].len = inner.len;
    if (!scep_der_tlv(V_ASN1_CONTEXT_SPECIFIC | V_ASN1_CONSTRUCTED | 0, parts, 1, &tagged))
        goto done;
    parts[0].data = oid_encrypted_data;
    parts[0].len = sizeof(oid_encrypted_data);
    parts[1].data = tagged.data;
    parts[1].len = tagged.len;
    if (!scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, parts, 2, &outer))
        goto done;
    p = outer.data;
    cms = d2i_CMS_ContentInfo(NULL, &p, (long)outer.len);
done:
    scep_bytes_clear(&outer);
    scep_bytes_clear(&tagged);
    scep_bytes_clear(&inner);
    return cms;
}

/*
 * Opens the envelope with the content-encryption key that scep_rsa_unwrap_cek
 * (keystore.c) recovers in one raw RSA operation, random when the key
 * transport's padding is wrong, and OpenSSL's CMS EncryptedData decryption of
 * the same EncryptedContentInfo. CMS_decrypt would let libp11's engine call a
 * token twice for a wrong PKCS#1 v1.5 or OAEP padding and once for a right one
 * (a timing oracle, issue 13); a key from a file takes the same path.
 */
static int open_envelope(const scep_ctx *ctx, const scep_keypair *recipient,
                         CMS_RecipientInfo *ri, const unsigned char *der, size_t der_len,
                         const scep_unwrap_result *r, BIO *plain)
{
    const EVP_CIPHER *cipher = scep_cipher(ctx, r->cipher_nid);
    const EVP_MD *md = NULL, *mgf1_md = NULL;
    scep_bytes rid = {NULL, 0};
    scep_buf rid_buf, ek = {NULL, 0}, eci = {NULL, 0};
    CMS_ContentInfo *encd = NULL;
    unsigned char cek[EVP_MAX_KEY_LENGTH];
    int key_len = cipher != NULL ? EVP_CIPHER_get_key_length(cipher) : 0;
    int ok = 0;

    if (r->key_transport == SCEP_KT_RSA_OAEP) {
        md = scep_md(ctx, r->oaep_md_nid);
        mgf1_md = scep_md(ctx, r->oaep_mgf1_md_nid);
        if (md == NULL || mgf1_md == NULL)
            goto done;
    }
    if (key_len <= 0 || key_len > EVP_MAX_KEY_LENGTH || !recipient_rid_der(ri, &rid))
        goto done;
    rid_buf.data = rid.data;
    rid_buf.len = rid.len;
    if (!scep_envelope_ktri(der, der_len, &rid_buf, &ek, &eci))
        goto done;
    scep_rsa_unwrap_cek(recipient->key, md, mgf1_md, ek.data, ek.len, cek, (size_t)key_len);
    encd = encrypted_data(eci);
    ok = encd != NULL
         && CMS_EncryptedData_decrypt(encd, cek, (size_t)key_len, NULL, plain, CMS_BINARY);
    OPENSSL_cleanse(cek, sizeof(cek));
done:
    CMS_ContentInfo_free(encd);
    scep_bytes_clear(&rid);
    return ok;
}

static int decrypt_envelope(const scep_ctx *ctx, const ASN1_OCTET_STRING *content,
                            scep_unwrap_result *r)
{
    const unsigned char *p = ASN1_STRING_get0_data(content);
    long len = ASN1_STRING_length(content);
    CMS_ContentInfo *env = NULL;
    unsigned char *der = NULL;
    int der_len;
    const scep_keypair *recipient;
    CMS_RecipientInfo *ri = NULL;
    X509_ALGOR *kalg = NULL;
    BIO *plain = NULL;
    BUF_MEM *mem = NULL;
    char what[128];
    int ok = 0;

    env = d2i_CMS_ContentInfo(NULL, &p, len);
    if (env == NULL || p != ASN1_STRING_get0_data(content) + len
        || OBJ_obj2nid(CMS_get0_type(env)) != NID_pkcs7_enveloped) {
        fail(r, SCEP_ERR_MALFORMED, "pkcsPKIEnvelope is not a CMS EnvelopedData");
        goto done;
    }
    /* The envelope may be BER; OpenSSL's own re-encoding is DER, which der.c reads. */
    der_len = i2d_CMS_ContentInfo(env, &der);
    r->cipher_nid = der_len > 0 ? scep_envelope_cipher_nid(der, (size_t)der_len) : NID_undef;
    if (!scep_cipher_allowed(ctx, r->cipher_nid)) {
        snprintf(what, sizeof(what), "content cipher %s is not allowed",
                 r->cipher_nid != NID_undef ? OBJ_nid2sn(r->cipher_nid) : "(unknown)");
        fail(r, SCEP_ERR_BAD_ALG, what);
        goto done;
    }
    recipient = find_recipient(ctx, env, &ri, &kalg);
    if (recipient == NULL) {
        fail(r, SCEP_ERR_DECRYPT, "the envelope is not addressed to any of our certificates");
        goto done;
    }
    if (!read_key_transport(ctx, kalg, r))
        goto done;
    plain = BIO_new(BIO_s_mem());
    if (plain == NULL || !open_envelope(ctx, recipient, ri, der, (size_t)der_len, r, plain)) {
        fail(r, SCEP_ERR_DECRYPT, "cannot decrypt the pkcsPKIEnvelope");
        goto done;
    }
    BIO_get_mem_ptr(plain, &mem);
    if (mem == NULL || mem->length == 0) {
        fail(r, SCEP_ERR_MALFORMED, "the pkcsPKIEnvelope is empty");
        goto done;
    }
    if (!scep_bytes_set(&r->content, (const unsigned char *)mem->data, mem->length)) {
        fail(r, SCEP_ERR_INTERNAL, "out of memory");
        goto done;
    }
    ok = 1;
done:
    BIO_free(plain);
    OPENSSL_free(der);
    CMS_ContentInfo_free(env);
    return ok;
}

static int copy_i2d_name(scep_bytes *dst, const X509_NAME *name)
{
    unsigned char *der = NULL;
    int len = i2d_X509_NAME(name, &der);
    int ok = len > 0 && scep_bytes_set(dst, der, (size_t)len);

    OPENSSL_free(der);
    return ok;
}

/* Reads what policy needs from a PKCS#10 content and keeps the parsed request
   and its key for issue; any other content is left alone. */
static void read_csr(const scep_ctx *ctx, scep_unwrap_result *r, scep_request_state *state)
{
    EVP_PKEY *key = NULL;
    /* A PKCSReq is usually signed with the key it certifies; that key is then
       shared rather than built twice. */
    X509_REQ *req = scep_parse_csr_reusing(ctx, r->content.data, r->content.len,
                                           X509_get_X509_PUBKEY(state->signer), state->signer_key,
                                           &key);
    STACK_OF(X509_EXTENSION) *exts = NULL;
    X509_PUBKEY *spki;
    int idx;

    if (req == NULL || !copy_i2d_name(&r->csr_subject, X509_REQ_get_subject_name(req)))
        goto done;
    spki = X509_REQ_get_X509_PUBKEY(req);
    r->csr_key_nid = scep_spki_key_nid(spki);
    r->csr_curve_nid = scep_spki_curve_nid(spki);
    r->csr_key_bits = key != NULL ? EVP_PKEY_get_bits(key) : 0;
    /* challengePassword (RFC 2985 section 5.4.1), one value. */
    idx = X509_REQ_get_attr_by_NID(req, NID_pkcs9_challengePassword, -1);
    if (idx >= 0) {
        X509_ATTRIBUTE *attr = X509_REQ_get_attr(req, idx);
        ASN1_TYPE *value = attr != NULL && X509_ATTRIBUTE_count(attr) == 1
                               ? X509_ATTRIBUTE_get0_type(attr, 0)
                               : NULL;

        if (value != NULL && string_type_ok(ASN1_TYPE_get(value))
            && !copy_string(&r->csr_challenge, value->value.asn1_string))
            goto done;
    }
    exts = X509_REQ_get_extensions(req);
    idx = exts != NULL ? X509v3_get_ext_by_NID(exts, NID_subject_alt_name, -1) : -1;
    if (idx >= 0) {
        const ASN1_OCTET_STRING *san = X509_EXTENSION_get_data(X509v3_get_ext(exts, idx));

        if (!copy_string(&r->csr_san, san))
            goto done;
    }
    r->csr_parsed = 1;
    state->csr = req;
    state->csr_key = key;
    req = NULL;
    key = NULL;
done:
    sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    EVP_PKEY_free(key);
    X509_REQ_free(req);
}

typedef struct {
    unsigned char *der;
    int len;
} der_item;

/* DER order for SET OF (X.690 section 11.6), as OpenSSL sorts it. */
static int der_item_cmp(const void *a, const void *b)
{
    const der_item *x = a, *y = b;
    int c = memcmp(x->der, y->der, (size_t)(x->len < y->len ? x->len : y->len));

    return c != 0 ? c : x->len - y->len;
}

#define SCEP_MAX_SIGNED_ATTRS 64

/* The DER SET OF signed attributes: what the signature covers (RFC 5652 5.4). */
static int encode_signed_attrs(CMS_SignerInfo *si, scep_bytes *out)
{
    der_item items[SCEP_MAX_SIGNED_ATTRS];
    scep_buf parts[SCEP_MAX_SIGNED_ATTRS];
    int n = CMS_signed_get_attr_count(si), i, ok = 0;

    if (n <= 0 || n > SCEP_MAX_SIGNED_ATTRS)
        return 0;
    memset(items, 0, sizeof(items));
    for (i = 0; i < n; i++) {
        items[i].len = i2d_X509_ATTRIBUTE(CMS_signed_get_attr(si, i), &items[i].der);
        if (items[i].len <= 0)
            goto done;
    }
    qsort(items, (size_t)n, sizeof(items[0]), der_item_cmp);
    for (i = 0; i < n; i++) {
        parts[i].data = items[i].der;
        parts[i].len = (size_t)items[i].len;
    }
    ok = scep_der_tlv(V_ASN1_SET | V_ASN1_CONSTRUCTED, parts, (size_t)n, out);
done:
    for (i = 0; i < n; i++)
        OPENSSL_free(items[i].der);
    return ok;
}

/* Whether the SignerInfo's signatureAlgorithm fits the signer key. */
static int signature_alg_ok(const X509_ALGOR *sig_alg, const EVP_PKEY *key)
{
    const ASN1_OBJECT *obj;
    int sig_nid, md_nid = NID_undef, pk_nid = NID_undef;
    int key_nid = EVP_PKEY_get_base_id(key);

    X509_ALGOR_get0(&obj, NULL, NULL, sig_alg);
    sig_nid = OBJ_obj2nid(obj);
    if (sig_nid == NID_rsaEncryption || sig_nid == NID_X9_62_id_ecPublicKey)
        return sig_nid == key_nid;
    /* sha256WithRSAEncryption, ecdsa-with-SHA256, ...; RSASSA-PSS is not used by SCEP. */
    return OBJ_find_sigid_algs(sig_nid, &md_nid, &pk_nid) && pk_nid == key_nid
           && md_nid != NID_undef;
}

/*
 * Whether cert is the one the SignerInfo names: by issuerAndSerialNumber or,
 * RFC 5652 section 5.3, by subjectKeyIdentifier, which a receiver must support
 * too. The certificates were parsed without providers (pubkey.c), where
 * OpenSSL's own subjectKeyIdentifier lookup fails: it first caches the
 * certificate's SHA-1 fingerprint, which needs a provider. The extension is
 * therefore read directly.
 */
static int signer_cert_matches(CMS_SignerInfo *si, X509 *cert)
{
    ASN1_OCTET_STRING *keyid = NULL, *skid;
    X509_NAME *issuer = NULL;
    ASN1_INTEGER *serial = NULL;
    int match;

    if (!CMS_SignerInfo_get0_signer_id(si, &keyid, &issuer, &serial))
        return 0;
    if (keyid == NULL)
        return CMS_SignerInfo_cert_cmp(si, cert) == 0;
    /* NULL when the extension is absent, malformed or present more than once. */
    skid = X509_get_ext_d2i(cert, NID_subject_key_identifier, NULL, NULL);
    match = skid != NULL && ASN1_OCTET_STRING_cmp(keyid, skid) == 0;
    ASN1_OCTET_STRING_free(skid);
    return match;
}

/*
 * Verifies the SignerInfo as CMS_verify does without chain validation (RFC
 * 5652 section 5.6): the contentType and messageDigest signed attributes and
 * the signature over the DER signed attributes, with the key of the embedded
 * certificate the SignerInfo names. The key is built without the decoder
 * framework (pubkey.c), which is why this is not a CMS_verify call.
 */
static int verify_signer_info(const scep_ctx *ctx, CMS_ContentInfo *cms, CMS_SignerInfo *si,
                              scep_unwrap_result *r, scep_request_state *state)
{
    STACK_OF(X509) *certs = CMS_get1_certs(cms);
    X509 *signer = NULL;
    X509_ALGOR *sig_alg = NULL;
    /* A digest outside the fetched set is still verified, so that policy can
       refuse it with a signed reply. */
    const EVP_MD *md = scep_md(ctx, r->digest_nid) != NULL ? scep_md(ctx, r->digest_nid)
                                                            : EVP_get_digestbynid(r->digest_nid);
    ASN1_OCTET_STRING **content = CMS_get0_content(cms);
    const ASN1_OCTET_STRING *want, *sig;
    const ASN1_OBJECT *ctype;
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int digest_len = 0;
    scep_bytes attrs = {NULL, 0};
    EVP_MD_CTX *mctx = NULL;
    int i, ok = 0;

    for (i = 0; i < sk_X509_num(certs) && signer == NULL; i++) {
        if (signer_cert_matches(si, sk_X509_value(certs, i)))
            signer = sk_X509_value(certs, i);
    }
    if (signer == NULL) {
        fail(r, SCEP_ERR_SIGNATURE, "the signer certificate is not in the message");
        goto done;
    }
    if (!X509_up_ref(signer)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot keep the signer certificate");
        goto done;
    }
    state->signer = signer;
    state->signer_key = scep_pubkey_from_spki(X509_get_X509_PUBKEY(signer));
    CMS_SignerInfo_get0_algs(si, NULL, NULL, NULL, &sig_alg);
    if (state->signer_key == NULL || md == NULL || !signature_alg_ok(sig_alg, state->signer_key)) {
        fail(r, SCEP_ERR_SIGNATURE, "unsupported signer key or signature algorithm");
        goto done;
    }
    if (content == NULL || *content == NULL || ASN1_STRING_length(*content) <= 0) {
        fail(r, SCEP_ERR_MALFORMED, "no pkcsPKIEnvelope");
        goto done;
    }
    want = CMS_signed_get0_data_by_OBJ(si, OBJ_nid2obj(NID_pkcs9_messageDigest), -3,
                                       V_ASN1_OCTET_STRING);
    if (!EVP_Digest(ASN1_STRING_get0_data(*content), (size_t)ASN1_STRING_length(*content), digest,
                    &digest_len, md, NULL)
        || want == NULL || ASN1_STRING_length(want) != (int)digest_len
        || memcmp(ASN1_STRING_get0_data(want), digest, digest_len) != 0) {
        fail(r, SCEP_ERR_SIGNATURE, "the messageDigest attribute does not match the content");
        goto done;
    }
    ctype = CMS_signed_get0_data_by_OBJ(si, OBJ_nid2obj(NID_pkcs9_contentType), -3,
                                        V_ASN1_OBJECT);
    if (ctype == NULL || OBJ_obj2nid(ctype) != NID_pkcs7_data) {
        fail(r, SCEP_ERR_SIGNATURE, "the contentType attribute is missing or not id-data");
        goto done;
    }
    sig = CMS_SignerInfo_get0_signature(si);
    mctx = EVP_MD_CTX_new();
    if (!encode_signed_attrs(si, &attrs) || sig == NULL || mctx == NULL
        || EVP_DigestVerifyInit(mctx, NULL, md, NULL, state->signer_key) != 1
        || EVP_DigestVerify(mctx, ASN1_STRING_get0_data(sig), (size_t)ASN1_STRING_length(sig),
                            attrs.data, attrs.len)
               != 1) {
        fail(r, SCEP_ERR_SIGNATURE, "signature verification failed");
        goto done;
    }
    ok = 1;
done:
    EVP_MD_CTX_free(mctx);
    scep_bytes_clear(&attrs);
    sk_X509_pop_free(certs, X509_free);
    return ok;
}

static void unwrap_one(const scep_ctx *ctx, const scep_buf *msg, scep_unwrap_result *r)
{
    const unsigned char *p = msg->data;
    CMS_ContentInfo *cms = NULL;
    STACK_OF(CMS_SignerInfo) *sis;
    CMS_SignerInfo *si;
    X509_ALGOR *dig_alg = NULL;
    const ASN1_OBJECT *dig_obj;
    ASN1_OCTET_STRING **content;
    unsigned char *der = NULL;
    unsigned int md_len = 0;
    int der_len;
    char what[128];
    scep_request_state *state;

    r->status = SCEP_ERR_INTERNAL;
    r->message_type = -1;
    state = calloc(1, sizeof(*state));
    if (state == NULL) {
        fail(r, SCEP_ERR_INTERNAL, "out of memory");
        goto done;
    }
    r->priv = state;
    if (!scep_input_ok(msg->data, msg->len)) {
        fail(r, SCEP_ERR_MALFORMED, "empty or oversized message");
        goto done;
    }
    /* Parsed in the provider-less context: certificate keys stay undecoded. */
    cms = CMS_ContentInfo_new_ex(ctx->parse_libctx, NULL);
    if (cms == NULL || d2i_CMS_ContentInfo(&cms, &p, (long)msg->len) == NULL) {
        fail(r, SCEP_ERR_MALFORMED, "not a CMS ContentInfo");
        goto done;
    }
    if (p != msg->data + msg->len) {
        fail(r, SCEP_ERR_MALFORMED, "trailing data after the message");
        goto done;
    }
    if (OBJ_obj2nid(CMS_get0_type(cms)) != NID_pkcs7_signed
        || OBJ_obj2nid(CMS_get0_eContentType(cms)) != NID_pkcs7_data) {
        fail(r, SCEP_ERR_MALFORMED, "not a SignedData over id-data");
        goto done;
    }
    sis = CMS_get0_SignerInfos(cms);
    if (sk_CMS_SignerInfo_num(sis) != 1) {
        fail(r, SCEP_ERR_MALFORMED, "a pkiMessage has exactly one SignerInfo");
        goto done;
    }
    si = sk_CMS_SignerInfo_value(sis, 0);
    if (CMS_signed_get_attr_count(si) <= 0) {
        fail(r, SCEP_ERR_MALFORMED, "the SignerInfo has no signed attributes");
        goto done;
    }
    CMS_SignerInfo_get0_algs(si, NULL, NULL, &dig_alg, NULL);
    X509_ALGOR_get0(&dig_obj, NULL, NULL, dig_alg);
    r->digest_nid = OBJ_obj2nid(dig_obj);
    if (!verify_signer_info(ctx, cms, si, r, state))
        goto done;
    der_len = i2d_X509(state->signer, &der);
    if (der_len <= 0 || !scep_bytes_set(&r->signer_cert, der, (size_t)der_len)
        || !X509_pubkey_digest(state->signer, scep_md(ctx, NID_sha256), r->signer_key_sha256,
                               &md_len)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot encode the signer certificate");
        goto done;
    }
    if (!read_attributes(ctx, si, r))
        goto done;
    if (!scep_digest_allowed(ctx, r->digest_nid)) {
        snprintf(what, sizeof(what), "message digest %s is not allowed",
                 r->digest_nid != NID_undef ? OBJ_nid2sn(r->digest_nid) : "(unknown)");
        fail(r, SCEP_ERR_BAD_ALG, what);
        goto done;
    }
    content = CMS_get0_content(cms);
    if (!decrypt_envelope(ctx, *content, r))
        goto done;
    read_csr(ctx, r, state);
    r->status = SCEP_OK;
done:
    OPENSSL_free(der);
    CMS_ContentInfo_free(cms);
    ERR_clear_error();
}

size_t scep_unwrap_batch(const scep_ctx *ctx, const scep_buf *messages, size_t n,
                         scep_unwrap_result **out)
{
    size_t i;

    for (i = 0; i < n; i++) {
        out[i] = calloc(1, sizeof(*out[i]));
        if (out[i] == NULL)
            break;
        unwrap_one(ctx, &messages[i], out[i]);
    }
    return i;
}

void scep_unwrap_result_free(scep_unwrap_result *r)
{
    if (r == NULL)
        return;
    scep_bytes_clear(&r->transaction_id);
    scep_bytes_clear(&r->sender_nonce);
    scep_bytes_clear(&r->signer_cert);
    scep_bytes_clear(&r->content);
    scep_bytes_clear(&r->csr_challenge);
    scep_bytes_clear(&r->csr_subject);
    scep_bytes_clear(&r->csr_san);
    if (r->priv != NULL) {
        scep_request_state *state = r->priv;

        X509_free(state->signer);
        EVP_PKEY_free(state->signer_key);
        X509_REQ_free(state->csr);
        EVP_PKEY_free(state->csr_key);
        free(state);
    }
    free(r);
}
