/*
 * fuzz_http_head.c: scep_pki_post_length, the test that lets the refusal loop
 * answer a request 503 from its first bytes, on bytes a client chose.
 *
 * Input layout: two octets of max_body, then the bytes as they arrived.
 *
 * Besides memory safety, the checks are what the loop relies on: a length is
 * only ever given for bytes that begin "POST " and end their head with a blank
 * line inside the first SCEP_HTTP_MAX_HEAD octets, the body it counts is at
 * most max_body, the answer depends only on the head (more bytes after it
 * change nothing), and a head cut short is never taken for a whole one.
 */
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"

static const unsigned char *head_end(const unsigned char *p, size_t n)
{
    size_t i;

    for (i = 0; i + 4 <= n && i + 4 <= SCEP_HTTP_MAX_HEAD; i++)
        if (memcmp(p + i, "\r\n\r\n", 4) == 0)
            return p + i;
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size};
    size_t max_body = fuzz_u16(&in);
    long total = scep_pki_post_length(in.p, in.n, max_body);
    const unsigned char *end = head_end(in.p, in.n);

    if (total != SCEP_HTTP_OTHER && total != SCEP_HTTP_INCOMPLETE && total <= 0)
        abort();
    if (end == NULL) {
        /* No blank line yet: waiting for more, or too long to be one. */
        if (total != (in.n < SCEP_HTTP_MAX_HEAD ? SCEP_HTTP_INCOMPLETE : SCEP_HTTP_OTHER))
            abort();
        return 0;
    }
    if (total == SCEP_HTTP_INCOMPLETE)
        abort();
    if (total > 0) {
        size_t head = (size_t)(end - in.p) + 4;
        unsigned char *copy;
        if (in.n < 5 || memcmp(in.p, "POST ", 5) != 0)
            abort();
        if ((size_t)total < head || (size_t)total - head > max_body)
            abort();
        /* The head alone gives the same answer; cut inside it, it is not whole. */
        copy = malloc(head);
        if (copy == NULL)
            abort();
        memcpy(copy, in.p, head);
        if (scep_pki_post_length(copy, head, max_body) != total)
            abort();
        if (scep_pki_post_length(copy, head - 1, max_body) != SCEP_HTTP_INCOMPLETE)
            abort();
        free(copy);
    }
    return 0;
}
