/*
 * keystore.c: private keys by reference, from a PKCS#11 token through libp11's
 * "pkcs11" ENGINE, or from DER, behind one opaque scep_key.
 *
 * A key loaded here is an EVP_PKEY like any other: the context takes it where
 * it takes a key parsed from a file, so the batch paths (decrypt, issue, sign
 * the CertRep) do not know where the key lives.
 *
 * The ENGINE API is deprecated in OpenSSL 3, and the rest of the core is built
 * without deprecated declarations. Debian 12 ships libp11's engine but no
 * PKCS#11 provider, so this one file, and only this one, asks for them back.
 * It also holds the key-transport unwrap (scep_rsa_unwrap_cek), which needs
 * OpenSSL's constant-time RSA padding checks, deprecated in OpenSSL 3 too.
 */
#undef OPENSSL_NO_DEPRECATED
#define OPENSSL_SUPPRESS_DEPRECATED 1

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/engine.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "internal.h"

/* Longest module path, PIN and URI we pass on; far above any real one. */
#define KEYSTORE_MAX_TEXT 4096

struct scep_pkcs11 {
    ENGINE *engine;      /* functional reference */
    char *pin;           /* given again before each load: libp11 forgets it after a failure */
};

struct scep_key {
    EVP_PKEY *pkey;
    EVP_PKEY *pub;       /* the token's public key object, or NULL: pkey has it all */
    ENGINE *engine;      /* functional reference while a token key lives; NULL from DER */
    atomic_int refs;
};

static int text_ok(const char *s)
{
    return s != NULL && s[0] != '\0' && strlen(s) < KEYSTORE_MAX_TEXT;
}

scep_pkcs11 *scep_pkcs11_open(const char *module_path, const char *pin, char *err, size_t err_len)
{
    scep_pkcs11 *p = NULL;
    ENGINE *e = NULL;
    int initialised = 0;

    if (!text_ok(module_path) || !text_ok(pin)) {
        scep_set_error(err, err_len, "a PKCS#11 module path and a PIN are needed");
        return NULL;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL) {
        scep_set_error(err, err_len, "out of memory");
        return NULL;
    }
    /* Not found among the built-in engines, ENGINE_by_id loads pkcs11.so
       from OpenSSL's engines directory (Debian: libengine-pkcs11-openssl). */
    e = ENGINE_by_id("pkcs11");
    if (e == NULL) {
        scep_set_error(err, err_len,
                       "cannot load OpenSSL's pkcs11 engine (libp11, Debian package "
                       "libengine-pkcs11-openssl)");
        goto err;
    }
    if (!ENGINE_ctrl_cmd_string(e, "MODULE_PATH", module_path, 0)) {
        scep_set_error(err, err_len, "the pkcs11 engine refused the module path");
        goto err;
    }
    if (!ENGINE_init(e)) {
        scep_set_error(err, err_len, "cannot initialise the pkcs11 engine");
        goto err;
    }
    initialised = 1;
    p->pin = OPENSSL_strdup(pin);
    if (p->pin == NULL) {
        scep_set_error(err, err_len, "out of memory");
        goto err;
    }
    /* Keep the functional reference only. */
    ENGINE_free(e);
    p->engine = e;
    ERR_clear_error();
    return p;
err:
    if (initialised)
        ENGINE_finish(e);
    ENGINE_free(e);
    free(p);
    return NULL;
}

void scep_pkcs11_free(scep_pkcs11 *p)
{
    if (p == NULL)
        return;
    ENGINE_finish(p->engine);
    OPENSSL_clear_free(p->pin, strlen(p->pin));
    free(p);
}

static scep_key *key_new(EVP_PKEY *pkey, ENGINE *engine)
{
    scep_key *k = calloc(1, sizeof(*k));

    if (k == NULL)
        return NULL;
    k->pkey = pkey;
    k->engine = engine;
    atomic_init(&k->refs, 1);
    return k;
}

