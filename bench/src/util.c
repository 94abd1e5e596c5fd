/*
 * Small helpers: clocks, base64, HS256 JWT, WebSocket accept key,
 * /proc readers and a minimal JSON path lookup.
 */

#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "cb.h"


uint64_t
cb_now(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t) ts.tv_sec * CB_NS + (uint64_t) ts.tv_nsec;
}


uint64_t
cb_wall_ms(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_REALTIME, &ts);

    return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}


double
cb_cpu_seconds(void)
{
    struct rusage  ru;

    getrusage(RUSAGE_SELF, &ru);

    return (double) ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6
           + (double) ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}


static size_t
cb_b64_common(const unsigned char *in, size_t len, char *out,
    const char *tab, int pad)
{
    size_t    i, n;
    uint32_t  v;

    n = 0;

    for (i = 0; i + 2 < len; i += 3) {
        v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8 | in[i + 2];
        out[n++] = tab[v >> 18 & 63];
        out[n++] = tab[v >> 12 & 63];
        out[n++] = tab[v >> 6 & 63];
        out[n++] = tab[v & 63];
    }

    if (len - i == 1) {
        v = (uint32_t) in[i] << 16;
        out[n++] = tab[v >> 18 & 63];
        out[n++] = tab[v >> 12 & 63];
        if (pad) {
            out[n++] = '=';
            out[n++] = '=';
        }

    } else if (len - i == 2) {
        v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8;
        out[n++] = tab[v >> 18 & 63];
        out[n++] = tab[v >> 12 & 63];
        out[n++] = tab[v >> 6 & 63];
        if (pad) {
            out[n++] = '=';
        }
    }

    out[n] = '\0';

    return n;
}


size_t
cb_b64url(const unsigned char *in, size_t len, char *out)
{
    return cb_b64_common(in, len, out,
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
        0);
}


size_t
cb_b64(const unsigned char *in, size_t len, char *out)
{
    return cb_b64_common(in, len, out,
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        1);
}


/*
 * HS256 JWT for user sub: {"alg":"HS256","typ":"JWT"} . claims . HMAC.
 * Returns the token length, 0 on error.
 */
size_t
cb_jwt_hs256(const cb_opt_t *o, const char *sub, char *out, size_t cap)
{
    char           claims[256];
    unsigned char  mac[EVP_MAX_MD_SIZE];
    unsigned int   maclen;
    size_t         n, hl;
    long           now;
    int            cl;

    static const char  hdr[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";

    now = (long) (cb_wall_ms() / 1000);

    cl = snprintf(claims, sizeof(claims),
                  "{\"sub\":\"%s\",\"name\":\"%s\",\"iat\":%ld,\"exp\":%ld}",
                  sub, sub, now - 5, now + (long) o->token_ttl);
    if (cl <= 0 || (size_t) cl >= sizeof(claims)) {
        return 0;
    }

    if (cap < (sizeof(hdr) + (size_t) cl + 64) * 4 / 3 + 8) {
        return 0;
    }

    hl = cb_b64url((const unsigned char *) hdr, sizeof(hdr) - 1, out);
    out[hl] = '.';
    n = hl + 1;
    n += cb_b64url((const unsigned char *) claims, (size_t) cl, out + n);

    if (HMAC(EVP_sha256(), o->secret, (int) o->secret_len,
             (const unsigned char *) out, n, mac, &maclen) == NULL)
    {
        return 0;
    }

    out[n++] = '.';
    n += cb_b64url(mac, maclen, out + n);

    return n;
}


void
cb_ws_accept(const char *key, char *out)
{
    char           buf[128];
    unsigned char  md[SHA_DIGEST_LENGTH];
    int            n;

    n = snprintf(buf, sizeof(buf), "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11",
                 key);
    SHA1((const unsigned char *) buf, (size_t) n, md);
    cb_b64(md, SHA_DIGEST_LENGTH, out);
}


/* xorshift64*: masks, choices; not for secrets */
uint64_t
cb_rand(uint64_t *s)
{
    uint64_t  x;

    x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;

    return x * 0x2545F4914F6CDD1DULL;
}


long
cb_rss_kb(pid_t pid)
{
    FILE  *f;
    char   path[64], line[256];
    long   kb;

    snprintf(path, sizeof(path), "/proc/%d/status", (int) pid);

    f = fopen(path, "r");
    if (f == NULL) {
        return -1;
    }

    kb = -1;

    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kb = strtol(line + 6, NULL, 10);
            break;
        }
    }

    fclose(f);

    return kb;
}


/* the children of ppid, read from /proc/<pid>/stat (field 4) */
int
cb_children(pid_t ppid, pid_t *out, int max)
{
    DIR            *d;
    FILE           *f;
    struct dirent  *de;
    char            path[300], buf[512], *p;
    int             n, pp;

    d = opendir("/proc");
    if (d == NULL) {
        return 0;
    }

    n = 0;

    while (n < max && (de = readdir(d)) != NULL) {
        if (!isdigit((unsigned char) de->d_name[0])) {
            continue;
        }

        snprintf(path, sizeof(path), "/proc/%s/stat", de->d_name);

        f = fopen(path, "r");
        if (f == NULL) {
            continue;
        }

        if (fgets(buf, sizeof(buf), f) != NULL) {
            p = strrchr(buf, ')');
            if (p != NULL && sscanf(p + 1, " %*c %d", &pp) == 1
                && pp == (int) ppid)
            {
                out[n++] = (pid_t) atoi(de->d_name);
            }
        }

        fclose(f);
    }

    closedir(d);

    return n;
}


