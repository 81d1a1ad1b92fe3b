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
#define SCEP_N_DIGESTS 6   /* SHA-1, SHA-224, SHA-256, SHA-384, SHA-512, MD5 */
#define SCEP_N_CIPHERS 5   /* AES-128/192/256-CBC, DES-EDE3-CBC, DES-CBC */
/* Longest senderNonce we answer with one of the same length. */
#define SCEP_MAX_NONCE 64
/* Largest DER object we accept anywhere; far above any real SCEP message. */
#define SCEP_MAX_INPUT (16L * 1024 * 1024)

typedef struct {
    X509 *cert;
    EVP_PKEY *key;
    scep_key *owner;    /* the key object behind key (keeps a token session), or NULL */
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
    EVP_MD_CTX *issuer_sign;          /* template: issuer key with issuer_md (algorithms.c) */
    EVP_MD *md[SCEP_N_DIGESTS];       /* fetched once (algorithms.c) */
    EVP_CIPHER *cipher[SCEP_N_CIPHERS];
    EVP_MD_CTX *signer_sign[SCEP_N_DIGESTS]; /* templates: signer key with each digest */
    scep_bytes signer_cert_der;       /* the RA certificate, for every CertRep */
    scep_bytes signer_sid_der;        /* its IssuerAndSerialNumber */
    X509_EXTENSION *issuer_akid;      /* authorityKeyIdentifier added to every certificate */
    scep_oids oids;
    OSSL_LIB_CTX *parse_libctx;       /* no providers: parses without decoding keys (pubkey.c) */
    OSSL_PROVIDER *parse_null;
    OSSL_PROVIDER *legacy;            /* loaded only with SCEP_ALLOW_LEGACY */
    OSSL_PROVIDER *deflt;
};

/* algorithms.c: what is fetched and prepared once; NULL when unavailable. */
int scep_algorithms_init(scep_ctx *ctx);
void scep_algorithms_free(scep_ctx *ctx);
const EVP_MD *scep_md(const scep_ctx *ctx, int nid);
const EVP_CIPHER *scep_cipher(const scep_ctx *ctx, int nid);
int scep_prepare_signer(scep_ctx *ctx);
int scep_prepare_issuer(scep_ctx *ctx);
/* A fresh signing context copied from a template, for one signature. */
EVP_MD_CTX *scep_sign_ctx_new(const EVP_MD_CTX *tmpl);
EVP_MD_CTX *scep_signer_sign_ctx_new(const scep_ctx *ctx, int md_nid);

/* certrep_sign.c: the CertRep SignedData around content (empty for PENDING and FAILURE). */
int scep_sign_certrep(const scep_ctx *ctx, const scep_wrap_item *item, int md_nid,
                      const scep_bytes *content, scep_bytes *out);

/* keystore.c: a key object's EVP_PKEY, its public half (the token's public key
   object when there is one), and another reference to the object. */
EVP_PKEY *scep_key_get0_pkey(const scep_key *k);
EVP_PKEY *scep_key_get0_public(const scep_key *k);
scep_key *scep_key_hold(scep_key *k);
/* keystore.c: the content-encryption key of a KeyTransRecipientInfo: cek_len
   bytes, the transported key when its padding (PKCS#1 v1.5, or OAEP when
   oaep_md is set) is right and its length cek_len, else random bytes. One
   raw RSA operation with pkey, the same whatever the padding. */
void scep_rsa_unwrap_cek(EVP_PKEY *pkey, const EVP_MD *oaep_md, const EVP_MD *oaep_mgf1_md,
                         const unsigned char *ek, size_t ek_len, unsigned char *cek,
                         size_t cek_len);

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
/* der.c: in the same DER, the encryptedKey of the first KeyTransRecipientInfo
   whose rid encodes as rid, and the EncryptedContentInfo TLV; 0 if none. */
int scep_envelope_ktri(const unsigned char *der, size_t len, const scep_buf *rid,
                       scep_buf *encrypted_key, scep_buf *encrypted_content_info);

/* pubkey.c: keys and requests without OpenSSL 3.0's costly decoder framework. */
EVP_PKEY *scep_pubkey_from_spki(const X509_PUBKEY *spki);
int scep_spki_key_nid(const X509_PUBKEY *spki);
int scep_spki_curve_nid(const X509_PUBKEY *spki);
/* Whether an RSAPublicKey (the subjectPublicKey bits) is encoded in DER. */
int scep_rsa_public_key_is_der(const unsigned char *der, int len);
/* Parses a DER PKCS#10 request; *key receives its public key, or NULL if unsupported. */
X509_REQ *scep_parse_csr(const scep_ctx *ctx, const unsigned char *der, size_t len, EVP_PKEY **key);
/* The same, sharing known_key (up-referenced) when the request's key is known_spki. */
X509_REQ *scep_parse_csr_reusing(const scep_ctx *ctx, const unsigned char *der, size_t len,
                                 const X509_PUBKEY *known_spki, EVP_PKEY *known_key,
                                 EVP_PKEY **key);

#endif
