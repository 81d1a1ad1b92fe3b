/*
 * wrap.c: builds the CertRep pkiMessage (RFC 8894 section 3.3.2).
 *
 * The reply reuses the requester's own algorithms: the content cipher and key
 * transport of its envelope, and its digest for our signature (never a weaker
 * one). Answering with fixed weak algorithms is what makes other servers fail
 * OpenSSL 3 and FIPS-mode clients.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>

#include "internal.h"

/* Longest transactionID or failInfoText we sign; item_ok refuses longer ones. */
#define SCEP_MAX_ATTR 4096

static void fail(scep_wrap_result *r, int status, const char *what)
{
    r->status = status;
    scep_set_error(r->error, sizeof(r->error), what);
}

/* DER of an OBJECT IDENTIFIER for a NID. */
static int oid_der(int nid, scep_bytes *out)
{
    const ASN1_OBJECT *obj = OBJ_nid2obj(nid);
    unsigned char *der = NULL;
    int len = obj != NULL ? i2d_ASN1_OBJECT(obj, &der) : 0;
    int ok = len > 0 && scep_bytes_set(out, der, (size_t)len);

    OPENSSL_free(der);
    return ok;
}

/* The keyEncryptionAlgorithm the requester used: rsaEncryption, or RSAES-OAEP
   with its hash and MGF1 hash (RFC 8017 A.2.1, defaults left out as DER wants). */
static int key_transport_alg(const scep_unwrap_result *req, scep_bytes *out)
{
    static const unsigned char rsa_encryption[] = {0x30, 0x0D, 0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                                   0xF7, 0x0D, 0x01, 0x01, 0x01, 0x05, 0x00};
    RSA_OAEP_PARAMS *oaep = NULL;
    X509_ALGOR *mgf1_md = NULL, *alg = NULL;
    ASN1_STRING *packed = NULL;
    unsigned char *der = NULL;
    int len, ok = 0;

    if (req->key_transport != SCEP_KT_RSA_OAEP)
        return scep_bytes_set(out, rsa_encryption, sizeof(rsa_encryption));
    oaep = RSA_OAEP_PARAMS_new();
    if (oaep == NULL)
        goto done;
    if (req->oaep_md_nid != NID_sha1) {
        oaep->hashFunc = X509_ALGOR_new();
        if (oaep->hashFunc == NULL)
            goto done;
        X509_ALGOR_set_md(oaep->hashFunc, EVP_get_digestbynid(req->oaep_md_nid));
    }
    if (req->oaep_mgf1_md_nid != NID_sha1) {
        mgf1_md = X509_ALGOR_new();
        oaep->maskGenFunc = X509_ALGOR_new();
        if (mgf1_md == NULL || oaep->maskGenFunc == NULL)
            goto done;
        X509_ALGOR_set_md(mgf1_md, EVP_get_digestbynid(req->oaep_mgf1_md_nid));
        packed = ASN1_item_pack(mgf1_md, ASN1_ITEM_rptr(X509_ALGOR), NULL);
        if (packed == NULL
            || !X509_ALGOR_set0(oaep->maskGenFunc, OBJ_nid2obj(NID_mgf1), V_ASN1_SEQUENCE, packed))
            goto done;
        packed = NULL;
    }
    alg = X509_ALGOR_new();
    packed = ASN1_item_pack(oaep, ASN1_ITEM_rptr(RSA_OAEP_PARAMS), NULL);
    if (alg == NULL || packed == NULL
        || !X509_ALGOR_set0(alg, OBJ_nid2obj(NID_rsaesOaep), V_ASN1_SEQUENCE, packed))
        goto done;
    packed = NULL;
    len = i2d_X509_ALGOR(alg, &der);
    ok = len > 0 && scep_bytes_set(out, der, (size_t)len);
done:
    OPENSSL_free(der);
    ASN1_STRING_free(packed);
    X509_ALGOR_free(alg);
    X509_ALGOR_free(mgf1_md);
    RSA_OAEP_PARAMS_free(oaep);
    return ok;
}

/* Encrypts the content-encryption key to the requester's key. */
static int encrypt_key(const scep_ctx *ctx, const scep_unwrap_result *req, EVP_PKEY *recipient,
                       const unsigned char *key, size_t key_len, scep_bytes *out)
{
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_pkey(NULL, recipient, NULL);
    size_t len = 0;
    int ok = 0;

    if (pctx == NULL || EVP_PKEY_encrypt_init(pctx) <= 0)
        goto done;
    if (req->key_transport == SCEP_KT_RSA_OAEP
        && (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_OAEP_PADDING) <= 0
            || EVP_PKEY_CTX_set_rsa_oaep_md(pctx, scep_md(ctx, req->oaep_md_nid)) <= 0
            || EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, scep_md(ctx, req->oaep_mgf1_md_nid)) <= 0))
        goto done;
    if (EVP_PKEY_encrypt(pctx, NULL, &len, key, key_len) <= 0)
        goto done;
    scep_bytes_clear(out);
    out->data = malloc(len);
    if (out->data == NULL || EVP_PKEY_encrypt(pctx, out->data, &len, key, key_len) <= 0)
        goto done;
    out->len = len;
    ok = 1;
