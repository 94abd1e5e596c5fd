/*
 * Unit tests of the generator's building blocks: histogram, base64,
 * HS256 JWT, WebSocket accept key, JSON path lookup.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cb.h"


static int  passed, failed;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (cond) {                                                           \
            passed++;                                                         \
        } else {                                                              \
            failed++;                                                         \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                       \
            printf(__VA_ARGS__);                                              \
            printf("\n");                                                     \
        }                                                                     \
    } while (0)


static void
test_hist(void)
{
    static cb_hist_t  h;
    uint64_t          v, lo, hi, p;
    uint32_t          i, prev;
    int               ok;

    /* index is monotonic and every value lies inside its bucket */
    ok = 1;
    prev = 0;

    for (v = 0; v < (1ULL << 40); v = v < 5000 ? v + 1 : v + v / 997 + 1) {
        i = cb_hist_index(v);
        hi = cb_hist_value(i);
        lo = i == 0 ? 0 : cb_hist_value(i - 1) + 1;

        if (i < prev || v > hi || v < lo || i >= CB_HIST_BUCKETS) {
            ok = 0;
            printf("  v=%llu i=%u lo=%llu hi=%llu\n", (unsigned long long) v,
                   i, (unsigned long long) lo, (unsigned long long) hi);
            break;
        }

        /* relative width at most 1/1024 */
        if (v > 4096 && (double) (hi - lo) / (double) v > 1.0 / 1000) {
            ok = 0;
            printf("  too wide at %llu\n", (unsigned long long) v);
            break;
        }

        prev = i;
    }

    CHECK(ok, "histogram buckets contiguous and narrow");
    CHECK(cb_hist_index(UINT64_MAX) == CB_HIST_BUCKETS - 1,
          "clamped top bucket %u", cb_hist_index(UINT64_MAX));

    /* 1..100000 us uniform: percentiles within 0.1% */
    cb_hist_init(&h);
    for (v = 1; v <= 100000; v++) {
        cb_hist_add(&h, v * 1000);
    }

    CHECK(h.n == 100000, "count");
    CHECK(h.min == 1000 && h.max == 100000000ULL, "min/max");

    p = cb_hist_pct(&h, 50);
    CHECK(fabs((double) p - 50e6) / 50e6 < 0.002, "p50 %llu",
          (unsigned long long) p);
    p = cb_hist_pct(&h, 99);
    CHECK(fabs((double) p - 99e6) / 99e6 < 0.002, "p99 %llu",
          (unsigned long long) p);
    p = cb_hist_pct(&h, 99.9);
    CHECK(fabs((double) p - 99.9e6) / 99.9e6 < 0.002, "p99.9 %llu",
          (unsigned long long) p);
    CHECK(cb_hist_pct(&h, 100) == 100000000ULL, "p100 is max");
    CHECK(fabs(h.sum / (double) h.n - 50000.5e3) < 1, "mean");

    /* merge doubles counts, keeps percentiles */
    {
        static cb_hist_t  m;

        cb_hist_init(&m);
        cb_hist_merge(&m, &h);
        cb_hist_merge(&m, &h);
        CHECK(m.n == 200000 && cb_hist_pct(&m, 50) == cb_hist_pct(&h, 50),
              "merge");
    }

    /* a single huge outlier shows in max, not in p99 */
    cb_hist_init(&h);
    for (v = 0; v < 1000; v++) {
        cb_hist_add(&h, 2000000);
    }
    cb_hist_add(&h, 5000000000ULL);
    CHECK(cb_hist_pct(&h, 99) <= 2002000 && h.max == 5000000000ULL,
          "outlier");
}


static void
test_b64(void)
{
    char  out[64];

    cb_b64((const unsigned char *) "foobar", 6, out);
    CHECK(strcmp(out, "Zm9vYmFy") == 0, "b64 %s", out);
    cb_b64((const unsigned char *) "fooba", 5, out);
    CHECK(strcmp(out, "Zm9vYmE=") == 0, "b64 pad1 %s", out);
    cb_b64((const unsigned char *) "foob", 4, out);
    CHECK(strcmp(out, "Zm9vYg==") == 0, "b64 pad2 %s", out);
    cb_b64url((const unsigned char *) "\xfb\xff\xfe", 3, out);
    CHECK(strcmp(out, "-__-") == 0, "b64url %s", out);
    cb_b64url((const unsigned char *) "foob", 4, out);
    CHECK(strcmp(out, "Zm9vYg") == 0, "b64url no pad %s", out);
}


