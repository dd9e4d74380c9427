/*
 * zviz/_flight.c: the fast half of two checks of direct egress (docs/network.md),
 * for the pump's thread (zviz/_pump.c): a connection's first flight, and a
 * DNS query.
 *
 * The authority is Python's (zviz/_egressproto.py, zviz/_dns.py): these
 * functions only ever say "yes, plainly" or "not me". A first flight passes
 * here only when it is one whole thing Python would pass too, with nothing
 * after it:
 *   - a TLS record holding a whole ClientHello, extensions well formed, no
 *     type twice, no ECH, exactly one host_name in server_name, of the
 *     characters TLS names are made of, equal (case aside, one final dot
 *     aside) to the connection's name;
 *   - an HTTP/1.x request head in origin form, printable bytes only, no
 *     folded lines, at most MAX_HEADERS headers, exactly one Host, which is
 *     the name (case and final dots aside) with no port or the port.
 * Anything else (incomplete, malformed, ambiguous, refused) is Python's:
 * FLIGHT_MORE (wait for more) or FLIGHT_PYTHON. tests/test_flight.py holds
 * Python to that: whatever this passes, Python's check passes.
 */
#include <stdint.h>
#include <string.h>

#include "_flight.h"

#define MAX_HEAD (16 * 1024)
#define MAX_HEADERS 100
#define MAX_METHOD 32
#define EXT_SERVER_NAME 0
#define EXT_ECH 0xFE0D
#define EXT_ECH_OUTER 0xFD00
#define MAX_EXTENSIONS 64

static unsigned
u16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static int
lower(int c)
{
    return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

/* `s` (n bytes) names `name`: equal but for case and its final dot (all of them with `all_dots`). */
static int
same_name(const unsigned char *s, size_t n, const char *name, int all_dots)
{
    if (all_dots) {
        while (n && s[n - 1] == '.')
            n--;
    } else if (n && s[n - 1] == '.') {
        n--;
    }
    size_t m = strlen(name);
    while (m && name[m - 1] == '.')
        m--;
    if (n != m || n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (lower(s[i]) != lower((unsigned char)name[i]))
            return 0;
    return 1;
}

/* TLS's host name characters: [A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.? */
static int
sni_chars(const unsigned char *s, size_t n)
{
    if (n == 0)
        return 0;
    int prev_dot = 1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '.') {
            if (prev_dot)
                return 0;
            prev_dot = 1;
        } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                   c == '-') {
            prev_dot = 0;
        } else {
            return 0;
        }
    }
    return 1;
}

static int
tls(const unsigned char *b, size_t len, const char *name)
{
    if (len < 5)
        return FLIGHT_MORE;
    if (b[1] != 3)
        return FLIGHT_PYTHON;
    size_t rec = u16(b + 3);
    if (rec == 0 || rec > 16384 + 256)
        return FLIGHT_PYTHON;
    if (len < 5 + rec)
        return FLIGHT_MORE;
    if (len != 5 + rec)
        return FLIGHT_PYTHON; /* more than one record: Python's */
    const unsigned char *m = b + 5;
    if (rec < 4 || m[0] != 1)
        return FLIGHT_PYTHON;
    size_t hlen = (size_t)m[1] << 16 | (size_t)m[2] << 8 | m[3];
    if (4 + hlen != rec)
        return FLIGHT_PYTHON; /* split across records, or something after it */
    const unsigned char *p = m + 4, *end = m + 4 + hlen;
    if (end - p < 35)
        return FLIGHT_PYTHON;
    p += 34;                /* legacy_version, random */
    p += 1 + p[0];          /* session id */
    if (end - p < 2)
        return FLIGHT_PYTHON;
    p += 2 + u16(p);        /* cipher suites */
    if (end - p < 1)
        return FLIGHT_PYTHON;
    p += 1 + p[0];          /* compression methods */
    if (end - p < 2)
        return FLIGHT_PYTHON; /* (none: no server name) */
    size_t elen = u16(p);
    p += 2;
    if ((size_t)(end - p) != elen)
        return FLIGHT_PYTHON;
    unsigned seen[MAX_EXTENSIONS];
    int nseen = 0, found = 0;
    while (p < end) {
        if (end - p < 4 || nseen == MAX_EXTENSIONS)
            return FLIGHT_PYTHON;
        unsigned type = u16(p), dlen = u16(p + 2);
        p += 4;
        if ((size_t)(end - p) < dlen)
            return FLIGHT_PYTHON;
        for (int i = 0; i < nseen; i++)
            if (seen[i] == type)
                return FLIGHT_PYTHON;
        seen[nseen++] = type;
        if (type == EXT_ECH || type == EXT_ECH_OUTER)
            return FLIGHT_PYTHON;
        if (type == EXT_SERVER_NAME) {
            const unsigned char *q = p, *qend = p + dlen;
            if (dlen < 2 || u16(q) != dlen - 2u)
                return FLIGHT_PYTHON;
            q += 2;
            int hosts = 0;
            const unsigned char *host = NULL;
            size_t host_len = 0;
            while (q < qend) {
                if (qend - q < 3)
                    return FLIGHT_PYTHON;
                unsigned kind = q[0], n = u16(q + 1);
                q += 3;
                if ((size_t)(qend - q) < n)
                    return FLIGHT_PYTHON;
                if (kind == 0) {
                    hosts++;
                    host = q;
                    host_len = n;
                }
                q += n;
            }
            if (hosts != 1 || !sni_chars(host, host_len) || !same_name(host, host_len, name, 0))
                return FLIGHT_PYTHON;
            found = 1;
        }
        p += dlen;
    }
    return found ? FLIGHT_OK : FLIGHT_PYTHON;
}

