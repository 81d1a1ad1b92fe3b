/*
 * fuzz_common.c: input reader, test keys and contexts for the harnesses.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/provider.h>
#include <openssl/x509v3.h>

#include "fuzz_common.h"

#ifndef SCEP_FUZZ_TESTS
#error "SCEP_FUZZ_TESTS (the tests directory) must be defined by the build"
#endif

/* ---- the input reader --------------------------------------------------- */

uint8_t fuzz_u8(fuzz_input *in)
{
    uint8_t v = 0;

    if (in->n > 0) {
        v = in->p[0];
        in->p++;
        in->n--;
    }
    return v;
}

uint16_t fuzz_u16(fuzz_input *in)
{
    uint16_t hi = fuzz_u8(in);

    return (uint16_t)(hi << 8 | fuzz_u8(in));
}

uint32_t fuzz_u32(fuzz_input *in)
{
    uint32_t hi = fuzz_u16(in);

    return hi << 16 | fuzz_u16(in);
}

int64_t fuzz_i64(fuzz_input *in)
{
    uint64_t hi = fuzz_u32(in);

    return (int64_t)(hi << 32 | fuzz_u32(in));
}

static scep_buf take(fuzz_input *in, size_t want)
{
    scep_buf b;

    if (want > in->n)
        want = in->n;
    b.data = in->p;
    b.len = want;
    in->p += want;
    in->n -= want;
    return b;
}

scep_buf fuzz_bytes8(fuzz_input *in)
{
    return take(in, fuzz_u8(in));
}

scep_buf fuzz_bytes16(fuzz_input *in)
{
    return take(in, fuzz_u16(in));
}

scep_buf fuzz_rest(fuzz_input *in)
{
    return take(in, in->n);
}

/* ---- keys and certificates -------------------------------------------- */

void fuzz_die(const char *what)
{
    fprintf(stderr, "fuzz set-up: %s\n", what);
    ERR_print_errors_fp(stderr);
    abort();
}

unsigned char *fuzz_read_file(const char *name, size_t *len)
{
    const char *dir = getenv("SCEP_FUZZ_TESTS") != NULL ? getenv("SCEP_FUZZ_TESTS")
                                                           : SCEP_FUZZ_TESTS;
    char path[4096];
    unsigned char *buf = NULL;
    long size;
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "rb");
    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0
        || fseek(f, 0, SEEK_SET) != 0 || (buf = malloc((size_t)size + 1)) == NULL
        || fread(buf, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "fuzz set-up: cannot read %s\n", path);
        abort();
    }
    fclose(f);
    buf[size] = 0;
    *len = (size_t)size;
    return buf;
}

X509 *fuzz_file_cert(const char *name)
{
    size_t len;
    unsigned char *pem = fuzz_read_file(name, &len);
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    X509 *x = bio != NULL ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;

    BIO_free(bio);
    free(pem);
    if (x == NULL)
        fuzz_die(name);
    return x;
}

EVP_PKEY *fuzz_file_key(const char *name)
{
    size_t len;
    unsigned char *pem = fuzz_read_file(name, &len);
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    EVP_PKEY *k = bio != NULL ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;

    BIO_free(bio);
    free(pem);
    if (k == NULL)
        fuzz_die(name);
    return k;
}

EVP_PKEY *fuzz_ec_key(const char *curve)
{
    EVP_PKEY *k = EVP_EC_gen(curve);

    if (k == NULL)
        fuzz_die("cannot generate an EC key");
    return k;
}

static void add_ext(X509 *x, int nid, const char *value)
{
    X509V3_CTX v3;
    X509_EXTENSION *ext;

    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    if (ext == NULL || !X509_add_ext(x, ext, -1))
        fuzz_die("cannot add a certificate extension");
    X509_EXTENSION_free(ext);
}

X509 *fuzz_self_signed(EVP_PKEY *key, const char *cn)
{
    X509 *x = X509_new();
    X509_NAME *name = X509_NAME_new();

    if (x == NULL || name == NULL || !X509_set_version(x, X509_VERSION_3)
        || !ASN1_INTEGER_set(X509_get_serialNumber(x), 1)
        || !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1,
                                       -1, 0)
        || !X509_set_subject_name(x, name) || !X509_set_issuer_name(x, name)
        || X509_gmtime_adj(X509_getm_notBefore(x), -3600) == NULL
        || X509_gmtime_adj(X509_getm_notAfter(x), 3600L * 24 * 365) == NULL
        || !X509_set_pubkey(x, key))
        fuzz_die("cannot build a certificate");
    add_ext(x, NID_basic_constraints, "critical,CA:TRUE");
    add_ext(x, NID_subject_key_identifier, "hash");
    if (X509_sign(x, key, EVP_sha256()) <= 0)
        fuzz_die("cannot sign a certificate");
    X509_NAME_free(name);
    return x;
}

scep_ctx *fuzz_ctx_new(int flags)
{
    char err[SCEP_ERROR_TEXT_LEN];
    scep_ctx *ctx = scep_ctx_new(flags, err, sizeof(err));

    if (ctx == NULL)
        fuzz_die(err);
    return ctx;
}

void fuzz_ctx_set(scep_ctx *ctx, int slot, X509 *cert, EVP_PKEY *key)
{
    char err[SCEP_ERROR_TEXT_LEN];
    unsigned char *cert_der = NULL, *key_der = NULL;
    int cert_len = i2d_X509(cert, &cert_der);
    int key_len = i2d_PrivateKey(key, &key_der);
    int ok = 0;

    if (cert_len > 0 && key_len > 0) {
        if (slot == FUZZ_RECIPIENT)
            ok = scep_ctx_add_recipient(ctx, cert_der, (size_t)cert_len, key_der, (size_t)key_len,
                                        err, sizeof(err));
        else if (slot == FUZZ_SIGNER)
            ok = scep_ctx_set_signer(ctx, cert_der, (size_t)cert_len, key_der, (size_t)key_len,
                                     err, sizeof(err));
        else
            ok = scep_ctx_set_issuer(ctx, cert_der, (size_t)cert_len, key_der, (size_t)key_len,
                                     err, sizeof(err));
    } else {
        snprintf(err, sizeof(err), "cannot encode a certificate or key");
    }
    OPENSSL_free(cert_der);
    OPENSSL_free(key_der);
    if (!ok)
        fuzz_die(err);
}

OSSL_LIB_CTX *fuzz_parse_libctx(void)
{
    OSSL_LIB_CTX *libctx = OSSL_LIB_CTX_new();

    if (libctx == NULL || OSSL_PROVIDER_load(libctx, "null") == NULL)
        fuzz_die("cannot create a provider-less library context");
    return libctx;
}

int fuzz_one_tlv(const unsigned char *der, size_t len, int tag)
{
    const unsigned char *p = der;
    long content_len = 0;
    int got_tag = 0, xclass = 0, ret;

    if (der == NULL || len == 0 || len > 0x7fffffff)
        return 0;
    ret = ASN1_get_object(&p, &content_len, &got_tag, &xclass, (long)len);
    ERR_clear_error();
    return !(ret & 0x80) && got_tag == tag && xclass == V_ASN1_UNIVERSAL
           && p + content_len == der + len;
}

void fuzz_report(int status, const char *error)
{
    static int verbose = -1;
    const char *env;

    if (verbose < 0) {
        env = getenv("SCEP_FUZZ_VERBOSE");
        verbose = env != NULL && strcmp(env, "1") == 0;
    }
    if (verbose)
        fprintf(stderr, "status %d: %s\n", status, error);
}
