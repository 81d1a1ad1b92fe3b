/*
 * wrap.c: builds the CertRep pkiMessage (RFC 8894 section 3.3.2).
 *
 * The reply reuses the requester's own algorithms: the content cipher and key
 * transport of its envelope, and its digest for our signature (never a weaker
 * one). Answering with fixed weak algorithms is what makes other servers fail
 * OpenSSL 3 and FIPS-mode clients.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>

#include "internal.h"

#define SCEP_MAX_NONCE 64

static void fail(scep_wrap_result *r, int status, const char *what)
{
    r->status = status;
    scep_set_error(r->error, sizeof(r->error), what);
}

/* EnvelopedData holding `inner`, to the requester's certificate, with its algorithms. */
static int envelope(const scep_unwrap_result *req, const scep_bytes *inner, scep_bytes *out,
                    scep_wrap_result *r)
{
    X509 *recipient = ((const scep_request_state *)req->priv)->signer;
    const EVP_CIPHER *cipher = EVP_get_cipherbynid(req->cipher_nid);
    int oaep = req->key_transport == SCEP_KT_RSA_OAEP;
    CMS_ContentInfo *env = NULL;
    CMS_RecipientInfo *ri;
    BIO *in = NULL;
    unsigned char *der = NULL;
    int der_len, ok = 0;

    if (EVP_PKEY_get_base_id(X509_get0_pubkey(recipient)) != EVP_PKEY_RSA) {
        fail(r, SCEP_ERR_ARGUMENT, "the requester's key cannot receive RSA key transport");
        goto done;
    }
    if (cipher == NULL) {
        fail(r, SCEP_ERR_ARGUMENT, "unknown content cipher");
        goto done;
    }
    env = CMS_encrypt(NULL, NULL, cipher, CMS_BINARY | CMS_PARTIAL);
    ri = env != NULL ? CMS_add1_recipient_cert(env, recipient, oaep ? CMS_KEY_PARAM : 0) : NULL;
    if (ri == NULL) {
        fail(r, SCEP_ERR_INTERNAL, "cannot create the envelope");
        goto done;
    }
    if (oaep) {
        EVP_PKEY_CTX *pctx = CMS_RecipientInfo_get0_pkey_ctx(ri);

        if (pctx == NULL || EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_OAEP_PADDING) <= 0
            || EVP_PKEY_CTX_set_rsa_oaep_md(pctx, EVP_get_digestbynid(req->oaep_md_nid)) <= 0
            || EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_get_digestbynid(req->oaep_mgf1_md_nid))
                   <= 0) {
            fail(r, SCEP_ERR_INTERNAL, "cannot set the RSAES-OAEP parameters");
            goto done;
        }
    }
    in = BIO_new_mem_buf(inner->data, (int)inner->len);
    if (in == NULL || !CMS_final(env, in, NULL, CMS_BINARY)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot encrypt the reply");
        goto done;
    }
    der_len = i2d_CMS_ContentInfo(env, &der);
    if (der_len <= 0 || !scep_bytes_set(out, der, (size_t)der_len)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot encode the envelope");
        goto done;
    }
    ok = 1;
done:
    OPENSSL_free(der);
    BIO_free(in);
    CMS_ContentInfo_free(env);
    return ok;
}

static int add_attr(CMS_SignerInfo *si, const ASN1_OBJECT *obj, int type, const void *data,
                    size_t len)
{
    return len <= 4096 && CMS_signed_add1_attr_by_OBJ(si, obj, type, data, (int)len);
}

static int add_number_attr(CMS_SignerInfo *si, const ASN1_OBJECT *obj, int value)
{
    char text[16];
    int n = snprintf(text, sizeof(text), "%d", value);

    return n > 0 && add_attr(si, obj, V_ASN1_PRINTABLESTRING, text, (size_t)n);
}

/* The SCEP signed attributes of a CertRep (RFC 8894 section 3.2.1). */
static int add_scep_attrs(const scep_ctx *ctx, const scep_wrap_item *item, CMS_SignerInfo *si)
{
    const scep_unwrap_result *req = item->request;
    unsigned char nonce[SCEP_MAX_NONCE];
    const scep_oids *o = &ctx->oids;

    /* A fresh senderNonce, as long as the client's (older iOS sends 8 bytes). */
    if (RAND_bytes(nonce, (int)req->sender_nonce.len) != 1)
        return 0;
    if (!add_number_attr(si, o->message_type, 3) || !add_number_attr(si, o->pki_status, item->pki_status)
        || !add_attr(si, o->transaction_id, V_ASN1_PRINTABLESTRING, req->transaction_id.data,
                     req->transaction_id.len)
        || !add_attr(si, o->recipient_nonce, V_ASN1_OCTET_STRING, req->sender_nonce.data,
                     req->sender_nonce.len)
        || !add_attr(si, o->sender_nonce, V_ASN1_OCTET_STRING, nonce, req->sender_nonce.len))
        return 0;
    if (item->pki_status != SCEP_STATUS_FAILURE)
        return 1;
    if (!add_number_attr(si, o->fail_info, item->fail_info))
        return 0;
    if (item->fail_info_text.data != NULL && item->fail_info_text.len > 0)
        return add_attr(si, o->fail_info_text, V_ASN1_UTF8STRING, item->fail_info_text.data,
                        item->fail_info_text.len);
    return 1;
}

