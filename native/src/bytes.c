/*
 * bytes.c: owned output buffers and input sanity.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int scep_bytes_set(scep_bytes *b, const unsigned char *data, size_t len)
{
    /* malloc(0) may return NULL; always allocate at least one byte. */
    unsigned char *copy = malloc(len > 0 ? len : 1);

    if (copy == NULL)
        return 0;
    if (len > 0)
        memcpy(copy, data, len);
    free(b->data);
    b->data = copy;
    b->len = len;
    return 1;
}

void scep_bytes_clear(scep_bytes *b)
{
    if (b == NULL)
        return;
    free(b->data);
    b->data = NULL;
    b->len = 0;
}

void scep_bytes_free(scep_bytes *b)
{
    scep_bytes_clear(b);
}

int scep_input_ok(const unsigned char *data, size_t len)
{
    return data != NULL && len > 0 && len <= (size_t)SCEP_MAX_INPUT;
}
