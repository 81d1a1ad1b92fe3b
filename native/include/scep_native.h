/*
 * scep_native.h: the interface between the scep-fast C core and Python.
 *
 * This file is both the C header and the cffi cdef: build_native.py drops the
 * preprocessor lines (guards, includes) before handing it to cffi, so keep it
 * to plain declarations and integer #defines.
 *
 * Ownership: every result object is allocated by the core and freed with its
 * own *_free function; Python wraps each one in ffi.gc as soon as it arrives.
 * A scep_ctx is read-only once configured, so batch calls may run on any
 * thread at the same time.
 */
#ifndef SCEP_NATIVE_H
#define SCEP_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#define SCEP_NATIVE_ABI 3

/* Result status codes, shared by every entry point. */
#define SCEP_OK 0
#define SCEP_ERR_MALFORMED 1   /* not a message we can parse */
#define SCEP_ERR_SIGNATURE 2   /* signature or messageDigest check failed */
#define SCEP_ERR_DECRYPT 3     /* no key of ours opens the envelope */
#define SCEP_ERR_BAD_ALG 4     /* authenticated, but an algorithm the policy refuses */
#define SCEP_ERR_ARGUMENT 5    /* the caller passed something unusable */
#define SCEP_ERR_CSR 6         /* certification request malformed or badly signed */
#define SCEP_ERR_INTERNAL 7    /* OpenSSL failed where it should not */

/* Context flags (algorithm policy). */
#define SCEP_ALLOW_LEGACY 1    /* single DES and MD5, forbidden by RFC 8894 */
#define SCEP_REFUSE_SHA1 2
#define SCEP_REFUSE_3DES 4

/* Key transport used by the requester. */
#define SCEP_KT_RSA_PKCS1 1
#define SCEP_KT_RSA_OAEP 2

/* CertRep pkiStatus values (RFC 8894 section 3.2.1.3). */
#define SCEP_STATUS_SUCCESS 0
#define SCEP_STATUS_FAILURE 2
#define SCEP_STATUS_PENDING 3

#define SCEP_ERROR_TEXT_LEN 512

typedef struct scep_ctx scep_ctx;

/* Input bytes, borrowed for the duration of one call. */
typedef struct {
    const unsigned char *data;
    size_t len;
} scep_buf;

/* Output bytes, owned by the result that holds them. */
typedef struct {
    unsigned char *data;
    size_t len;
} scep_bytes;

/* ---- context ---------------------------------------------------------- */

const char *scep_native_version(void);
int scep_native_abi(void);
const char *scep_nid_name(int nid);

scep_ctx *scep_ctx_new(int flags, char *err, size_t err_len);
void scep_ctx_free(scep_ctx *ctx);
/* A certificate and key (both DER) that may decrypt request envelopes. */
int scep_ctx_add_recipient(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                           const unsigned char *key, size_t key_len, char *err, size_t err_len);
/* The RA certificate and key that sign CertReps. */
int scep_ctx_set_signer(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                        const unsigned char *key, size_t key_len, char *err, size_t err_len);
/* The CA certificate and key that sign issued certificates. */
int scep_ctx_set_issuer(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                        const unsigned char *key, size_t key_len, char *err, size_t err_len);

/* ---- keys by reference (keystore.c) ----------------------------------- */

/* A private key, from DER or held in a PKCS#11 token; reference-counted. A
   context that takes one keeps its own reference, so the caller may free its
   own at any time. */
typedef struct scep_key scep_key;
/* One PKCS#11 module, opened once per process through libp11's engine, with
   the PIN that logs in to its token. Free it only after every key loaded
   from it is gone. */
typedef struct scep_pkcs11 scep_pkcs11;

scep_pkcs11 *scep_pkcs11_open(const char *module_path, const char *pin, char *err,
                              size_t err_len);
void scep_pkcs11_free(scep_pkcs11 *p);
/* The private key named by an RFC 7512 URI (pkcs11:token=...;object=...), and,
   when public_uri is not NULL, the public key object it names (EC keys need it
   for their public point; a missing one is no error). */
scep_key *scep_pkcs11_load_key(scep_pkcs11 *p, const char *uri, const char *public_uri,
                               char *err, size_t err_len);