done:
    EVP_PKEY_CTX_free(pctx);
    return ok;
}

/* CBC-encrypts `inner` under a fresh key; returns the ciphertext, key and IV. */
static int encrypt_content(const scep_ctx *ctx, int cipher_nid, const scep_bytes *inner,
                           unsigned char *key, int *key_len, unsigned char *iv, int *iv_len,
                           scep_bytes *out)
{
    const EVP_CIPHER *cipher = scep_cipher(ctx, cipher_nid);
    EVP_CIPHER_CTX *cctx = EVP_CIPHER_CTX_new();
    int n1 = 0, n2 = 0, ok = 0;

    if (cipher == NULL || cctx == NULL || !EVP_EncryptInit_ex2(cctx, cipher, NULL, NULL, NULL))
        goto done;
    *key_len = EVP_CIPHER_CTX_get_key_length(cctx);
    *iv_len = EVP_CIPHER_CTX_get_iv_length(cctx);
    /* rand_key sets DES parity bits where the cipher has them. */
    if (*key_len <= 0 || *key_len > EVP_MAX_KEY_LENGTH || *iv_len <= 0
        || *iv_len > EVP_MAX_IV_LENGTH || EVP_CIPHER_CTX_rand_key(cctx, key) <= 0
        || RAND_bytes(iv, *iv_len) != 1 || !EVP_EncryptInit_ex2(cctx, NULL, key, iv, NULL))
        goto done;
    scep_bytes_clear(out);
    out->data = malloc(inner->len + (size_t)EVP_CIPHER_CTX_get_block_size(cctx));
    if (out->data == NULL
        || !EVP_EncryptUpdate(cctx, out->data, &n1, inner->data, (int)inner->len)
        || !EVP_EncryptFinal_ex(cctx, out->data + n1, &n2))
        goto done;
    out->len = (size_t)(n1 + n2);
    ok = 1;
done:
    EVP_CIPHER_CTX_free(cctx);
    return ok;
}

/*
 * EnvelopedData holding `inner`, to the requester's certificate (RFC 5652
 * section 6), with the requester's own content cipher and key transport.
 * Encoded here rather than with CMS_encrypt, which would need the requester's
 * key decoded inside its certificate (see pubkey.c).
 */
