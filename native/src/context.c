/*
 * context.c: the keys and policy of one scep-fast worker, loaded once.
 *
 * Everything here runs before the context is shared; afterwards the batch
 * entry points only read it, which is what makes them safe on any thread.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/x509v3.h>

#include "internal.h"

#ifndef SCEP_FAST_VERSION
#error "SCEP_FAST_VERSION must be defined by the build"
#endif

const char *scep_native_version(void)
{
    return SCEP_FAST_VERSION;
}

int scep_native_abi(void)
{
    return SCEP_NATIVE_ABI;
}

const char *scep_nid_name(int nid)
{
    const char *name = nid > 0 ? OBJ_nid2sn(nid) : NULL;

    return name != NULL ? name : "";
}

static int oid(ASN1_OBJECT **dst, const char *dotted)
{
    *dst = OBJ_txt2obj(dotted, 1);
    return *dst != NULL;
}

scep_ctx *scep_ctx_new(int flags, char *err, size_t err_len)
{
    scep_ctx *ctx = calloc(1, sizeof(*ctx));

    if (ctx == NULL) {
        scep_set_error(err, err_len, "out of memory");
        return NULL;
    }
    ctx->flags = flags;
    if (!oid(&ctx->oids.message_type, "2.16.840.1.113733.1.9.2")
        || !oid(&ctx->oids.pki_status, "2.16.840.1.113733.1.9.3")
        || !oid(&ctx->oids.fail_info, "2.16.840.1.113733.1.9.4")
        || !oid(&ctx->oids.sender_nonce, "2.16.840.1.113733.1.9.5")
        || !oid(&ctx->oids.recipient_nonce, "2.16.840.1.113733.1.9.6")
        || !oid(&ctx->oids.transaction_id, "2.16.840.1.113733.1.9.7")
        || !oid(&ctx->oids.fail_info_text, "1.3.6.1.5.5.7.24.1")) {
        scep_set_error(err, err_len, "cannot create SCEP attribute OIDs");
        goto err;
    }
    ctx->parse_libctx = OSSL_LIB_CTX_new();
    ctx->parse_null = ctx->parse_libctx != NULL ? OSSL_PROVIDER_load(ctx->parse_libctx, "null")
                                                : NULL;
    if (ctx->parse_null == NULL) {
        scep_set_error(err, err_len, "cannot create the parsing library context");
        goto err;
    }
    if (flags & SCEP_ALLOW_LEGACY) {
        /* Single DES lives in the legacy provider. Loading a provider turns off
           the implicit default one, so load that explicitly as well. */
        ctx->legacy = OSSL_PROVIDER_load(NULL, "legacy");
        ctx->deflt = OSSL_PROVIDER_load(NULL, "default");
        if (ctx->legacy == NULL || ctx->deflt == NULL) {
            scep_set_error(err, err_len, "cannot load the OpenSSL legacy provider");
            goto err;
        }
    }
    if (!scep_algorithms_init(ctx)) {
        scep_set_error(err, err_len, "cannot fetch the SHA-1 and SHA-256 digests");
        goto err;
    }
    ERR_clear_error();
    return ctx;
err:
    scep_ctx_free(ctx);
    return NULL;
}

static void keypair_clear(scep_keypair *kp)
{
    X509_free(kp->cert);
    EVP_PKEY_free(kp->key);
    scep_key_free(kp->owner);
    kp->cert = NULL;
    kp->key = NULL;
    kp->owner = NULL;
}

void scep_ctx_free(scep_ctx *ctx)
{
    size_t i;

    if (ctx == NULL)
        return;
    for (i = 0; i < ctx->n_recipients; i++)
        keypair_clear(&ctx->recipients[i]);
    keypair_clear(&ctx->signer);
    keypair_clear(&ctx->issuer);
    scep_algorithms_free(ctx);
    EVP_MD_free(ctx->issuer_md);
    X509_EXTENSION_free(ctx->issuer_akid);
    ASN1_OBJECT_free(ctx->oids.message_type);
    ASN1_OBJECT_free(ctx->oids.pki_status);
    ASN1_OBJECT_free(ctx->oids.fail_info);
    ASN1_OBJECT_free(ctx->oids.sender_nonce);
    ASN1_OBJECT_free(ctx->oids.recipient_nonce);
    ASN1_OBJECT_free(ctx->oids.transaction_id);
    ASN1_OBJECT_free(ctx->oids.fail_info_text);
    if (ctx->legacy != NULL)
        OSSL_PROVIDER_unload(ctx->legacy);
    if (ctx->deflt != NULL)
        OSSL_PROVIDER_unload(ctx->deflt);
    if (ctx->parse_null != NULL)
        OSSL_PROVIDER_unload(ctx->parse_null);
    OSSL_LIB_CTX_free(ctx->parse_libctx);
    free(ctx);
}