scep_key *scep_pkcs11_load_key(scep_pkcs11 *p, const char *uri, const char *public_uri,
                               char *err, size_t err_len)
{
    EVP_PKEY *pkey = NULL;
    EVP_PKEY *pub = NULL;
    scep_key *k = NULL;
    int held = 0;

    if (p == NULL || !text_ok(uri) || strncmp(uri, "pkcs11:", 7) != 0
        || (public_uri != NULL && (!text_ok(public_uri) || strncmp(public_uri, "pkcs11:", 7)))) {
        scep_set_error(err, err_len, "a pkcs11: URI (RFC 7512) is needed");
        return NULL;
    }
    /* libp11 erases its copy of the PIN when a login fails (even for a reason
       other than the PIN, such as a token busy with another process), so a
       later try would prompt for one: give it again each time. The caller
       stops trying after the token refused the PIN itself. */
    if (!ENGINE_ctrl_cmd_string(p->engine, "PIN", p->pin, 0)) {
        scep_set_error(err, err_len, "the pkcs11 engine refused the PIN");
        return NULL;
    }
    pkey = ENGINE_load_private_key(p->engine, uri, NULL, NULL);
    if (pkey == NULL) {
        scep_set_error(err, err_len, "cannot load the private key from the token");
        goto err;
    }
    if (public_uri != NULL) {
        /* A token's EC private key object carries no public point (PKCS#11
           keeps CKA_EC_POINT on the public key object): load that one too.
           Optional: an RSA private key object has its modulus. */
        pub = ENGINE_load_public_key(p->engine, public_uri, NULL, NULL);
        ERR_clear_error();
    }
    /* The key lives as long as its session: it holds the engine initialised. */
    if (!ENGINE_init(p->engine)) {
        scep_set_error(err, err_len, "cannot hold the pkcs11 engine");
        goto err;
    }
    held = 1;
    k = key_new(pkey, p->engine);
    if (k == NULL) {
        scep_set_error(err, err_len, "out of memory");
        goto err;
    }
    k->pub = pub;
    ERR_clear_error();
    return k;
err:
    if (held)
        ENGINE_finish(p->engine);
    EVP_PKEY_free(pub);
    EVP_PKEY_free(pkey);
    return NULL;
}

scep_key *scep_key_from_der(const unsigned char *der, size_t len, char *err, size_t err_len)
{
    const unsigned char *p = der;
    EVP_PKEY *pkey = NULL;
    scep_key *k = NULL;

    if (!scep_input_ok(der, len)) {
        scep_set_error(err, err_len, "empty or oversized private key");
        return NULL;
    }
    pkey = d2i_AutoPrivateKey(NULL, &p, (long)len);
    if (pkey == NULL || p != der + len) {
        scep_set_error(err, err_len, "cannot parse the private key (DER expected)");
        EVP_PKEY_free(pkey);
        return NULL;
    }
    k = key_new(pkey, NULL);
    if (k == NULL) {
        scep_set_error(err, err_len, "out of memory");
        EVP_PKEY_free(pkey);
        return NULL;
    }
    ERR_clear_error();
    return k;
}

scep_key *scep_key_hold(scep_key *k)
{
    if (k != NULL)
        atomic_fetch_add(&k->refs, 1);
    return k;
}

EVP_PKEY *scep_key_get0_pkey(const scep_key *k)
{
    return k != NULL ? k->pkey : NULL;
}

EVP_PKEY *scep_key_get0_public(const scep_key *k)
{
    if (k == NULL)
        return NULL;
    return k->pub != NULL ? k->pub : k->pkey;
}

void scep_key_free(scep_key *k)
{
    if (k == NULL || atomic_fetch_sub(&k->refs, 1) != 1)
        return;
    EVP_PKEY_free(k->pub);
    EVP_PKEY_free(k->pkey);
    if (k->engine != NULL)
        ENGINE_finish(k->engine);
    free(k);
}

int scep_key_public_der(const scep_key *k, scep_bytes *out, char *err, size_t err_len)
{
    unsigned char *der = NULL;
    int len;
    int ok;

    if (k == NULL || out == NULL) {
        scep_set_error(err, err_len, "no key");
        return 0;
    }
    len = i2d_PUBKEY(scep_key_get0_public(k), &der);
    if (len <= 0) {
        scep_set_error(err, err_len, "cannot encode the public key");
        return 0;
    }
    ok = scep_bytes_set(out, der, (size_t)len);
    OPENSSL_free(der);
    if (!ok) {
        scep_set_error(err, err_len, "out of memory");
        return 0;
    }
    ERR_clear_error();
    return 1;
}

