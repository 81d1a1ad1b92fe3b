/*
 * der.c: the few places where the core reads DER itself.
 *
 * OpenSSL 3.0 has no getter for an EnvelopedData's content-encryption
 * algorithm, yet policy must see it before decrypting (to refuse single DES
 * with a signed badAlg) and the reply must reuse it. The walk below runs on
 * DER that OpenSSL itself produced, so it needs no BER support.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/objects.h>

#include "internal.h"

/* Reads one TLV at *p; checks its tag; returns its content and moves *p past it. */
static int next_tlv(const unsigned char **p, const unsigned char *end, int tag, int xclass,
                    const unsigned char **content, long *content_len)
{
    const unsigned char *q = *p;
    long len = 0;
    int got_tag = 0, got_class = 0, ret;

    if (q >= end)
        return 0;
    ret = ASN1_get_object(&q, &len, &got_tag, &got_class, (long)(end - q));
    if ((ret & 0x80) || ret == 0x21 || got_tag != tag || got_class != xclass)
        return 0;
    if (content != NULL)
        *content = q;
    if (content_len != NULL)
        *content_len = len;
    *p = q + len;
    return 1;
}

int scep_envelope_cipher_nid(const unsigned char *der, size_t len)
{
    const unsigned char *p = der, *end = der + len, *c, *alg, *oid_start;
    long clen = 0;
    ASN1_OBJECT *obj = NULL;
    int nid;

    /* ContentInfo ::= SEQUENCE { contentType, [0] EXPLICIT EnvelopedData } */
    if (!next_tlv(&p, end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, &c, &clen))
        return NID_undef;
    p = c;
    end = c + clen;
    if (!next_tlv(&p, end, V_ASN1_OBJECT, V_ASN1_UNIVERSAL, NULL, NULL)
        || !next_tlv(&p, end, 0, V_ASN1_CONTEXT_SPECIFIC, &c, &clen))
        return NID_undef;
    p = c;
    end = c + clen;
    /* EnvelopedData ::= SEQUENCE { version, originatorInfo [0] OPTIONAL,
       recipientInfos SET, encryptedContentInfo SEQUENCE, ... } (RFC 5652 6.1) */
    if (!next_tlv(&p, end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, &c, &clen))
        return NID_undef;
    p = c;
    end = c + clen;
    if (!next_tlv(&p, end, V_ASN1_INTEGER, V_ASN1_UNIVERSAL, NULL, NULL))
        return NID_undef;
    if (p < end && *p == 0xA0 && !next_tlv(&p, end, 0, V_ASN1_CONTEXT_SPECIFIC, NULL, NULL))
        return NID_undef;
    if (!next_tlv(&p, end, V_ASN1_SET, V_ASN1_UNIVERSAL, NULL, NULL)
        || !next_tlv(&p, end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, &c, &clen))
        return NID_undef;
    /* EncryptedContentInfo ::= SEQUENCE { contentType, contentEncryptionAlgorithm, ... } */
    p = c;
    end = c + clen;
    if (!next_tlv(&p, end, V_ASN1_OBJECT, V_ASN1_UNIVERSAL, NULL, NULL)
        || !next_tlv(&p, end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, &alg, &clen))
        return NID_undef;
    oid_start = alg;
    obj = d2i_ASN1_OBJECT(NULL, &oid_start, clen);
    if (obj == NULL)
        return NID_undef;
    nid = OBJ_obj2nid(obj);
    ASN1_OBJECT_free(obj);
    return nid;
}

/* Moves *p past one TLV of any tag; *start receives where it began. */
static int skip_tlv(const unsigned char **p, const unsigned char *end, const unsigned char **start)
{
    const unsigned char *q = *p;
    long len = 0;
    int tag = 0, xclass = 0, ret;

    if (q >= end)
        return 0;
    ret = ASN1_get_object(&q, &len, &tag, &xclass, (long)(end - q));
    if ((ret & 0x80) || ret == 0x21)
        return 0;
    if (start != NULL)
        *start = *p;
    *p = q + len;
    return 1;
}

