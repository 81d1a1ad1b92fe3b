/*
 * internal.h: what the C files of the core share and Python never sees.
 */
#ifndef SCEP_INTERNAL_H
#define SCEP_INTERNAL_H

#include <openssl/asn1.h>
#include <openssl/evp.h>
#include <openssl/provider.h>
#include <openssl/x509.h>

#include "scep_native.h"

#define SCEP_MAX_RECIPIENTS 8
/* Largest DER object we accept anywhere; far above any real SCEP message. */
#define SCEP_MAX_INPUT (16L * 1024 * 1024)

typedef struct {
    X509 *cert;
    EVP_PKEY *key;
} scep_keypair;

/* What an unwrap result keeps for wrap and issue (scep_unwrap_result.priv). */
typedef struct {
    X509 *signer;
    EVP_PKEY *signer_key;
    X509_REQ *csr;
    EVP_PKEY *csr_key;    /* NULL for key types the core cannot build */
} scep_request_state;

/* SCEP signed attribute types (RFC 8894 section 3.2.1) and failInfoText (section 3.2.1.4). */
typedef struct {
    ASN1_OBJECT *message_type;
    ASN1_OBJECT *pki_status;
    ASN1_OBJECT *fail_info;
    ASN1_OBJECT *sender_nonce;
    ASN1_OBJECT *recipient_nonce;
    ASN1_OBJECT *transaction_id;
    ASN1_OBJECT *fail_info_text;
} scep_oids;

struct scep_ctx {
    int flags;
    scep_keypair recipients[SCEP_MAX_RECIPIENTS];
    size_t n_recipients;
    scep_keypair signer;
    scep_keypair issuer;
    EVP_MD *issuer_md;                /* fetched once: SHA-256, or SHA-384 for P-384 and up */
    X509_EXTENSION *issuer_akid;      /* authorityKeyIdentifier added to every certificate */
    scep_oids oids;
    OSSL_LIB_CTX *parse_libctx;       /* no providers: parses without decoding keys (pubkey.c) */
    OSSL_PROVIDER *parse_null;
    OSSL_PROVIDER *legacy;            /* loaded only with SCEP_ALLOW_LEGACY */
    OSSL_PROVIDER *deflt;
};

/* errors.c: writes "what: reasons from OpenSSL's queue" into buf and empties the queue. */
void scep_set_error(char *buf, size_t len, const char *what);

/* bytes.c */
int scep_bytes_set(scep_bytes *b, const unsigned char *data, size_t len);
void scep_bytes_clear(scep_bytes *b);
int scep_input_ok(const unsigned char *data, size_t len);

/* policy.c: algorithm policy of RFC 8894 section 3.5.2 plus the context flags. */
int scep_digest_allowed(const scep_ctx *ctx, int nid);
int scep_cipher_allowed(const scep_ctx *ctx, int nid);
/* The digest that signs a reply to a request that used request_nid. */
int scep_reply_digest(const scep_ctx *ctx, int request_nid);

/* der.c: the degenerate SignedData, in the caller's certificate order. */
int scep_encode_certs_only(const scep_buf *certs, const scep_buf *crls, scep_bytes *out);

/* der.c: DER writing. scep_der_tlv wraps the concatenated parts in one tag. */
unsigned char *scep_der_put_header(unsigned char *p, unsigned char tag, size_t content_len);
size_t scep_der_tlv_size(size_t content_len);
int scep_der_tlv(unsigned char tag, const scep_buf *parts, size_t nparts, scep_bytes *out);

/* der.c: finds the content-encryption algorithm of a DER EnvelopedData ContentInfo. */
int scep_envelope_cipher_nid(const unsigned char *der, size_t len);

/* pubkey.c: keys and requests without OpenSSL 3.0's costly decoder framework. */
EVP_PKEY *scep_pubkey_from_spki(const X509_PUBKEY *spki);
int scep_spki_key_nid(const X509_PUBKEY *spki);
int scep_spki_curve_nid(const X509_PUBKEY *spki);
/* Whether an RSAPublicKey (the subjectPublicKey bits) is encoded in DER. */
int scep_rsa_public_key_is_der(const unsigned char *der, int len);
/* Parses a DER PKCS#10 request; *key receives its public key, or NULL if unsupported. */
X509_REQ *scep_parse_csr(const scep_ctx *ctx, const unsigned char *der, size_t len, EVP_PKEY **key);

#endif
