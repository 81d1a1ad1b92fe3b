/*
 * pubkey.c: public keys and certification requests without OpenSSL 3.0's
 * decoder framework.
 *
 * OpenSSL 3.0 decodes the public key of every certificate and request it
 * parses through OSSL_DECODER, which costs about 70 us per key, a third of an
 * RSA-2048 signature. The core therefore parses those structures in a library
 * context with no providers (the key is left undecoded) and builds the key
 * from its raw parameters with EVP_PKEY_fromdata, about 3 us.
 */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/objects.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>

#include "internal.h"

/* Reads one DER INTEGER from *p into a new BIGNUM; positive values only. */
static BIGNUM *read_positive_integer(const unsigned char **p, long max)
{
    const unsigned char *q = *p;
    ASN1_INTEGER *i = d2i_ASN1_INTEGER(NULL, &q, max);
    BIGNUM *bn = NULL;

    if (i != NULL && ASN1_STRING_type(i) == V_ASN1_INTEGER)
        bn = ASN1_INTEGER_to_BN(i, NULL);
    ASN1_INTEGER_free(i);
    if (bn != NULL && (BN_is_zero(bn) || BN_is_negative(bn))) {
        BN_free(bn);
        bn = NULL;
    }
    *p = q;
    return bn;
}

/* RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER } (RFC 8017 A.1.1) */
static int rsa_params(OSSL_PARAM_BLD *bld, const unsigned char *der, int len, BIGNUM **n,
                      BIGNUM **e)
{
    const unsigned char *p = der, *end;
    long seq_len = 0;
    int tag = 0, xclass = 0, ret;

    ret = ASN1_get_object(&p, &seq_len, &tag, &xclass, len);
    if ((ret & 0x80) || ret != V_ASN1_CONSTRUCTED || tag != V_ASN1_SEQUENCE
        || xclass != V_ASN1_UNIVERSAL || p + seq_len != der + len)
        return 0;
    end = p + seq_len;
    *n = read_positive_integer(&p, (long)(end - p));
    *e = *n != NULL ? read_positive_integer(&p, (long)(end - p)) : NULL;
    return *e != NULL && p == end && OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, *n)
           && OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, *e);
}

/*
 * Whether der is an RSAPublicKey in DER, which is what a certificate must carry.
 * rsa_params reads BER lengths too; here the length is compared with the DER
 * encoding of the integers read. OpenSSL already refuses padded integer
 * contents, so any extra length octet makes the encoding longer than DER.
 */
int scep_rsa_public_key_is_der(const unsigned char *der, int len)
{
    const unsigned char *p = der, *end;
    ASN1_INTEGER *n = NULL, *e = NULL;
    long seq_len = 0;
    int tag = 0, xclass = 0, ret, n_len, e_len, ok = 0;

    ret = ASN1_get_object(&p, &seq_len, &tag, &xclass, len);
    if ((ret & 0x80) || ret != V_ASN1_CONSTRUCTED || tag != V_ASN1_SEQUENCE
        || xclass != V_ASN1_UNIVERSAL || p + seq_len != der + len)
        goto done;
    end = p + seq_len;
    n = d2i_ASN1_INTEGER(NULL, &p, (long)(end - p));
    e = n != NULL ? d2i_ASN1_INTEGER(NULL, &p, (long)(end - p)) : NULL;
    if (e == NULL || p != end)
        goto done;
    n_len = i2d_ASN1_INTEGER(n, NULL);
    e_len = i2d_ASN1_INTEGER(e, NULL);
    ok = n_len > 0 && e_len > 0 && n_len <= len && e_len <= len
         && ASN1_object_size(1, n_len + e_len, V_ASN1_SEQUENCE) == len;
done:
    ASN1_INTEGER_free(e);
    ASN1_INTEGER_free(n);
    return ok;
}