/* Whether priv signs what pub verifies. For a key in a token OpenSSL cannot
   compare the private half (an EC private key object does not even carry its
   public point), so the pair is proven by one signature instead. */
static int signs_for(EVP_PKEY *priv, EVP_PKEY *pub)
{
    static const unsigned char probe[] = "scep-fast: does this key belong to the certificate?";
    EVP_MD_CTX *s = EVP_MD_CTX_new();
    EVP_MD_CTX *v = EVP_MD_CTX_new();
    unsigned char *sig = NULL;
    size_t sig_len = 0;
    int ok = 0;

    if (s == NULL || v == NULL || pub == NULL
        || EVP_DigestSignInit_ex(s, NULL, "SHA256", NULL, NULL, priv, NULL) != 1
        || EVP_DigestSign(s, NULL, &sig_len, probe, sizeof(probe)) != 1)
        goto end;
    sig = OPENSSL_malloc(sig_len > 0 ? sig_len : 1);
    if (sig == NULL || EVP_DigestSign(s, sig, &sig_len, probe, sizeof(probe)) != 1)
        goto end;
    ok = EVP_DigestVerifyInit_ex(v, NULL, "SHA256", NULL, NULL, pub, NULL) == 1
         && EVP_DigestVerify(v, sig, sig_len, probe, sizeof(probe)) == 1;
end:
    OPENSSL_free(sig);
    EVP_MD_CTX_free(v);
    EVP_MD_CTX_free(s);
    return ok;
}

/* Parses a DER certificate, takes a private key (DER, or a key object whose
   key may live in a token) and checks that they belong together. Either way
   the keypair ends up holding one EVP_PKEY: the batch paths never ask where. */
static int load_keypair(scep_keypair *kp, const unsigned char *cert, size_t cert_len,
                        const unsigned char *key, size_t key_len, scep_key *owner,
                        char *err, size_t err_len)
{
    const unsigned char *p;
    X509 *x = NULL;
    EVP_PKEY *k = NULL;

    if (!scep_input_ok(cert, cert_len) || (owner == NULL && !scep_input_ok(key, key_len))) {
        scep_set_error(err, err_len, "empty or oversized certificate or key");
        return 0;
    }
    p = cert;
    x = d2i_X509(NULL, &p, (long)cert_len);
    if (x == NULL || p != cert + cert_len) {
        scep_set_error(err, err_len, "cannot parse the certificate (DER expected)");
        goto err;
    }
    if (owner != NULL) {
        k = scep_key_get0_pkey(owner);
        if (k == NULL || !EVP_PKEY_up_ref(k)) {
            k = NULL;
            scep_set_error(err, err_len, "the key object holds no key");
            goto err;
        }
    } else {
        p = key;
        k = d2i_AutoPrivateKey(NULL, &p, (long)key_len);
        if (k == NULL || p != key + key_len) {
            scep_set_error(err, err_len, "cannot parse the private key (DER expected)");
            goto err;
        }
    }
    if (owner != NULL ? !signs_for(k, X509_get0_pubkey(x)) : X509_check_private_key(x, k) != 1) {
        scep_set_error(err, err_len, "the private key does not match the certificate");
        goto err;
    }
    keypair_clear(kp);
    kp->cert = x;
    kp->key = k;
    kp->owner = scep_key_hold(owner);
    ERR_clear_error();
    return 1;
err:
    EVP_PKEY_free(k);
    X509_free(x);
    return 0;
}

static int add_recipient(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                         const unsigned char *key, size_t key_len, scep_key *owner,
                         char *err, size_t err_len)
{
    scep_keypair kp = {NULL, NULL, NULL};

    if (ctx->n_recipients >= SCEP_MAX_RECIPIENTS) {
        scep_set_error(err, err_len, "too many decryption keys");
        return 0;
    }
    if (!load_keypair(&kp, cert, cert_len, key, key_len, owner, err, err_len))
        return 0;
    if (EVP_PKEY_get_base_id(kp.key) != EVP_PKEY_RSA) {
        keypair_clear(&kp);
        scep_set_error(err, err_len, "a decryption key must be RSA (SCEP key transport)");
        return 0;
    }
    ctx->recipients[ctx->n_recipients++] = kp;
    return 1;
}

int scep_ctx_add_recipient(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                           const unsigned char *key, size_t key_len, char *err, size_t err_len)
{
    return add_recipient(ctx, cert, cert_len, key, key_len, NULL, err, err_len);
}