static int
token_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* The Host value names `name` (and `port`, when it has one): Python's
 * parse_authority and _same_authority, for a name (an IPv6 literal is Python's). */
static int
host_ok(const unsigned char *v, size_t n, const char *name, int port)
{
    if (n == 0 || v[0] == '[')
        return 0;
    for (size_t i = 0; i < n; i++)
        if (v[i] == '@' || v[i] == ' ' || v[i] == '\t' || v[i] == '\\' || v[i] == '/' || v[i] == '?' ||
            v[i] == '#' || v[i] == '%' || v[i] > 0x7e || v[i] < 0x21)
            return 0;
    size_t colon = n;
    for (size_t i = n; i-- > 0;)
        if (v[i] == ':') {
            colon = i;
            break;
        }
    for (size_t i = 0; i < colon; i++)
        if (v[i] == ':')
            return 0;
    if (colon < n) {
        size_t digits = n - colon - 1;
        if (digits == 0 || digits > 5)
            return 0;
        long value = 0;
        for (size_t i = colon + 1; i < n; i++) {
            if (v[i] < '0' || v[i] > '9')
                return 0;
            value = value * 10 + (v[i] - '0');
        }
        if (value != port)
            return 0;
    }
    return colon > 0 && same_name(v, colon, name, 1);
}

static int
http(const unsigned char *b, size_t len, const char *name, int port)
{
    size_t end = 0;
    int found = 0;
    for (size_t i = 0; i + 3 < len && i < MAX_HEAD + 4; i++)
        if (b[i] == '\r' && b[i + 1] == '\n' && b[i + 2] == '\r' && b[i + 3] == '\n') {
            end = i;
            found = 1;
            break;
        }
    if (!found)
        return len > MAX_HEAD ? FLIGHT_PYTHON : FLIGHT_MORE;
    if (end + 4 != len)
        return FLIGHT_PYTHON; /* a body, or a second request: Python's */
    for (size_t i = 0; i < end; i++)
        if (!(b[i] == '\t' || b[i] == '\r' || b[i] == '\n' || (b[i] >= 0x20 && b[i] <= 0x7e)))
            return FLIGHT_PYTHON;
    /* the request line */
    size_t i = 0, sp1 = 0, sp2 = 0;
    while (i < end && b[i] != '\r' && b[i] != '\n') {
        if (b[i] == ' ') {
            if (!sp1)
                sp1 = i;
            else if (!sp2)
                sp2 = i;
            else
                return FLIGHT_PYTHON;
        }
        i++;
    }
    if (!sp1 || !sp2 || sp1 > MAX_METHOD || (i < end && (b[i] != '\r' || b[i + 1] != '\n')))
        return FLIGHT_PYTHON;
    for (size_t k = 0; k < sp1; k++)
        if (!token_char(b[k]))
            return FLIGHT_PYTHON;
    if (sp1 == 7 && !memcmp(b, "CONNECT", 7))
        return FLIGHT_PYTHON;
    if (b[sp1 + 1] != '/' || sp2 == sp1 + 1)
        return FLIGHT_PYTHON;
    size_t vlen = i - sp2 - 1;
    if (vlen != 8 || (memcmp(b + sp2 + 1, "HTTP/1.1", 8) && memcmp(b + sp2 + 1, "HTTP/1.0", 8)))
        return FLIGHT_PYTHON;
    /* the headers */
    int headers = 0, hosts = 0, host_good = 0;
    size_t at = i + 2;
    while (at < end) {
        size_t e = at;
        while (e < end && b[e] != '\r' && b[e] != '\n')
            e++;
        if (e < end && (b[e] != '\r' || b[e + 1] != '\n'))
            return FLIGHT_PYTHON; /* a bare CR or LF */
        if (b[at] == ' ' || b[at] == '\t')
            return FLIGHT_PYTHON; /* folded */
        size_t colon = at;
        while (colon < e && b[colon] != ':')
            colon++;
        if (colon == e || colon == at)
            return FLIGHT_PYTHON;
        for (size_t k = at; k < colon; k++)
            if (!token_char(b[k]))
                return FLIGHT_PYTHON;
        if (++headers > MAX_HEADERS)
            return FLIGHT_PYTHON;
        if (colon - at == 4 && lower(b[at]) == 'h' && lower(b[at + 1]) == 'o' && lower(b[at + 2]) == 's' &&
            lower(b[at + 3]) == 't') {
            size_t vs = colon + 1, ve = e;
            while (vs < ve && (b[vs] == ' ' || b[vs] == '\t'))
                vs++;
            while (ve > vs && (b[ve - 1] == ' ' || b[ve - 1] == '\t'))
                ve--;
            hosts++;
            host_good = host_ok(b + vs, ve - vs, name, port);
        }
        at = e + 2;
    }
    return hosts == 1 && host_good ? FLIGHT_OK : FLIGHT_PYTHON;
}

int
flight_check(const unsigned char *buf, size_t len, const char *name, int port)
{
    if (len == 0)
        return FLIGHT_MORE;
    if (buf[0] == 0x16)
        return tls(buf, len, name);
    if (buf[0] == 0x04 || buf[0] == 0x05)
        return FLIGHT_PYTHON;
    return http(buf, len, name, port);
}

/* ---------------------------------------------------------------- DNS */

int
dns_query_name(const unsigned char *q, size_t len, char *name, size_t name_size, unsigned *qtype,
               size_t *question_end)
{
    if (len < 12 || len > 512)
        return -1;
    unsigned flags = u16(q + 2);
    if (flags & 0x8000 || flags & 0x7800 || u16(q + 4) != 1 || u16(q + 6) || u16(q + 8))
        return -1; /* a response, not a standard query, not one question: Python's */
    size_t pos = 12, out = 0, total = 0;
    for (;;) {
        if (pos >= len)
            return -1;
        unsigned n = q[pos++];
        if (n == 0)
            break;
        if (n & 0xC0 || pos + n > len)
            return -1;
        total += n + 1;
        if (total > 255 || out + n + 2 > name_size)
            return -1;
        if (out)
            name[out++] = '.';
        for (unsigned k = 0; k < n; k++) {
            unsigned char c = q[pos + k];
            if (c < 0x21 || c > 0x7e || c == '.')
                return -1;
            name[out++] = (char)lower(c);
        }
        pos += n;
    }
    if (pos + 4 > len || !out)
        return -1;
    name[out] = 0;
    *qtype = u16(q + pos);
    if (u16(q + pos + 2) != 1)
        return -1; /* not class IN */
    *question_end = pos + 4;
    return 0;
}

size_t
dns_answer(const unsigned char *q, size_t question_end, unsigned qtype, const unsigned char addr[4],
           unsigned char *out, size_t out_size)
{
    size_t n = question_end + (qtype == 1 ? 16 : 0);
    if (n > out_size)
        return 0;
    memcpy(out, q, question_end);
    unsigned rd = u16(q + 2) & 0x0100;
    unsigned flags = 0x8000 | 0x0400 | rd | 0x0080; /* QR, AA, RD as asked, RA; NOERROR */
    out[2] = (unsigned char)(flags >> 8);
    out[3] = (unsigned char)flags;
    out[4] = 0, out[5] = 1;
    out[6] = 0, out[7] = qtype == 1;
    memset(out + 8, 0, 4);
    if (qtype == 1) {
        static const unsigned char rr[12] = {0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4}; /* A IN TTL 5, 4 bytes */
        memcpy(out + question_end, rr, 12);
        memcpy(out + question_end + 12, addr, 4);
    }
    return n;
}
