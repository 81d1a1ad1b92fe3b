/*
 * algorithms.c: digests, ciphers and signing contexts fetched once per context.
 *
 * OpenSSL 3.0 fetches an algorithm from its provider whenever it is named by
 * a legacy handle (EVP_sha256(), EVP_get_digestbynid) and builds a new
 * signature context, with more fetches, for every signing key use. Doing that
 * once here, while the context is still private to its creator, leaves the
 * batch calls only to copy what is prepared. Copying reads the template
 * through const pointers and takes references atomically, so the templates
 * may be copied by any number of threads at once.
 */
#include <openssl/err.h>
#include <openssl/objects.h>

#include "internal.h"

/* The digests policy.c may allow, in the order of scep_ctx.md. */
static const int digest_nids[SCEP_N_DIGESTS] = {NID_sha1,   NID_sha224, NID_sha256,
                                                NID_sha384, NID_sha512, NID_md5};
/* The content ciphers policy.c may allow, in the order of scep_ctx.cipher. */
static const int cipher_nids[SCEP_N_CIPHERS] = {NID_aes_128_cbc, NID_aes_192_cbc, NID_aes_256_cbc,
                                                NID_des_ede3_cbc, NID_des_cbc};

static int digest_index(int nid)
{
    int i;

    for (i = 0; i < SCEP_N_DIGESTS; i++) {
        if (digest_nids[i] == nid)
            return i;
    }
    return -1;
}

int scep_algorithms_init(scep_ctx *ctx)
{
    int i;

    /* An algorithm missing from the loaded providers (single DES without the
       legacy provider, MD5 under a FIPS configuration) stays NULL; its use then
       fails as unsupported, as it would have without the cache. */
    ERR_set_mark();
    for (i = 0; i < SCEP_N_DIGESTS; i++)
        ctx->md[i] = EVP_MD_fetch(NULL, OBJ_nid2sn(digest_nids[i]), NULL);
    for (i = 0; i < SCEP_N_CIPHERS; i++)
        ctx->cipher[i] = EVP_CIPHER_fetch(NULL, OBJ_nid2sn(cipher_nids[i]), NULL);
    ERR_pop_to_mark();
    return ctx->md[digest_index(NID_sha1)] != NULL && ctx->md[digest_index(NID_sha256)] != NULL;
}

void scep_algorithms_free(scep_ctx *ctx)
{
    int i;

    for (i = 0; i < SCEP_N_DIGESTS; i++) {
        EVP_MD_CTX_free(ctx->signer_sign[i]);
        EVP_MD_free(ctx->md[i]);
        ctx->signer_sign[i] = NULL;
        ctx->md[i] = NULL;
    }
    for (i = 0; i < SCEP_N_CIPHERS; i++) {
        EVP_CIPHER_free(ctx->cipher[i]);
        ctx->cipher[i] = NULL;
    }
    EVP_MD_CTX_free(ctx->issuer_sign);
    ctx->issuer_sign = NULL;
    scep_bytes_clear(&ctx->signer_cert_der);
    scep_bytes_clear(&ctx->signer_sid_der);
}

const EVP_MD *scep_md(const scep_ctx *ctx, int nid)
{
    int i = digest_index(nid);

    return i >= 0 ? ctx->md[i] : NULL;
}

const EVP_CIPHER *scep_cipher(const scep_ctx *ctx, int nid)
{
    int i;

    for (i = 0; i < SCEP_N_CIPHERS; i++) {
        if (cipher_nids[i] == nid)
            return ctx->cipher[i];
    }
    return NULL;
}

/* A signing context for key and md, initialised and never updated: a template. */
static EVP_MD_CTX *sign_template(EVP_PKEY *key, const EVP_MD *md)
{
    EVP_MD_CTX *t = EVP_MD_CTX_new();

    if (t == NULL
        || EVP_DigestSignInit_ex(t, NULL, EVP_MD_get0_name(md), NULL, NULL, key, NULL) != 1) {
        EVP_MD_CTX_free(t);
        return NULL;
    }
    return t;
}

/* The RA certificate and its IssuerAndSerialNumber (RFC 5652 section 10.2.4), in DER. */
static int encode_signer(scep_ctx *ctx)
{
    unsigned char *cert = NULL, *issuer = NULL, *serial = NULL;
    int cert_len = i2d_X509(ctx->signer.cert, &cert);
    int issuer_len = i2d_X509_NAME(X509_get_issuer_name(ctx->signer.cert), &issuer);
    int serial_len = i2d_ASN1_INTEGER(X509_get0_serialNumber(ctx->signer.cert), &serial);
    int ok = cert_len > 0 && issuer_len > 0 && serial_len > 0
             && scep_bytes_set(&ctx->signer_cert_der, cert, (size_t)cert_len);

    if (ok) {
        scep_buf parts[] = {{issuer, (size_t)issuer_len}, {serial, (size_t)serial_len}};

        ok = scep_der_tlv(V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED, parts, 2, &ctx->signer_sid_der);
    }
    OPENSSL_free(serial);
    OPENSSL_free(issuer);
    OPENSSL_free(cert);
    return ok;
}

int scep_prepare_signer(scep_ctx *ctx)
{
    int i;

    if (!encode_signer(ctx))
        return 0;

    /* A key that refuses a digest (MD5 with ECDSA) gets no template for it;
       scep_sign_ctx_new then reports the failure where the digest is used. */
    ERR_set_mark();
    for (i = 0; i < SCEP_N_DIGESTS; i++) {
        EVP_MD_CTX_free(ctx->signer_sign[i]);
        ctx->signer_sign[i] =
            ctx->md[i] != NULL ? sign_template(ctx->signer.key, ctx->md[i]) : NULL;
    }
    ERR_pop_to_mark();
    return ctx->signer_sign[digest_index(NID_sha256)] != NULL;
}

int scep_prepare_issuer(scep_ctx *ctx)
{
    EVP_MD_CTX_free(ctx->issuer_sign);
    ctx->issuer_sign = sign_template(ctx->issuer.key, ctx->issuer_md);
    return ctx->issuer_sign != NULL;
}

EVP_MD_CTX *scep_sign_ctx_new(const EVP_MD_CTX *tmpl)
{
    EVP_MD_CTX *mctx = tmpl != NULL ? EVP_MD_CTX_new() : NULL;

    if (mctx == NULL || !EVP_MD_CTX_copy_ex(mctx, tmpl)) {
        EVP_MD_CTX_free(mctx);
        return NULL;
    }
    /* Used once: lets EVP_DigestSignFinal sign in place instead of on yet
       another copy of the signature context. */
    EVP_MD_CTX_set_flags(mctx, EVP_MD_CTX_FLAG_FINALISE);
    return mctx;
}

EVP_MD_CTX *scep_signer_sign_ctx_new(const scep_ctx *ctx, int md_nid)
{
    int i = digest_index(md_nid);

    return i >= 0 ? scep_sign_ctx_new(ctx->signer_sign[i]) : NULL;
}