static int item_ok(const scep_wrap_item *item, scep_wrap_result *r)
{
    const scep_unwrap_result *req = item->request;

    if (req == NULL || req->priv == NULL || ((const scep_request_state *)req->priv)->signer == NULL
        || req->transaction_id.len == 0
        || req->sender_nonce.len == 0 || req->sender_nonce.len > SCEP_MAX_NONCE) {
        fail(r, SCEP_ERR_ARGUMENT, "the request was not authenticated; no CertRep is possible");
        return 0;
    }
    switch (item->pki_status) {
    case SCEP_STATUS_SUCCESS:
        if (req->status != SCEP_OK || item->certs.data == NULL || item->certs.len == 0) {
            fail(r, SCEP_ERR_ARGUMENT, "SUCCESS needs a fully unwrapped request and certificates");
            return 0;
        }
        return 1;
    case SCEP_STATUS_PENDING:
        if (item->fail_info != -1) {
            fail(r, SCEP_ERR_ARGUMENT, "failInfo belongs to FAILURE only");
            return 0;
        }
        return 1;
    case SCEP_STATUS_FAILURE:
        if (item->fail_info < 0 || item->fail_info > 4) {
            fail(r, SCEP_ERR_ARGUMENT, "FAILURE needs a failInfo from 0 to 4");
            return 0;
        }
        return 1;
    default:
        fail(r, SCEP_ERR_ARGUMENT, "unknown pkiStatus");
        return 0;
    }
}

static void wrap_one(const scep_ctx *ctx, const scep_wrap_item *item, scep_wrap_result *r)
{
    const scep_unwrap_result *req = item->request;
    scep_bytes inner = {NULL, 0}, env = {NULL, 0};
    CMS_ContentInfo *cms = NULL;
    CMS_SignerInfo *si;
    BIO *content = NULL;
    const EVP_MD *md;
    unsigned char *der = NULL;
    int der_len;

    r->status = SCEP_ERR_INTERNAL;
    if (ctx->signer.key == NULL) {
        fail(r, SCEP_ERR_ARGUMENT, "no RA signer configured");
        goto done;
    }
    if (!item_ok(item, r))
        goto done;
    md = EVP_get_digestbynid(scep_reply_digest(ctx, req->digest_nid));
    if (item->pki_status == SCEP_STATUS_SUCCESS) {
        if (!scep_encode_certs_only(&item->certs, &item->crls, &inner)) {
            fail(r, SCEP_ERR_ARGUMENT, "cannot encode the certificates");
            goto done;
        }
        if (!envelope(req, &inner, &env, r))
            goto done;
    }
    /* PENDING and FAILURE carry no envelope: the signed content is empty. */
    content = BIO_new_mem_buf(env.data != NULL ? env.data : (const unsigned char *)"",
                              (int)env.len);
    cms = CMS_sign(NULL, NULL, NULL, NULL, CMS_PARTIAL | CMS_BINARY);
    si = cms != NULL && md != NULL
             ? CMS_add1_signer(cms, ctx->signer.cert, ctx->signer.key, md, CMS_NOSMIMECAP)
             : NULL;
    if (content == NULL || si == NULL || !add_scep_attrs(ctx, item, si)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot build the CertRep SignedData");
        goto done;
    }
    if (!CMS_final(cms, content, NULL, CMS_BINARY)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot sign the CertRep");
        goto done;
    }
    der_len = i2d_CMS_ContentInfo(cms, &der);
    if (der_len <= 0 || !scep_bytes_set(&r->message, der, (size_t)der_len)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot encode the CertRep");
        goto done;
    }
    r->status = SCEP_OK;
done:
    OPENSSL_free(der);
    CMS_ContentInfo_free(cms);
    BIO_free(content);
    scep_bytes_clear(&env);
    scep_bytes_clear(&inner);
    ERR_clear_error();
}

size_t scep_wrap_batch(const scep_ctx *ctx, const scep_wrap_item *items, size_t n,
                       scep_wrap_result **out)
{
    size_t i;

    for (i = 0; i < n; i++) {
        out[i] = calloc(1, sizeof(*out[i]));
        if (out[i] == NULL)
            break;
        wrap_one(ctx, &items[i], out[i]);
    }
    return i;
}

void scep_wrap_result_free(scep_wrap_result *r)
{
    if (r == NULL)
        return;
    scep_bytes_clear(&r->message);
    free(r);
}
