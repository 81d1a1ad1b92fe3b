/*
 * errors.c: turns OpenSSL's per-thread error queue into one line of text.
 *
 * The queue belongs to the calling thread and a batch may run on any thread,
 * so every failure path drains it here, and every item clears it on the way out.
 */
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>

#include "internal.h"

void scep_set_error(char *buf, size_t len, const char *what)
{
    size_t used;
    unsigned long code;
    const char *data = NULL;
    int flags = 0;
    int first = 1;

    if (buf == NULL || len == 0) {
        ERR_clear_error();
        return;
    }
    snprintf(buf, len, "%s", what);
    used = strlen(buf);
    while ((code = ERR_get_error_all(NULL, NULL, NULL, &data, &flags)) != 0) {
        char reason[256];

        if (used + 4 >= len)
            continue; /* keep draining; the text is full */
        ERR_error_string_n(code, reason, sizeof(reason));
        snprintf(buf + used, len - used, "%s%s", first ? ": " : "; ", reason);
        first = 0;
        used = strlen(buf);
        if ((flags & ERR_TXT_STRING) && data != NULL && data[0] != '\0' && used + 4 < len) {
            snprintf(buf + used, len - used, " (%s)", data);
            used = strlen(buf);
        }
    }
}