int scep_envelope_ktri(const unsigned char *der, size_t len, const scep_buf *rid,
                       scep_buf *encrypted_key, scep_buf *encrypted_content_info)
{
    const unsigned char *p = der, *end = der + len, *c, *set, *set_end, *ri, *ri_end, *rid_start;
    const unsigned char *eci_start, *ek;
    long clen = 0, ek_len = 0;
    size_t rid_len;
    int found = 0;

    /* ContentInfo ::= SEQUENCE { contentType, [0] EXPLICIT EnvelopedData } */
    if (!next_tlv(&p, end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, &c, &clen))
        return 0;
    p = c;
    end = c + clen;
    if (!next_tlv(&p, end, V_ASN1_OBJECT, V_ASN1_UNIVERSAL, NULL, NULL)
        || !next_tlv(&p, end, 0, V_ASN1_CONTEXT_SPECIFIC, &c, &clen))
        return 0;
    p = c;
    end = c + clen;
    if (!next_tlv(&p, end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, &c, &clen))
        return 0;
    p = c;
    end = c + clen;
    if (!next_tlv(&p, end, V_ASN1_INTEGER, V_ASN1_UNIVERSAL, NULL, NULL))
        return 0;
    if (p < end && *p == 0xA0 && !next_tlv(&p, end, 0, V_ASN1_CONTEXT_SPECIFIC, NULL, NULL))
        return 0;
    if (!next_tlv(&p, end, V_ASN1_SET, V_ASN1_UNIVERSAL, &set, &clen))
        return 0;
    set_end = set + clen;
    eci_start = p;
    if (!next_tlv(&p, end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, NULL, NULL))
        return 0;
    encrypted_content_info->data = eci_start;
    encrypted_content_info->len = (size_t)(p - eci_start);
    /* KeyTransRecipientInfo ::= SEQUENCE { version, rid, keyEncryptionAlgorithm,
       encryptedKey OCTET STRING }; the other kinds are [1] to [4] (RFC 5652 6.2). */
    while (set < set_end) {
        if (*set != (V_ASN1_SEQUENCE | V_ASN1_CONSTRUCTED)) {
            if (!skip_tlv(&set, set_end, NULL))
                return 0;
            continue;
        }
        if (!next_tlv(&set, set_end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, &ri, &clen))
            return 0;
        ri_end = ri + clen;
        if (!next_tlv(&ri, ri_end, V_ASN1_INTEGER, V_ASN1_UNIVERSAL, NULL, NULL)
            || !skip_tlv(&ri, ri_end, &rid_start))
            return 0;
        rid_len = (size_t)(ri - rid_start);
        if (!next_tlv(&ri, ri_end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, NULL, NULL)
            || !next_tlv(&ri, ri_end, V_ASN1_OCTET_STRING, V_ASN1_UNIVERSAL, &ek, &ek_len))
            return 0;
        if (!found && rid_len == rid->len && memcmp(rid_start, rid->data, rid_len) == 0) {
            encrypted_key->data = ek;
            encrypted_key->len = (size_t)ek_len;
            found = 1;
        }
    }
    return found;
}

/* ---- writing ---------------------------------------------------------- */

static size_t len_octets(size_t n)
{
    size_t k = 1;

    if (n < 0x80)
        return 1;
    while (n > 0) {
        k++;
        n >>= 8;
    }
    return k;
}

static size_t tlv_size(size_t content)
{
    return 1 + len_octets(content) + content;
}

unsigned char *scep_der_put_header(unsigned char *p, unsigned char tag, size_t n)
{
    size_t k = len_octets(n), i;

    *p++ = tag;
    if (k == 1) {
        *p++ = (unsigned char)n;
        return p;
    }
    *p++ = (unsigned char)(0x80 | (k - 1));
    for (i = k - 1; i > 0; i--)
        *p++ = (unsigned char)(n >> (8 * (i - 1)));
    return p;
}