scep_key *scep_key_from_der(const unsigned char *der, size_t len, char *err, size_t err_len);
void scep_key_free(scep_key *k);
/* The key's SubjectPublicKeyInfo, DER. */
int scep_key_public_der(const scep_key *k, scep_bytes *out, char *err, size_t err_len);
/* Signs data (a TBSCertificate, a TBSCertList) with md_name ("SHA256"): PKCS#1
   v1.5 for RSA, a DER ECDSA-Sig-Value for EC. */
int scep_key_sign(const scep_key *k, const char *md_name, scep_buf data, scep_bytes *out,
                  char *err, size_t err_len);

/* The same as the three above, with a key object instead of DER. */
int scep_ctx_add_recipient_key(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                               scep_key *key, char *err, size_t err_len);
int scep_ctx_set_signer_key(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                            scep_key *key, char *err, size_t err_len);
int scep_ctx_set_issuer_key(scep_ctx *ctx, const unsigned char *cert, size_t cert_len,
                            scep_key *key, char *err, size_t err_len);

/* ---- unwrap: pkiMessage in, verified attributes and plaintext out ---- */

typedef struct {
    int status;
    char error[SCEP_ERROR_TEXT_LEN];
    /* Signed attributes (RFC 8894 section 3.2.1). message_type is -1 when absent. */
    int message_type;
    scep_bytes transaction_id;
    scep_bytes sender_nonce;
    /* The certificate that signed the message, and SHA-256 of its public key. */
    scep_bytes signer_cert;
    unsigned char signer_key_sha256[32];
    /* Algorithms the requester used; NIDs, named by scep_nid_name. */
    int digest_nid;
    int cipher_nid;
    int key_transport;
    int oaep_md_nid;
    int oaep_mgf1_md_nid;
    /* The decrypted pkcsPKIEnvelope content. */
    scep_bytes content;
    /* When content is a PKCS#10 request (PKCSReq, RenewalReq): what policy needs. */
    int csr_parsed;
    scep_bytes csr_challenge;      /* challengePassword value, empty if absent */
    scep_bytes csr_subject;        /* DER Name */
    scep_bytes csr_san;            /* DER GeneralNames (extnValue), empty if absent */
    int csr_key_nid;               /* NID_rsaEncryption, NID_X9_62_id_ecPublicKey, ... */
    int csr_key_bits;
    int csr_curve_nid;
    void *priv;                    /* internal: the parsed signer certificate and request */
} scep_unwrap_result;

/* Unwraps n messages; out[i] receives a new result (never NULL unless out of memory).
   Returns the number of results written. */
size_t scep_unwrap_batch(const scep_ctx *ctx, const scep_buf *messages, size_t n,
                         scep_unwrap_result **out);
void scep_unwrap_result_free(scep_unwrap_result *r);

/* ---- issue: CSR and profile in, signed certificate out --------------- */

typedef struct {
    /* The request: an unwrapped PKCSReq (its parsed CSR is reused, which spares
       OpenSSL 3.0's costly key decoding) or, when that is NULL, DER PKCS#10.
       Either way the CSR's signature is checked. */
    const scep_unwrap_result *request;
    scep_buf csr;
    scep_buf serial;      /* big-endian unsigned serial number */
    int64_t not_before;   /* seconds since the epoch */
    int64_t not_after;
    scep_buf subject;     /* DER Name; empty: the CSR's subject */
    scep_buf extensions;  /* DER Extensions (SEQUENCE OF Extension), added as given;
                             no repeats, no key identifiers (the core adds those) */
} scep_issue_item;

typedef struct {
    int status;
    char error[SCEP_ERROR_TEXT_LEN];
    scep_bytes cert;      /* DER */
} scep_issue_result;

size_t scep_issue_batch(const scep_ctx *ctx, const scep_issue_item *items, size_t n,
                        scep_issue_result **out);
void scep_issue_result_free(scep_issue_result *r);

/* ---- wrap: CertRep out ----------------------------------------------- */