int scep_key_sign(const scep_key *k, const char *md_name, scep_buf data, scep_bytes *out,
                  char *err, size_t err_len)
{
    EVP_MD *md = NULL;
    EVP_MD_CTX *mctx = NULL;
    unsigned char *sig = NULL;
    size_t sig_len = 0;
    int ok = 0;

    if (k == NULL || out == NULL || !text_ok(md_name) || !scep_input_ok(data.data, data.len)) {
        scep_set_error(err, err_len, "a key, a digest name and data to sign are needed");
        return 0;
    }
    /* Fetched first: for an engine key, EVP_DigestSignInit_ex would take an
       unknown name for the key type's default digest instead of failing. */
    md = EVP_MD_fetch(NULL, md_name, NULL);
    if (md == NULL) {
        scep_set_error(err, err_len, "unknown digest");
        goto end;
    }
    mctx = EVP_MD_CTX_new();
    if (mctx == NULL
        || EVP_DigestSignInit_ex(mctx, NULL, EVP_MD_get0_name(md), NULL, NULL, k->pkey, NULL) != 1
        || EVP_DigestSign(mctx, NULL, &sig_len, data.data, data.len) != 1) {
        scep_set_error(err, err_len, "cannot prepare the signature");
        goto end;
    }
    sig = OPENSSL_malloc(sig_len > 0 ? sig_len : 1);
    if (sig == NULL) {
        scep_set_error(err, err_len, "out of memory");
        goto end;
    }
    if (EVP_DigestSign(mctx, sig, &sig_len, data.data, data.len) != 1) {
        scep_set_error(err, err_len, "the key did not sign");
        goto end;
    }
    if (!scep_bytes_set(out, sig, sig_len)) {
        scep_set_error(err, err_len, "out of memory");
        goto end;
    }
    ERR_clear_error();
    ok = 1;
end:
    OPENSSL_free(sig);
    EVP_MD_CTX_free(mctx);
    EVP_MD_free(md);
    return ok;
}

/* All ones when a == b, else zero, without a branch on either. */
static unsigned int ct_eq_mask(unsigned int a, unsigned int b)
{
    unsigned int x = a ^ b;

    return ((x | (0u - x)) >> (sizeof(x) * 8 - 1)) - 1u;
}

/*
 * libp11's engine decrypts PKCS#1 v1.5 and OAEP in the token (CKM_RSA_PKCS,
 * CKM_RSA_PKCS_OAEP) and, when the token refuses the padding, tries again
 * through OpenSSL's RSA method, which calls the token a second time: a wrong
 * padding costs two token operations, a right one one. Here the token (or
 * the provider, for a key from a file) does raw RSA only (RSA_NO_PADDING,
 * CKM_RSA_X_509): one operation whatever the padding; the padding is then
 * removed by OpenSSL's constant-time checks, and a wrong padding or length
 * yields random bytes in place of the key, as OpenSSL's CMS does (RFC 3218
 * section 2.3.2): the content then fails to decrypt like a damaged one.
 */
void scep_rsa_unwrap_cek(EVP_PKEY *pkey, const EVP_MD *oaep_md, const EVP_MD *oaep_mgf1_md,
                         const unsigned char *ek, size_t ek_len, unsigned char *cek,
                         size_t cek_len)
{
    EVP_PKEY_CTX *pctx = NULL;
    unsigned char *raw = NULL, *em = NULL, *msg = NULL;
    int k = EVP_PKEY_get_size(pkey), decoded = -1;
    size_t raw_len, i;
    unsigned int good;

    /* The random key first: on every path, whatever comes later. */
    if (RAND_priv_bytes(cek, (int)cek_len) != 1)
        memset(cek, 0, cek_len); /* still no key of the sender's */
    if (k <= 0 || cek_len == 0 || ek_len == 0)
        goto end;
    raw_len = (size_t)k;
    raw = OPENSSL_zalloc((size_t)k);
    em = OPENSSL_zalloc((size_t)k);
    msg = OPENSSL_zalloc((size_t)k);
    pctx = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL);
    if (raw == NULL || em == NULL || msg == NULL || pctx == NULL
        || EVP_PKEY_decrypt_init(pctx) <= 0
        || EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_NO_PADDING) <= 0
        || EVP_PKEY_decrypt(pctx, raw, &raw_len, ek, ek_len) <= 0 || raw_len > (size_t)k)
        goto end;
    /* The encoded message is k bytes; a token may leave out leading zeros. */
    memcpy(em + ((size_t)k - raw_len), raw, raw_len);
    ERR_set_mark();
    if (oaep_md != NULL)
        decoded = RSA_padding_check_PKCS1_OAEP_mgf1(msg, k, em, k, k, NULL, 0, oaep_md,
                                                    oaep_mgf1_md);
    else
        decoded = RSA_padding_check_PKCS1_type_2(msg, k, em, k, k);
    /* Both checks leave an error (cleared or not) on either outcome. */
    ERR_pop_to_mark();
end:
    good = ct_eq_mask((unsigned int)decoded, (unsigned int)cek_len);
    if (msg != NULL) {
        for (i = 0; i < cek_len && i < (size_t)k; i++)
            cek[i] = (unsigned char)((msg[i] & good) | (cek[i] & ~good));
    }
    EVP_PKEY_CTX_free(pctx);
    OPENSSL_clear_free(msg, k > 0 ? (size_t)k : 0);
    OPENSSL_clear_free(em, k > 0 ? (size_t)k : 0);
    OPENSSL_clear_free(raw, k > 0 ? (size_t)k : 0);
    ERR_clear_error();
}
