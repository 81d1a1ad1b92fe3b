/*
 * policy.c: which algorithms a request may use.
 *
 * RFC 8894 section 3.5.2: SHA-1 and 3DES remain allowed (many devices still
 * send them), single DES and MD5 are not; they are accepted only when an
 * operator turns on the legacy switch for old clients.
 */
#include <openssl/objects.h>

#include "internal.h"

int scep_digest_allowed(const scep_ctx *ctx, int nid)
{
    switch (nid) {
    case NID_sha224:
    case NID_sha256:
    case NID_sha384:
    case NID_sha512:
        return 1;
    case NID_sha1:
        return !(ctx->flags & SCEP_REFUSE_SHA1);
    case NID_md5:
        return (ctx->flags & SCEP_ALLOW_LEGACY) != 0;
    default:
        return 0;
    }
}

int scep_cipher_allowed(const scep_ctx *ctx, int nid)
{
    switch (nid) {
    case NID_aes_128_cbc:
    case NID_aes_192_cbc:
    case NID_aes_256_cbc:
        return 1;
    case NID_des_ede3_cbc:
        return !(ctx->flags & SCEP_REFUSE_3DES);
    case NID_des_cbc:
        return (ctx->flags & SCEP_ALLOW_LEGACY) != 0;
    default:
        return 0;
    }
}

int scep_reply_digest(const scep_ctx *ctx, int request_nid)
{
    /* Answer with the requester's own digest, never a weaker one; a request
       refused for its digest is answered with SHA-256. */
    return scep_digest_allowed(ctx, request_nid) ? request_nid : NID_sha256;
}
