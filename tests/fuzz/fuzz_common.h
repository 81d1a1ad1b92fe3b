/*
 * fuzz_common.h: what the libFuzzer harnesses of the native core share.
 *
 * Each harness sets up its contexts once (LLVMFuzzerInitialize) from the test
 * PKI in tests/vectors and from keys it generates, then feeds every input to
 * one entry point of scep_native.h. An input is cut into fields by the small
 * reader below: fixed-size integers, then length-prefixed byte strings, then
 * the rest; a field past the end of the input is zero or empty, so every
 * input is valid and the fuzzer never wastes time on framing.
 */
#ifndef SCEP_FUZZ_COMMON_H
#define SCEP_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

#include "scep_native.h"

/* ---- the input reader --------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    size_t n;
} fuzz_input;

uint8_t fuzz_u8(fuzz_input *in);
uint16_t fuzz_u16(fuzz_input *in);
uint32_t fuzz_u32(fuzz_input *in);
int64_t fuzz_i64(fuzz_input *in);
/* A byte string with a one-octet (short) or two-octet length prefix, cut to what is left. */
scep_buf fuzz_bytes8(fuzz_input *in);
scep_buf fuzz_bytes16(fuzz_input *in);
/* Everything that is left. */
scep_buf fuzz_rest(fuzz_input *in);

/* ---- keys and certificates -------------------------------------------- */

/* Prints what went wrong (with OpenSSL's error queue) and aborts: set-up only. */
void fuzz_die(const char *what);
/* tests/<name>: a file's bytes (NUL-terminated), a PEM certificate, a PEM key. */
unsigned char *fuzz_read_file(const char *name, size_t *len);
X509 *fuzz_file_cert(const char *name);
EVP_PKEY *fuzz_file_key(const char *name);
/* A fresh key, and a self-signed CA certificate for a key. */
EVP_PKEY *fuzz_ec_key(const char *curve);
X509 *fuzz_self_signed(EVP_PKEY *key, const char *cn);

/* Which of the context's key slots fuzz_ctx_set fills. */
enum { FUZZ_RECIPIENT, FUZZ_SIGNER, FUZZ_ISSUER };
scep_ctx *fuzz_ctx_new(int flags);
void fuzz_ctx_set(scep_ctx *ctx, int slot, X509 *cert, EVP_PKEY *key);

/* With SCEP_FUZZ_VERBOSE=1 in the environment, prints each result's status
   and error text to stderr (to see what a corpus reaches). */
void fuzz_report(int status, const char *error);

/* A library context without providers, to parse outputs without decoding keys. */
OSSL_LIB_CTX *fuzz_parse_libctx(void);
/* Whether der is exactly one well-formed DER/BER TLV of the given tag. */
int fuzz_one_tlv(const unsigned char *der, size_t len, int tag);

#endif
