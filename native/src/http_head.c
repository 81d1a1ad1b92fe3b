/*
 * http_head.c: recognising a plain PKIOperation POST from its first bytes.
 *
 * Under overload most requests are answered 503 before anything is spent on
 * them. This is the test that decides which may be: one whole HTTP/1.1 POST
 * to the SCEP path with operation=PKIOperation, its body sized by one
 * Content-Length, and none of the headers that change how the request is
 * read or the connection kept. Anything else takes the ordinary path.
 */
#include <string.h>

#include "scep_native.h"

static const char *const PREFIXES[] = {"/scep", "/cgi-bin/pkiclient.exe"};
/* With any of these the request takes the ordinary path. */
static const char *const UNUSUAL[] = {"transfer-encoding", "connection", "expect", "upgrade"};
#define MAX_LENGTH_DIGITS 9

static int is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* [*start, *end) without surrounding white space. */
static void trim(const unsigned char *s, size_t *start, size_t *end)
{
    while (*start < *end && is_space(s[*start]))
        (*start)++;
    while (*end > *start && is_space(s[*end - 1]))
        (*end)--;
}

static int equals_lower(const unsigned char *s, size_t len, const char *lower)
{
    size_t i;

    if (strlen(lower) != len)
        return 0;
    for (i = 0; i < len; i++) {
        unsigned char c = s[i];
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c - 'A' + 'a');
        if (c != (unsigned char)lower[i])
            return 0;
    }
    return 1;
}

static int equals(const unsigned char *s, size_t len, const char *text)
{
    return strlen(text) == len && memcmp(s, text, len) == 0;
}

static const unsigned char *find(const unsigned char *s, size_t len, const char *what)
{
    size_t n = strlen(what), i;

    for (i = 0; i + n <= len; i++)
        if (memcmp(s + i, what, n) == 0)
            return s + i;
    return NULL;
}

/* The request target: a SCEP path whose query has operation=PKIOperation. */
static int pki_operation_target(const unsigned char *t, size_t len)
{
    const unsigned char *question = memchr(t, '?', len);
    size_t path_len = question != NULL ? (size_t)(question - t) : len, i;
    int scep_path = 0;

    for (i = 0; i < sizeof(PREFIXES) / sizeof(PREFIXES[0]); i++) {
        size_t n = strlen(PREFIXES[i]);
        if (path_len >= n && memcmp(t, PREFIXES[i], n) == 0)
            scep_path = 1;
    }
    if (!scep_path || question == NULL)
        return 0;
    /* One of the &-separated fields is exactly operation=PKIOperation. */
    {
        const unsigned char *field = question + 1, *end = t + len;
        while (field <= end) {
            const unsigned char *amp = memchr(field, '&', (size_t)(end - field));
            const unsigned char *stop = amp != NULL ? amp : end;
            if (equals(field, (size_t)(stop - field), "operation=PKIOperation"))
                return 1;
            if (amp == NULL)
                break;
            field = amp + 1;
        }
    }
    return 0;
}

/* "POST <target> HTTP/1.1", split on single spaces into exactly three parts. */
static int pki_post_line(const unsigned char *line, size_t len)
{
    const unsigned char *first = memchr(line, ' ', len), *second;

    if (first == NULL || !equals(line, (size_t)(first - line), "POST"))
        return 0;
    second = memchr(first + 1, ' ', len - (size_t)(first + 1 - line));
    if (second == NULL)
        return 0;
    if (memchr(second + 1, ' ', len - (size_t)(second + 1 - line)) != NULL)
        return 0;
    if (!equals(second + 1, len - (size_t)(second + 1 - line), "HTTP/1.1"))
        return 0;
    return pki_operation_target(first + 1, (size_t)(second - first - 1));
}

/* The Content-Length of the header fields [s, s + len), one line each; -1 if
   absent, SCEP_HTTP_OTHER if unusual (a second one, not digits, or a header
   in UNUSUAL). */
static long content_length(const unsigned char *s, size_t len)
{
    long length = -1;
    size_t at = 0, i;

    for (;;) {
        const unsigned char *crlf = find(s + at, len - at, "\r\n");
        size_t line_end = crlf != NULL ? (size_t)(crlf - s) : len;
        const unsigned char *colon = memchr(s + at, ':', line_end - at);
        size_t name_start = at, name_end = colon != NULL ? (size_t)(colon - s) : line_end;

        trim(s, &name_start, &name_end);
        for (i = 0; i < sizeof(UNUSUAL) / sizeof(UNUSUAL[0]); i++)
            if (equals_lower(s + name_start, name_end - name_start, UNUSUAL[i]))
                return SCEP_HTTP_OTHER;
        if (equals_lower(s + name_start, name_end - name_start, "content-length")) {
            size_t value_start = colon != NULL ? (size_t)(colon - s) + 1 : line_end;
            size_t value_end = line_end, digits = 0;

            trim(s, &value_start, &value_end);
            digits = value_end - value_start;
            if (length >= 0 || digits == 0 || digits > MAX_LENGTH_DIGITS)
                return SCEP_HTTP_OTHER;
            length = 0;
            for (i = value_start; i < value_end; i++) {
                if (s[i] < '0' || s[i] > '9')
                    return SCEP_HTTP_OTHER;
                length = length * 10 + (s[i] - '0');
            }
        }
        if (crlf == NULL)
            return length;
        at = line_end + 2;
    }
}

long scep_pki_post_length(const unsigned char *data, size_t len, size_t max_body)
{
    size_t window = len < SCEP_HTTP_MAX_HEAD ? len : SCEP_HTTP_MAX_HEAD;
    const unsigned char *end = data != NULL ? find(data, window, "\r\n\r\n") : NULL;
    const unsigned char *crlf;
    size_t head_len, line_len;
    long length;

    if (end == NULL)
        return len < SCEP_HTTP_MAX_HEAD ? SCEP_HTTP_INCOMPLETE : SCEP_HTTP_OTHER;
    head_len = (size_t)(end - data);
    crlf = find(data, head_len, "\r\n");
    line_len = crlf != NULL ? (size_t)(crlf - data) : head_len;
    if (!pki_post_line(data, line_len))
        return SCEP_HTTP_OTHER;
    length = crlf != NULL ? content_length(crlf + 2, head_len - line_len - 2) : -1;
    if (length < 0 || (size_t)length > max_body)
        return SCEP_HTTP_OTHER;
    return (long)head_len + 4 + length;
}