static unsigned char *put(unsigned char *p, const unsigned char *data, size_t n)
{
    if (n > 0)
        memcpy(p, data, n);
    return p + n;
}

int scep_encode_certs_only(const scep_buf *certs, const scep_buf *crls, scep_bytes *out)
{
    /* 1.2.840.113549.1.7.2 signedData and 1.2.840.113549.1.7.1 data */
    static const unsigned char oid_signed[] = {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                               0xF7, 0x0D, 0x01, 0x07, 0x02};
    static const unsigned char oid_data[] = {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86,
                                             0xF7, 0x0D, 0x01, 0x07, 0x01};
    static const unsigned char version_and_digests[] = {0x02, 0x01, 0x01, 0x31, 0x00};
    static const unsigned char empty_set[] = {0x31, 0x00};
    size_t ncert = certs->data != NULL ? certs->len : 0;
    size_t ncrl = crls->data != NULL ? crls->len : 0;
    size_t encap = tlv_size(sizeof(oid_data));
    size_t sd = sizeof(version_and_digests) + encap + (ncert ? tlv_size(ncert) : 0)
                + (ncrl ? tlv_size(ncrl) : 0) + sizeof(empty_set);
    size_t explicit0 = tlv_size(sd);
    size_t ci = sizeof(oid_signed) + tlv_size(explicit0);
    size_t total = tlv_size(ci);
    unsigned char *buf, *p;

    if (ncert > (size_t)SCEP_MAX_INPUT || ncrl > (size_t)SCEP_MAX_INPUT)
        return 0;
    buf = malloc(total);
    if (buf == NULL)
        return 0;
    p = scep_der_put_header(buf, 0x30, ci);
    p = put(p, oid_signed, sizeof(oid_signed));
    p = scep_der_put_header(p, 0xA0, explicit0);
    p = scep_der_put_header(p, 0x30, sd);
    p = put(p, version_and_digests, sizeof(version_and_digests));
    p = scep_der_put_header(p, 0x30, sizeof(oid_data));
    p = put(p, oid_data, sizeof(oid_data));
    if (ncert) {
        p = scep_der_put_header(p, 0xA0, ncert); /* certificates [0] IMPLICIT SET OF */
        p = put(p, certs->data, ncert);
    }
    if (ncrl) {
        p = scep_der_put_header(p, 0xA1, ncrl); /* crls [1] IMPLICIT SET OF */
        p = put(p, crls->data, ncrl);
    }
    p = put(p, empty_set, sizeof(empty_set));
    free(out->data);
    out->data = buf;
    out->len = (size_t)(p - buf);
    return out->len == total;
}

size_t scep_der_tlv_size(size_t content_len)
{
    return tlv_size(content_len);
}

int scep_der_tlv(unsigned char tag, const scep_buf *parts, size_t nparts, scep_bytes *out)
{
    size_t content = 0, i;
    unsigned char *buf, *p;

    for (i = 0; i < nparts; i++) {
        if (parts[i].len > (size_t)SCEP_MAX_INPUT)
            return 0;
        content += parts[i].len;
    }
    buf = malloc(tlv_size(content));
    if (buf == NULL)
        return 0;
    p = scep_der_put_header(buf, tag, content);
    for (i = 0; i < nparts; i++)
        p = put(p, parts[i].data, parts[i].len);
    free(out->data);
    out->data = buf;
    out->len = (size_t)(p - buf);
    return 1;
}

int scep_certs_only(scep_buf certs, scep_buf crls, scep_bytes *out, char *err, size_t err_len)
{
    if (out == NULL || !scep_encode_certs_only(&certs, &crls, out)) {
        scep_set_error(err, err_len, "cannot encode the certs-only SignedData");
        return 0;
    }
    return 1;
}