/* like pgrep -f: processes whose command line contains pattern */
int
cb_match_procs(const char *pattern, pid_t *out, int max)
{
    DIR            *d;
    FILE           *f;
    struct dirent  *de;
    char            path[300], buf[4096];
    size_t          n, i;
    int             cnt;
    pid_t           self;

    d = opendir("/proc");
    if (d == NULL) {
        return 0;
    }

    cnt = 0;
    self = getpid();

    while (cnt < max && (de = readdir(d)) != NULL) {
        if (!isdigit((unsigned char) de->d_name[0])
            || atoi(de->d_name) == (int) self)
        {
            continue;
        }

        snprintf(path, sizeof(path), "/proc/%s/cmdline", de->d_name);

        f = fopen(path, "r");
        if (f == NULL) {
            continue;
        }

        n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);

        for (i = 0; i < n; i++) {
            if (buf[i] == '\0') {
                buf[i] = ' ';
            }
        }
        buf[n] = '\0';

        if (n > 0 && strstr(buf, pattern) != NULL) {
            out[cnt++] = (pid_t) atoi(de->d_name);
        }
    }

    closedir(d);

    return cnt;
}


/* ---- minimal JSON ---- */

static const char *
cb_json_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        p++;
    }

    return p;
}


/* skip one value; returns the byte after it or NULL */
static const char *
cb_json_skip(const char *p, const char *e, int depth)
{
    p = cb_json_ws(p, e);
    if (p >= e || depth > 64) {
        return NULL;
    }

    switch (*p) {

    case '"':
        for (p++; p < e; p++) {
            if (*p == '\\') {
                p++;
            } else if (*p == '"') {
                return p + 1;
            }
        }
        return NULL;

    case '{':
    case '[':
        {
            char  close = (*p == '{') ? '}' : ']';
            int   obj = (*p == '{');

            p = cb_json_ws(p + 1, e);
            if (p < e && *p == close) {
                return p + 1;
            }

            for ( ;; ) {
                if (obj) {
                    p = cb_json_skip(p, e, depth + 1);    /* key */
                    if (p == NULL) {
                        return NULL;
                    }
                    p = cb_json_ws(p, e);
                    if (p >= e || *p != ':') {
                        return NULL;
                    }
                    p++;
                }

                p = cb_json_skip(p, e, depth + 1);
                if (p == NULL) {
                    return NULL;
                }

                p = cb_json_ws(p, e);
                if (p >= e) {
                    return NULL;
                }

                if (*p == close) {
                    return p + 1;
                }

                if (*p != ',') {
                    return NULL;
                }

                p++;
            }
        }

    default:
        while (p < e && *p != ',' && *p != '}' && *p != ']' && *p != ' '
               && *p != '\n' && *p != '\r' && *p != '\t')
        {
            p++;
        }
        return p;
    }
}


int
cb_json_get(const char *p, size_t len, const char *path, cb_jv_t *v)
{
    const char  *e, *seg, *k, *ke, *ve;
    size_t       sl;

    e = p + len;
    seg = path;

    for ( ;; ) {
        sl = strcspn(seg, ".");

        p = cb_json_ws(p, e);
        if (p >= e || *p != '{') {
            return -1;
        }
        p++;

        for ( ;; ) {
            p = cb_json_ws(p, e);
            if (p >= e || *p != '"') {
                return -1;
            }

            k = p + 1;
            p = cb_json_skip(p, e, 0);
            if (p == NULL) {
                return -1;
            }
            ke = p - 1;

            p = cb_json_ws(p, e);
            if (p >= e || *p != ':') {
                return -1;
            }
            p = cb_json_ws(p + 1, e);

            if ((size_t) (ke - k) == sl && memcmp(k, seg, sl) == 0) {
                break;
            }

            p = cb_json_skip(p, e, 0);
            if (p == NULL) {
                return -1;
            }

            p = cb_json_ws(p, e);
            if (p >= e || *p != ',') {
                return -1;
            }
            p++;
        }

        if (seg[sl] == '\0') {
            ve = cb_json_skip(p, e, 0);
            if (ve == NULL) {
                return -1;
            }

            if (*p == '"') {
                v->p = p + 1;
                v->len = (size_t) (ve - p - 2);
                v->type = '"';

            } else {
                v->p = p;
                v->len = (size_t) (ve - p);
                v->type = (*p == '-' || isdigit((unsigned char) *p))
                          ? '0' : *p;
            }

            return 0;
        }

        seg += sl + 1;
    }
}


int
cb_jv_eq(const cb_jv_t *v, const char *s)
{
    size_t  n = strlen(s);

    return v->len == n && memcmp(v->p, s, n) == 0;
}


int64_t
cb_jv_int(const cb_jv_t *v)
{
    int64_t  x;
    size_t   i;
    int      neg;

    x = 0;
    i = 0;
    neg = 0;

    if (i < v->len && v->p[i] == '-') {
        neg = 1;
        i++;
    }

    for ( ; i < v->len && isdigit((unsigned char) v->p[i]); i++) {
        x = x * 10 + (v->p[i] - '0');
    }

    return neg ? -x : x;
}