int scep_ctx_add_recipient_key(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                               scep_key *key, char *err, size_t err_len)
{
    if (key == NULL) {
        scep_set_error(err, err_len, "no key object");
        return 0;
    }
    return add_recipient(ctx, cert, cert_len, NULL, 0, key, err, err_len);
}

static int set_signer(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                      const unsigned char *key, size_t key_len, scep_key *owner,
                      char *err, size_t err_len)
{
    if (!load_keypair(&ctx->signer, cert, cert_len, key, key_len, owner, err, err_len))
        return 0;
    if (!scep_prepare_signer(ctx)) {
        scep_set_error(err, err_len, "cannot prepare the signer key for SHA-256 signatures");
        keypair_clear(&ctx->signer);
        return 0;
    }
    return 1;
}

int scep_ctx_set_signer(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                        const unsigned char *key, size_t key_len, char *err, size_t err_len)
{
    return set_signer(ctx, cert, cert_len, key, key_len, NULL, err, err_len);
}

int scep_ctx_set_signer_key(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                            scep_key *key, char *err, size_t err_len)
{
    if (key == NULL) {
        scep_set_error(err, err_len, "no key object");
        return 0;
    }
    return set_signer(ctx, cert, cert_len, NULL, 0, key, err, err_len);
}

/* authorityKeyIdentifier for certificates we issue: the CA's own key identifier. */
static X509_EXTENSION *make_akid(X509 *ca)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    const ASN1_OCTET_STRING *skid = X509_get0_subject_key_id(ca);
    AUTHORITY_KEYID *akid = AUTHORITY_KEYID_new();
    X509_EXTENSION *ext = NULL;

    if (akid == NULL)
        return NULL;
    if (skid != NULL) {
        akid->keyid = ASN1_OCTET_STRING_dup(skid);
    } else if (X509_pubkey_digest(ca, EVP_sha1(), md, &md_len)) {
        /* RFC 5280 section 4.2.1.2, method (1). */
        akid->keyid = ASN1_OCTET_STRING_new();
        if (akid->keyid != NULL && !ASN1_OCTET_STRING_set(akid->keyid, md, (int)md_len)) {
            ASN1_OCTET_STRING_free(akid->keyid);
            akid->keyid = NULL;
        }
    }
    if (akid->keyid != NULL)
        ext = X509V3_EXT_i2d(NID_authority_key_identifier, 0, akid);
    AUTHORITY_KEYID_free(akid);
    return ext;
}

static int set_issuer(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                      const unsigned char *key, size_t key_len, scep_key *owner,
                      char *err, size_t err_len)
{
    const char *md_name;
    EVP_PKEY *cert_key;

    if (!load_keypair(&ctx->issuer, cert, cert_len, key, key_len, owner, err, err_len))
        return 0;
    /* SHA-384 matches the strength of P-384; SHA-256 serves RSA and P-256. Read
       from the certificate: a token's EC private key need not know its size. */
    cert_key = X509_get0_pubkey(ctx->issuer.cert);
    md_name = cert_key != NULL && EVP_PKEY_get_base_id(cert_key) == EVP_PKEY_EC
                      && EVP_PKEY_get_bits(cert_key) >= 384
                  ? "SHA384"
                  : "SHA256";
    EVP_MD_free(ctx->issuer_md);
    X509_EXTENSION_free(ctx->issuer_akid);
    ctx->issuer_md = EVP_MD_fetch(NULL, md_name, NULL);
    ctx->issuer_akid = make_akid(ctx->issuer.cert);
    if (ctx->issuer_md == NULL || ctx->issuer_akid == NULL || !scep_prepare_issuer(ctx)) {
        scep_set_error(err, err_len, "cannot prepare the issuing CA");
        EVP_MD_CTX_free(ctx->issuer_sign);
        X509_EXTENSION_free(ctx->issuer_akid);
        EVP_MD_free(ctx->issuer_md);
        ctx->issuer_sign = NULL;
        ctx->issuer_akid = NULL;
        ctx->issuer_md = NULL;
        keypair_clear(&ctx->issuer);
        return 0;
    }
    return 1;
}

int scep_ctx_set_issuer(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                        const unsigned char *key, size_t key_len, char *err, size_t err_len)
{
    return set_issuer(ctx, cert, cert_len, key, key_len, NULL, err, err_len);
}

int scep_ctx_set_issuer_key(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                            scep_key *key, char *err, size_t err_len)
{
    if (key == NULL) {
        scep_set_error(err, err_len, "no key object");
        return 0;
    }
    return set_issuer(ctx, cert, cert_len, NULL, 0, key, err, err_len);
}
