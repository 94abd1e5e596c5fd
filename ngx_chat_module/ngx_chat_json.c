
/*
 * Copyright (C) ngx_chat_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include "ngx_chat_json.h"


ngx_int_t
ngx_chat_buf_reserve(ngx_chat_buf_t *b, size_t n)
{
    size_t   cap;
    u_char  *p;

    if (b->len + n <= b->cap) {
        return NGX_OK;
    }

    cap = b->cap ? b->cap : 256;

    while (cap < b->len + n) {
        cap *= 2;
    }

    p = realloc(b->data, cap);
    if (p == NULL) {
        return NGX_ERROR;
    }

    b->data = p;
    b->cap = cap;

    return NGX_OK;
}


ngx_int_t
ngx_chat_buf_add(ngx_chat_buf_t *b, const void *p, size_t n)
{
    if (ngx_chat_buf_reserve(b, n) != NGX_OK) {
        return NGX_ERROR;
    }

    if (n) {
        ngx_memcpy(b->data + b->len, p, n);
        b->len += n;
    }

    return NGX_OK;
}


ngx_int_t
ngx_chat_buf_add_json_str(ngx_chat_buf_t *b, const u_char *p, size_t n)
{
    u_char         *d, c;
    const u_char   *end;
    static u_char   hex[] = "0123456789abcdef";

    /* the worst case is \u00XX for every byte */
    if (ngx_chat_buf_reserve(b, n * 6 + 2) != NGX_OK) {
        return NGX_ERROR;
    }

    d = b->data + b->len;
    *d++ = '"';

    for (end = p + n; p < end; p++) {
        c = *p;

        if (c == '"' || c == '\\') {
            *d++ = '\\';
            *d++ = c;

        } else if (c < 0x20) {
            *d++ = '\\';
            *d++ = 'u';
            *d++ = '0';
            *d++ = '0';
            *d++ = hex[c >> 4];
            *d++ = hex[c & 0xf];

        } else {
            *d++ = c;
        }
    }

    *d++ = '"';
    b->len = d - b->data;

    return NGX_OK;
}


ngx_int_t
ngx_chat_buf_add_uint(ngx_chat_buf_t *b, uint64_t v)
{
    u_char  *p;

    if (ngx_chat_buf_reserve(b, NGX_INT64_LEN) != NGX_OK) {
        return NGX_ERROR;
    }

    p = ngx_sprintf(b->data + b->len, "%uL", v);
    b->len = p - b->data;

    return NGX_OK;
}


void
ngx_chat_buf_free(ngx_chat_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}


json_t *
ngx_chat_json_parse(const u_char *p, size_t n)
{
    json_error_t  err;

    return json_loadb((const char *) p, n, JSON_REJECT_DUPLICATES, &err);
}


/*
 * NGX_OK: present and valid; NGX_DECLINED: absent (or null) and optional;
 * NGX_ERROR: wrong type, too long, or absent and required.
 */
ngx_int_t
ngx_chat_json_str(json_t *o, const char *key, ngx_str_t *v, size_t max,
    ngx_uint_t required)
{
    json_t  *j;

    v->len = 0;
    v->data = NULL;

    j = json_object_get(o, key);

    if (j == NULL || json_is_null(j)) {
        return required ? NGX_ERROR : NGX_DECLINED;
    }

    if (!json_is_string(j)) {
        return NGX_ERROR;
    }

    v->len = json_string_length(j);
    v->data = (u_char *) json_string_value(j);

    if (v->len > max || (required && v->len == 0)) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
ngx_chat_parse_id(u_char *p, size_t n, int64_t *v)
{
    int64_t  r;
    size_t   i;

    if (n == 0 || n > 18) {
        return NGX_ERROR;
    }

    r = 0;

    for (i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return NGX_ERROR;
        }

        r = r * 10 + (p[i] - '0');
    }

    if (r <= 0) {
        return NGX_ERROR;
    }

    *v = r;

    return NGX_OK;
}


/* ids travel as JSON strings (PROTOCOL section 2) */
ngx_int_t
ngx_chat_json_id(json_t *o, const char *key, int64_t *v,
    ngx_uint_t required)
{
    json_t  *j;

    j = json_object_get(o, key);

    if (j == NULL || json_is_null(j)) {
        return required ? NGX_ERROR : NGX_DECLINED;
    }

    if (!json_is_string(j)) {
        return NGX_ERROR;
    }

    return ngx_chat_parse_id((u_char *) json_string_value(j),
                             json_string_length(j), v);
}


ngx_int_t
ngx_chat_json_int(json_t *o, const char *key, int64_t *v,
    ngx_uint_t required)
{
    json_t  *j;

    j = json_object_get(o, key);

    if (j == NULL || json_is_null(j)) {
        return required ? NGX_ERROR : NGX_DECLINED;
    }

    if (!json_is_integer(j)) {
        return NGX_ERROR;
    }

    *v = json_integer_value(j);

    return NGX_OK;
}


/* the same rule the JWT verifier applies to "sub" */
ngx_int_t
ngx_chat_valid_user_id(u_char *p, size_t n)
{
    size_t  i;

    if (n == 0 || n > 128) {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        if (p[i] <= 0x20 || p[i] >= 0x7f || p[i] == '"' || p[i] == '\\') {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * The error object of every reply and REST answer (PROTOCOL section 2):
 * {"code":"...","message":"..."[,"retry_after_ms":N]}.
 */
ngx_int_t
ngx_chat_buf_add_error(ngx_chat_buf_t *b, const char *code, const char *msg,
    ngx_msec_t retry_after)
{
    if (ngx_chat_buf_add_lit(b, "{\"code\":") != NGX_OK
        || ngx_chat_buf_add_json_str(b, (u_char *) code, ngx_strlen(code))
           != NGX_OK
        || ngx_chat_buf_add_lit(b, ",\"message\":") != NGX_OK
        || ngx_chat_buf_add_json_str(b, (u_char *) msg, ngx_strlen(msg))
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (retry_after
        && (ngx_chat_buf_add_lit(b, ",\"retry_after_ms\":") != NGX_OK
            || ngx_chat_buf_add_uint(b, retry_after) != NGX_OK))
    {
        return NGX_ERROR;
    }

    return ngx_chat_buf_add_lit(b, "}");
}


/*
 * Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing past
 * U+10FFFF, every continuation byte 10xxxxxx -- what PostgreSQL accepts.
 * NUL is refused too: a C string cannot carry it.
 */
ngx_int_t
ngx_chat_utf8_valid(u_char *p, size_t len)
{
    u_char      c, lo, hi;
    u_char     *end;
    ngx_uint_t  n;

    end = p + len;

    while (p < end) {
        c = *p++;

        if (c < 0x80) {
            if (c == 0) {
                return NGX_ERROR;
            }

            continue;
        }

        lo = 0x80;
        hi = 0xbf;

        if (c >= 0xc2 && c <= 0xdf) {
            n = 1;

        } else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            lo = (c == 0xe0) ? 0xa0 : 0x80;
            hi = (c == 0xed) ? 0x9f : 0xbf;

        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            lo = (c == 0xf0) ? 0x90 : 0x80;
            hi = (c == 0xf4) ? 0x8f : 0xbf;

        } else {
            return NGX_ERROR;
        }

        if ((size_t) (end - p) < n || *p < lo || *p > hi) {
            return NGX_ERROR;
        }

        for (p++, n--; n; n--, p++) {
            if (*p < 0x80 || *p > 0xbf) {
                return NGX_ERROR;
            }
        }
    }

    return NGX_OK;
}