static int envelope(const scep_ctx *ctx, const scep_unwrap_result *req, const scep_bytes *inner,
                    scep_bytes *out, scep_wrap_result *r)
{
    const scep_request_state *state = req->priv;
    unsigned char key[EVP_MAX_KEY_LENGTH], iv[EVP_MAX_IV_LENGTH];
    int key_len = 0, iv_len = 0, len, ok = 0;
    scep_bytes ciphertext = {NULL, 0}, wrapped_key = {NULL, 0}, kalg = {NULL, 0};
    scep_bytes cipher_oid = {NULL, 0}, data_oid = {NULL, 0}, env_oid = {NULL, 0};
    scep_bytes issuer = {NULL, 0}, serial = {NULL, 0}, t1 = {NULL, 0}, t2 = {NULL, 0};
    scep_bytes ias = {NULL, 0}, ktri = {NULL, 0}, recipients = {NULL, 0}, calg = {NULL, 0};
    scep_bytes eci = {NULL, 0}, env = {NULL, 0};
    unsigned char *der = NULL;
    static const unsigned char version0[] = {0x02, 0x01, 0x00};

    if (state->signer_key == NULL || EVP_PKEY_get_base_id(state->signer_key) != EVP_PKEY_RSA) {
        fail(r, SCEP_ERR_ARGUMENT, "the requester's key cannot receive RSA key transport");
        goto done;
    }
    if (!encrypt_content(ctx, req->cipher_nid, inner, key, &key_len, iv, &iv_len, &ciphertext)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot encrypt the reply");
        goto done;
    }
    if (!encrypt_key(ctx, req, state->signer_key, key, (size_t)key_len, &wrapped_key)
        || !key_transport_alg(req, &kalg)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot encrypt the content-encryption key");
        goto done;
    }
    len = i2d_X509_NAME(X509_get_issuer_name(state->signer), &der);
    if (len <= 0 || !scep_bytes_set(&issuer, der, (size_t)len))
        goto encode_error;
    OPENSSL_free(der);
    der = NULL;
    len = i2d_ASN1_INTEGER(X509_get0_serialNumber(state->signer), &der);
    if (len <= 0 || !scep_bytes_set(&serial, der, (size_t)len))
        goto encode_error;
    if (!oid_der(req->cipher_nid, &cipher_oid) || !oid_der(NID_pkcs7_data, &data_oid)
        || !oid_der(NID_pkcs7_enveloped, &env_oid))
        goto encode_error;
    {
        /* KeyTransRecipientInfo ::= SEQUENCE { version 0, rid issuerAndSerialNumber,
           keyEncryptionAlgorithm, encryptedKey OCTET STRING } */
        scep_buf ias_parts[] = {{issuer.data, issuer.len}, {serial.data, serial.len}};
        scep_buf ek[] = {{wrapped_key.data, wrapped_key.len}};
        scep_buf iv_part[] = {{iv, (size_t)iv_len}};

        if (!scep_der_tlv(0x30, ias_parts, 2, &ias) || !scep_der_tlv(0x04, ek, 1, &t1)
            || !scep_der_tlv(0x04, iv_part, 1, &t2))
            goto encode_error;
    }
    {
        scep_buf ktri_parts[] = {{version0, sizeof(version0)}, {ias.data, ias.len},
                                 {kalg.data, kalg.len}, {t1.data, t1.len}};
        scep_buf calg_parts[] = {{cipher_oid.data, cipher_oid.len}, {t2.data, t2.len}};

        if (!scep_der_tlv(0x30, ktri_parts, 4, &ktri) || !scep_der_tlv(0x30, calg_parts, 2, &calg))
            goto encode_error;
    }
    {
        scep_buf recip_parts[] = {{ktri.data, ktri.len}};
        scep_buf ct[] = {{ciphertext.data, ciphertext.len}};

        /* encryptedContent [0] IMPLICIT OCTET STRING */
        if (!scep_der_tlv(0x31, recip_parts, 1, &recipients) || !scep_der_tlv(0x80, ct, 1, &t1))
            goto encode_error;
    }
    {
        scep_buf eci_parts[] = {{data_oid.data, data_oid.len}, {calg.data, calg.len},
                                {t1.data, t1.len}};

        if (!scep_der_tlv(0x30, eci_parts, 3, &eci))
            goto encode_error;
    }
    {
        /* EnvelopedData version 0: only issuerAndSerialNumber recipients (RFC 5652 6.1). */
        scep_buf env_parts[] = {{version0, sizeof(version0)}, {recipients.data, recipients.len},
                                {eci.data, eci.len}};

        if (!scep_der_tlv(0x30, env_parts, 3, &env))
            goto encode_error;
    }
    {
        scep_buf explicit0[] = {{env.data, env.len}};

        if (!scep_der_tlv(0xA0, explicit0, 1, &t2))
            goto encode_error;
    }
    {
        scep_buf ci_parts[] = {{env_oid.data, env_oid.len}, {t2.data, t2.len}};

        if (!scep_der_tlv(0x30, ci_parts, 2, out))
            goto encode_error;
    }
    ok = 1;
    goto done;
encode_error:
    fail(r, SCEP_ERR_INTERNAL, "cannot encode the envelope");
done:
    OPENSSL_cleanse(key, sizeof(key));
    OPENSSL_free(der);
    scep_bytes_clear(&ciphertext);
    scep_bytes_clear(&wrapped_key);
    scep_bytes_clear(&kalg);
    scep_bytes_clear(&cipher_oid);
    scep_bytes_clear(&data_oid);
    scep_bytes_clear(&env_oid);
    scep_bytes_clear(&issuer);
    scep_bytes_clear(&serial);
    scep_bytes_clear(&t1);
    scep_bytes_clear(&t2);
    scep_bytes_clear(&ias);
    scep_bytes_clear(&ktri);
    scep_bytes_clear(&recipients);
    scep_bytes_clear(&calg);
    scep_bytes_clear(&eci);
    scep_bytes_clear(&env);
    return ok;
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
    if (req->transaction_id.len > SCEP_MAX_ATTR || item->fail_info_text.len > SCEP_MAX_ATTR) {
        fail(r, SCEP_ERR_ARGUMENT, "the transactionID or failInfoText is over 4096 bytes");
        return 0;
    }
    switch (item->pki_status) {
    case SCEP_STATUS_SUCCESS:
        /* A GetCRL reply (RFC 8894 section 3.3.5) carries a CRL and no certificate. */
        if (req->status != SCEP_OK || ((item->certs.data == NULL || item->certs.len == 0) &&
                                       (item->crls.data == NULL || item->crls.len == 0))) {
            fail(r, SCEP_ERR_ARGUMENT,
                 "SUCCESS needs a fully unwrapped request and certificates or CRLs");
            return 0;
        }
        if (item->fail_info != -1) {
            fail(r, SCEP_ERR_ARGUMENT, "failInfo belongs to FAILURE only");
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

    r->status = SCEP_ERR_INTERNAL;
    if (ctx->signer.key == NULL) {
        fail(r, SCEP_ERR_ARGUMENT, "no RA signer configured");
        goto done;
    }
    if (!item_ok(item, r))
        goto done;
    if (item->pki_status == SCEP_STATUS_SUCCESS) {
        if (!scep_encode_certs_only(&item->certs, &item->crls, &inner)) {
            fail(r, SCEP_ERR_ARGUMENT, "cannot encode the certificates");
            goto done;
        }
        if (!envelope(ctx, req, &inner, &env, r))
            goto done;
    }
    /* PENDING and FAILURE carry no envelope: the signed content is empty. */
    if (!scep_sign_certrep(ctx, item, scep_reply_digest(ctx, req->digest_nid), &env,
                           &r->message)) {
        fail(r, SCEP_ERR_INTERNAL, "cannot sign the CertRep");
        goto done;
    }
    r->status = SCEP_OK;
done:
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