static void
test_ws_accept(void)
{
    char  out[64];

    /* RFC 6455, section 1.3 */
    cb_ws_accept("dGhlIHNhbXBsZSBub25jZQ==", out);
    CHECK(strcmp(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") == 0, "accept %s",
          out);
}


static void
test_jwt(const char *secret_file, const char *expect_prefix)
{
    static cb_opt_t  o;
    FILE            *f;
    char             tok[1024];
    size_t           n;

    memset(&o, 0, sizeof(o));
    o.token_ttl = 3600;

    /* file with a trailing newline: it is not part of the key */
    f = fopen(secret_file, "wb");
    fputs("s3cr3t\n", f);
    fclose(f);

    f = fopen(secret_file, "rb");
    n = fread(o.secret, 1, sizeof(o.secret), f);
    fclose(f);
    if (n > 0 && o.secret[n - 1] == '\n') {
        n--;
    }
    o.secret_len = n;
    o.have_secret = 1;

    n = cb_jwt_hs256(&o, "alice", tok, sizeof(tok));
    CHECK(n > 0 && strncmp(tok, expect_prefix, strlen(expect_prefix)) == 0,
          "jwt header %s", tok);
    CHECK(strchr(tok, '=') == NULL && strchr(tok, '+') == NULL,
          "jwt is base64url");

    printf("JWT %s\n", tok);
}


static void
test_json(void)
{
    cb_jv_t      v;
    const char  *j;

    j = "{\"type\":\"event\",\"cursor\":\"c1\",\"event\":{\"kind\":"
        "\"message.new\",\"conversation_id\":\"42\",\"seq\":17,"
        "\"message\":{\"id\":\"9\",\"body\":\"L1:1:2:3:4:xx\","
        "\"attachments\":[{\"id\":\"a\"},[1,2]],\"deleted\":false}}}";

    CHECK(cb_json_get(j, strlen(j), "type", &v) == 0 && cb_jv_eq(&v, "event"),
          "type");
    CHECK(cb_json_get(j, strlen(j), "event.seq", &v) == 0
          && v.type == '0' && cb_jv_int(&v) == 17, "event.seq");
    CHECK(cb_json_get(j, strlen(j), "event.message.body", &v) == 0
          && cb_jv_eq(&v, "L1:1:2:3:4:xx"), "body");
    CHECK(cb_json_get(j, strlen(j), "event.message.deleted", &v) == 0
          && v.type == 'f', "deleted");
    CHECK(cb_json_get(j, strlen(j), "event.nope", &v) != 0, "missing key");
    CHECK(cb_json_get(j, strlen(j), "id", &v) != 0, "no top-level id");

    /* nested "id" must not be confused with the top-level one */
    j = "{ \"type\" : \"reply\", \"result\": {\"message\": {\"id\": \"77\", "
        "\"body\": \"a\\\"b\"}}, \"id\" : 5, \"ok\": true }";
    CHECK(cb_json_get(j, strlen(j), "id", &v) == 0 && cb_jv_int(&v) == 5,
          "top-level id");
    CHECK(cb_json_get(j, strlen(j), "ok", &v) == 0 && v.type == 't', "ok");
    CHECK(cb_json_get(j, strlen(j), "result.message.body", &v) == 0
          && v.len == 4, "escaped string span");

    j = "{\"type\":\"reply\",\"id\":3,\"ok\":false,\"error\":{\"code\":"
        "\"unavailable\",\"retry_after_ms\":250}}";
    CHECK(cb_json_get(j, strlen(j), "error.code", &v) == 0
          && cb_jv_eq(&v, "unavailable"), "error.code");
    CHECK(cb_json_get(j, strlen(j), "error.retry_after_ms", &v) == 0
          && cb_jv_int(&v) == 250, "retry_after_ms");

    /* truncated input fails cleanly */
    CHECK(cb_json_get(j, 20, "error.code", &v) != 0, "truncated");
}


int
main(int argc, char **argv)
{
    test_hist();
    test_b64();
    test_ws_accept();
    test_json();

    if (argc > 1) {
        test_jwt(argv[1], "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.");
    }

    printf("%d passed, %d failed\n", passed, failed);

    return failed ? 1 : 0;
}
