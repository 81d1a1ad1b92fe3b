/*
 * http_head.c: recognising a plain PKIOperation POST from its first bytes.
 *
 * Under overload most requests are answered 503 before anything is spent on
 * them. This is the test that decides which may be: one whole HTTP/1.1 POST
 * to the SCEP path with one operation, PKIOperation, a Host header, its body
 * sized by one non-zero Content-Length, and none of the headers that change
 * how the request is read or the connection kept. The head must be plain
 * enough that any HTTP/1.1 parser frames it the same way (lines end in CRLF
 * and nowhere else, no folded lines, no space before a colon, no control
 * characters), or the bytes after what we take for its end could be read
 * as another request by a proxy in front of us. Anything else takes the
 * ordinary path, which answers it as the HTTP parser and the app decide.
 */
#include <string.h>

#include "scep_native.h"

static const char *const PREFIXES[] = {"/scep", "/cgi-bin/pkiclient.exe"};
/* With any of these the request takes the ordinary path. */
static const char *const UNUSUAL[] = {"transfer-encoding", "connection", "expect", "upgrade"};
#define MAX_LENGTH_DIGITS 9

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

/* The request target: a SCEP path whose query names one operation, PKIOperation. */
static int pki_operation_target(const unsigned char *t, size_t len)
{
    const unsigned char *question = memchr(t, '?', len);
    size_t path_len = question != NULL ? (size_t)(question - t) : len, i;
    int scep_path = 0, operations = 0, pki_operation = 0;

    for (i = 0; i < len; i++)
        if (t[i] <= ' ' || t[i] >= 0x7f)
            return 0;  /* a request target is visible characters only */
    if (memchr(t, '#', len) != NULL)
        return 0;  /* a fragment: the parser's reading of the query may differ */
    for (i = 0; i < sizeof(PREFIXES) / sizeof(PREFIXES[0]); i++) {
        size_t n = strlen(PREFIXES[i]);
        if (path_len >= n && memcmp(t, PREFIXES[i], n) == 0)
            scep_path = 1;
    }
    if (!scep_path || question == NULL)
        return 0;
    /* The &-separated fields: one operation=..., and it is PKIOperation. */
    {
        const unsigned char *field = question + 1, *end = t + len;
        while (field <= end) {
            const unsigned char *amp = memchr(field, '&', (size_t)(end - field));
            const unsigned char *stop = amp != NULL ? amp : end;
            size_t n = (size_t)(stop - field);
            if (n >= 10 && memcmp(field, "operation=", 10) == 0) {
                operations++;
                pki_operation = equals(field, n, "operation=PKIOperation");
            }
            if (amp == NULL)
                break;
            field = amp + 1;
        }
    }
    return operations == 1 && pki_operation;
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

static int is_token_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
           || (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Lines end in CRLF and nowhere else, and hold no other control character
   than a tab: [s, s + len) is the head with its blank line. */
static int plain_lines(const unsigned char *s, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++) {
        unsigned char c = s[i];
        if (c == '\r') {
            if (i + 1 >= len || s[i + 1] != '\n')
                return 0;
            i++;
        } else if ((c < 0x20 && c != '\t') || c == 0x7f) {
            return 0;
        }
    }
    return 1;
}

/* The Content-Length of the header fields [s, s + len), one line each, or
   SCEP_HTTP_OTHER: a line that is folded, has no colon or a name that is not
   a token; no Host or more than one; a header in UNUSUAL; no Content-Length,
   more than one, or one that is not 1 to 9 digits or is zero. */
static long content_length(const unsigned char *s, size_t len)
{
    long length = -1;
    size_t at = 0, hosts = 0, i;

    for (;;) {
        const unsigned char *crlf = find(s + at, len - at, "\r\n");
        size_t line_end = crlf != NULL ? (size_t)(crlf - s) : len;
        const unsigned char *colon = memchr(s + at, ':', line_end - at);
        size_t name_end, value_start, value_end;

        if (colon == NULL || colon == s + at)
            return SCEP_HTTP_OTHER;  /* no name (a folded line starts with a space) */
        name_end = (size_t)(colon - s);
        for (i = at; i < name_end; i++)
            if (!is_token_char(s[i]))
                return SCEP_HTTP_OTHER;
        value_start = name_end + 1;
        value_end = line_end;
        while (value_start < value_end && (s[value_start] == ' ' || s[value_start] == '\t'))
            value_start++;
        while (value_end > value_start && (s[value_end - 1] == ' ' || s[value_end - 1] == '\t'))
            value_end--;
        for (i = 0; i < sizeof(UNUSUAL) / sizeof(UNUSUAL[0]); i++)
            if (equals_lower(s + at, name_end - at, UNUSUAL[i]))
                return SCEP_HTTP_OTHER;
        if (equals_lower(s + at, name_end - at, "host"))
            hosts++;
        if (equals_lower(s + at, name_end - at, "content-length")) {
            size_t digits = value_end - value_start;
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
            break;
        at = line_end + 2;
    }
    return hosts == 1 && length > 0 ? length : SCEP_HTTP_OTHER;
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
    if (!plain_lines(data, head_len + 4))
        return SCEP_HTTP_OTHER;
    crlf = find(data, head_len, "\r\n");
    line_len = crlf != NULL ? (size_t)(crlf - data) : head_len;
    if (!pki_post_line(data, line_len))
        return SCEP_HTTP_OTHER;
    length = crlf != NULL ? content_length(crlf + 2, head_len - line_len - 2) : SCEP_HTTP_OTHER;
    if (length < 0 || (size_t)length > max_body)
        return SCEP_HTTP_OTHER;
    return (long)head_len + 4 + length;
}