typedef struct {
    const scep_unwrap_result *request;  /* the request answered (nonce, id, signer, algorithms) */
    int pki_status;                     /* SCEP_STATUS_* */
    int fail_info;                      /* -1: none; FAILURE needs one */
    scep_buf fail_info_text;            /* UTF-8, optional, FAILURE only */
    scep_buf certs;                     /* SUCCESS: concatenated DER certificates, first one issued */
    scep_buf crls;                      /* SUCCESS: concatenated DER CRLs (GetCRL) */
} scep_wrap_item;

typedef struct {
    int status;
    char error[SCEP_ERROR_TEXT_LEN];
    scep_bytes message;   /* DER CertRep pkiMessage */
} scep_wrap_result;

size_t scep_wrap_batch(const scep_ctx *ctx, const scep_wrap_item *items, size_t n,
                       scep_wrap_result **out);
void scep_wrap_result_free(scep_wrap_result *r);

/* ---- the degenerate certs-only SignedData (GetCACert, GetNextCACert) - */

/* Encodes certs and crls (each a concatenation of DER objects), in the order
   given, as a certs-only SignedData ContentInfo. Returns 1 on success. */
int scep_certs_only(scep_buf certs, scep_buf crls, scep_bytes *out, char *err, size_t err_len);
void scep_bytes_free(scep_bytes *b);

/* ---- refusing for load (http_head.c, refusal.c) ----------------------- */

/* scep_pki_post_length: the head is not all there yet, or not a plain
   PKIOperation POST. A head longer than SCEP_HTTP_MAX_HEAD is never one. */
#define SCEP_HTTP_MAX_HEAD 8192
#define SCEP_HTTP_INCOMPLETE 0
#define SCEP_HTTP_OTHER -1

/* The whole length (head and body) of the plain PKIOperation POST that data
   starts with: one HTTP/1.1 POST to /scep... or /cgi-bin/pkiclient.exe... whose
   query names one operation, PKIOperation, with one Host, one Content-Length
   of 1 to max_body, no Transfer-Encoding, Connection, Expect or Upgrade
   header, and a plain head (CRLF line ends only, no folded line, no space
   before a colon, no control character but tab). Else SCEP_HTTP_INCOMPLETE
   or SCEP_HTTP_OTHER. */
long scep_pki_post_length(const unsigned char *data, size_t len, size_t max_body);

/* A loop that answers plain PKIOperation POSTs 503 on the connections it
   holds while the worker refuses for load, and hands every other request
   back. One thread calls it; others wake it through wake_fd (an eventfd the
   caller owns and closes after scep_refusal_free). */
typedef struct scep_refusal scep_refusal;

/* A connection handed back: the descriptor is the caller's from now on; the
   bytes read from it so far stay valid until the next call on the loop. fd
   is -1 if the connection had to be closed instead. */
typedef struct {
    int fd;
    const unsigned char *data;
    size_t len;
} scep_handback;

typedef struct {
    size_t handed_back;   /* entries written to out */
    size_t refused;       /* requests answered 503 in this round */
    int woken;            /* wake_fd was written to */
    int more;             /* more to hand back: call again at once */
} scep_refusal_round;

scep_refusal *scep_refusal_new(int wake_fd, size_t max_body, double keep_alive_seconds,
                               double read_seconds, size_t max_connections);
/* Closes every connection the loop still holds. */
void scep_refusal_free(scep_refusal *r);
/* Takes a kept-alive connection, idle between requests; 0 if it cannot (the
   descriptor is then still the caller's). */
int scep_refusal_hold(scep_refusal *r, int fd);
size_t scep_refusal_held(const scep_refusal *r);
/* One round: takes listen_fd's new connections while refusing (listen_fd -1:
   none), waits at most timeout_ms for events, answers what it can with answer
   (answer_close past max_connections held), and hands back the rest. Returns
   0 if epoll failed (errno says why). */
int scep_refusal_poll(scep_refusal *r, int listen_fd, int refusing, int timeout_ms,
                      scep_buf answer, scep_buf answer_close, scep_handback *out,
                      size_t max_out, scep_refusal_round *round);
/* The worker stops: requests under way are handed back, idle connections
   closed. Call until it returns 0. */
size_t scep_refusal_finish(scep_refusal *r, scep_handback *out, size_t max_out);

#endif
