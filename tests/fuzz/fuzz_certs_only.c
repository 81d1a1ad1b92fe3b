/*
 * fuzz_certs_only.c: scep_certs_only, the degenerate certs-only SignedData
 * that carries the CA certificates (GetCACert, GetNextCACert) and CRLs
 * (GetCRL, inside a CertRep).
 *
 * Input layout: one octet of flags, the certificates (two-octet length), then
 * the CRLs. Flag bit 0 passes the certificates as NULL, bit 1 the CRLs.
 *
 * The builder copies its inputs as they are, so the checks are on the frame:
 * one ContentInfo TLV exactly as long as the output, with the inputs inside
 * it unchanged, and when the inputs are well-formed certificates and CRLs
 * the whole thing parses as CMS.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/objects.h>

#include "fuzz_common.h"

static OSSL_LIB_CTX *parse_libctx;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    parse_libctx = fuzz_parse_libctx();
    return 0;
}

static int contains(const scep_bytes *out, scep_buf part)
{
    size_t i;

    if (part.len == 0)
        return 1;
    for (i = 0; i + part.len <= out->len; i++) {
        if (memcmp(out->data + i, part.data, part.len) == 0)
            return 1;
    }
    return 0;
}

/* Whether buf is a concatenation of whole certificates (or CRLs), at least one. */
static int all_parse(scep_buf buf, int crls)
{
    const unsigned char *p = buf.data, *end = buf.data + buf.len;
    int n = 0;

    while (p < end) {
        const unsigned char *start = p;
        void *obj = crls ? (void *)d2i_X509_CRL(NULL, &p, (long)(end - p))
                         : (void *)X509_new_ex(parse_libctx, NULL);

        if (obj != NULL && !crls && d2i_X509((X509 **)&obj, &p, (long)(end - p)) == NULL)
            obj = NULL; /* d2i_X509 freed it */
        if (crls)
            X509_CRL_free(obj);
        else
            X509_free(obj);
        if (obj == NULL || p <= start)
            return 0;
        n++;
    }
    return n > 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size};
    uint8_t flags = fuzz_u8(&in);
    scep_buf certs = fuzz_bytes16(&in), crls = fuzz_rest(&in);
    scep_bytes out = {NULL, 0};
    char err[SCEP_ERROR_TEXT_LEN];
    const unsigned char *p;
    CMS_ContentInfo *cms;

    if (flags & 1)
        certs.data = NULL;
    if (flags & 2)
        crls.data = NULL;
    if (scep_certs_only(certs, crls, &out, err, sizeof(err)) != 1)
        abort();
    if (!fuzz_one_tlv(out.data, out.len, V_ASN1_SEQUENCE)
        || (certs.data != NULL && !contains(&out, certs))
        || (crls.data != NULL && !contains(&out, crls)))
        abort();
    if ((certs.data == NULL || certs.len == 0 || all_parse(certs, 0))
        && (crls.data == NULL || crls.len == 0 || all_parse(crls, 1))) {
        p = out.data;
        cms = CMS_ContentInfo_new_ex(parse_libctx, NULL);
        if (cms == NULL || d2i_CMS_ContentInfo(&cms, &p, (long)out.len) == NULL
            || p != out.data + out.len || OBJ_obj2nid(CMS_get0_type(cms)) != NID_pkcs7_signed)
            abort();
        CMS_ContentInfo_free(cms);
    }
    ERR_clear_error();
    scep_bytes_free(&out);
    return 0;
}