EVP_PKEY *scep_pubkey_from_spki(const X509_PUBKEY *spki)
{
    const unsigned char *bits = NULL;
    int bits_len = 0, ptype = 0;
    X509_ALGOR *alg = NULL;
    const ASN1_OBJECT *alg_oid = NULL;
    const void *pval = NULL;
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *pctx = NULL;
    EVP_PKEY *pkey = NULL;
    BIGNUM *n = NULL, *e = NULL;
    const char *type = NULL;

    if (bld == NULL || spki == NULL
        || !X509_PUBKEY_get0_param(NULL, &bits, &bits_len, &alg, spki) || alg == NULL)
        goto done;
    X509_ALGOR_get0(&alg_oid, &ptype, &pval, alg);
    switch (OBJ_obj2nid(alg_oid)) {
    case NID_rsaEncryption:
        type = "RSA";
        if (!rsa_params(bld, bits, bits_len, &n, &e))
            goto done;
        break;
    case NID_X9_62_id_ecPublicKey: {
        /* Named curves only (RFC 5480 section 2.1.1). */
        const char *group = ptype == V_ASN1_OBJECT ? OBJ_nid2sn(OBJ_obj2nid(pval)) : NULL;

        type = "EC";
        if (group == NULL
            || !OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, group, 0)
            || !OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, bits,
                                                 (size_t)bits_len))
            goto done;
        break;
    }
    default:
        goto done;
    }
    params = OSSL_PARAM_BLD_to_param(bld);
    pctx = params != NULL ? EVP_PKEY_CTX_new_from_name(NULL, type, NULL) : NULL;
    if (pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0) {
        EVP_PKEY_free(pkey);
        pkey = NULL;
    }
done:
    EVP_PKEY_CTX_free(pctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(n);
    BN_free(e);
    return pkey;
}

int scep_spki_curve_nid(const X509_PUBKEY *spki)
{
    X509_ALGOR *alg = NULL;
    const ASN1_OBJECT *oid = NULL;
    const void *pval = NULL;
    int ptype = 0;

    if (!X509_PUBKEY_get0_param(NULL, NULL, NULL, &alg, spki) || alg == NULL)
        return NID_undef;
    X509_ALGOR_get0(&oid, &ptype, &pval, alg);
    return ptype == V_ASN1_OBJECT && OBJ_obj2nid(oid) == NID_X9_62_id_ecPublicKey
               ? OBJ_obj2nid(pval)
               : NID_undef;
}

int scep_spki_key_nid(const X509_PUBKEY *spki)
{
    X509_ALGOR *alg = NULL;
    const ASN1_OBJECT *oid;

    if (!X509_PUBKEY_get0_param(NULL, NULL, NULL, &alg, spki) || alg == NULL)
        return NID_undef;
    X509_ALGOR_get0(&oid, NULL, NULL, alg);
    return OBJ_obj2nid(oid);
}

/* Whether two SubjectPublicKeyInfos are the same: algorithm, parameters and key bits. */
static int same_spki(const X509_PUBKEY *a, const X509_PUBKEY *b)
{
    const unsigned char *a_bits = NULL, *b_bits = NULL;
    int a_len = 0, b_len = 0;
    X509_ALGOR *a_alg = NULL, *b_alg = NULL;

    return a != NULL && b != NULL && X509_PUBKEY_get0_param(NULL, &a_bits, &a_len, &a_alg, a)
           && X509_PUBKEY_get0_param(NULL, &b_bits, &b_len, &b_alg, b) && a_alg != NULL
           && b_alg != NULL && X509_ALGOR_cmp(a_alg, b_alg) == 0 && a_len == b_len && a_len > 0
           && memcmp(a_bits, b_bits, (size_t)a_len) == 0;
}

X509_REQ *scep_parse_csr(const scep_ctx *ctx, const unsigned char *der, size_t len, EVP_PKEY **key)
{
    return scep_parse_csr_reusing(ctx, der, len, NULL, NULL, key);
}

X509_REQ *scep_parse_csr_reusing(const scep_ctx *ctx, const unsigned char *der, size_t len,
                                 const X509_PUBKEY *known_spki, EVP_PKEY *known_key,
                                 EVP_PKEY **key)
{
    const unsigned char *p = der;
    X509_REQ *req;
    const X509_PUBKEY *spki;

    *key = NULL;
    if (!scep_input_ok(der, len))
        return NULL;
    req = (X509_REQ *)ASN1_item_d2i_ex(NULL, &p, (long)len, ASN1_ITEM_rptr(X509_REQ),
                                       ctx->parse_libctx, NULL);
    if (req == NULL || p != der + len) {
        X509_REQ_free(req);
        return NULL;
    }
    spki = X509_REQ_get_X509_PUBKEY(req);
    if (known_key != NULL && same_spki(spki, known_spki) && EVP_PKEY_up_ref(known_key))
        *key = known_key;
    else
        *key = scep_pubkey_from_spki(spki);
    return req;
}
