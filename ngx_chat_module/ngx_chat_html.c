
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Chat without JavaScript: pages rendered by the module under
 * <location>/html/.
 *
 *   login            GET ?ticket= (a link from the platform) or POST a
 *                    token: a session cookie, then the list
 *   (the list)       the user's conversations with unread counts
 *   c/{id}           a page of history (older pages by link), a form to
 *                    post a message, one to post a file; reading the
 *                    newest page marks it read
 *   c/{id}/send      POST, a form: stores, then 303 back (POST/redirect/
 *                    GET); the form's client_msg_id makes a double
 *                    submit store once
 *   c/{id}/attach    POST, multipart: the upload, then its message
 *   logout           POST
 *
 * The session cookie is HttpOnly, Secure, SameSite=Lax, signed with HMAC-
 * SHA256 by a key in the shared zone (every worker checks it; a restart
 * ends every session), valid for an hour and renewed while it is used, at
 * most 12 hours after the sign-in.  Every form carries a CSRF token bound
 * to the session, and a POST whose Origin is another site is refused.
 * Every string from a user is escaped, and the pages forbid all script
 * (Content-Security-Policy), so a "<script>" in a message is text.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_auth.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_json.h"
#include "ngx_chat_limit.h"
#include "ngx_chat_receipts.h"
#include "ngx_chat_attach.h"
#include "ngx_chat_api.h"
#include "ngx_chat_html.h"

#include <openssl/hmac.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>


#define NGX_CHAT_HTML_SESSION    3600
#define NGX_CHAT_HTML_RENEW      (NGX_CHAT_HTML_SESSION - 600)
#define NGX_CHAT_HTML_MAX_AGE    (12 * 3600)
#define NGX_CHAT_HTML_PAGE       30
#define NGX_CHAT_HTML_REFRESH    "15"
#define NGX_CHAT_HTML_CSRF_LEN   22

#define NGX_CHAT_HTML_COOKIE     "chat_session"


typedef struct {
    ngx_str_t                  loc;              /* "/chat/" */
    ngx_str_t                  user;
    ngx_str_t                  name;
    time_t                     start;            /* signed in */
    time_t                     exp;
    u_char                     csrf[NGX_CHAT_HTML_CSRF_LEN];
    int64_t                    conv;
    int64_t                    before;
    unsigned                   renew:1;
    unsigned                   attach:1;
} ngx_chat_html_t;


static ngx_int_t ngx_chat_html_login(ngx_http_request_t *r,
    ngx_chat_html_t *h);
static void ngx_chat_html_login_form(ngx_http_request_t *r, u_char *data,
    size_t len);
static ngx_int_t ngx_chat_html_signed_in(ngx_http_request_t *r,
    ngx_chat_html_t *h, ngx_chat_identity_t *id);
static ngx_int_t ngx_chat_html_verify(ngx_http_request_t *r,
    ngx_chat_html_t *h);
static ngx_int_t ngx_chat_html_cookie(ngx_http_request_t *r,
    ngx_chat_html_t *h, ngx_uint_t clear);
static void ngx_chat_html_csrf(ngx_chat_html_t *h);
static ngx_int_t ngx_chat_html_same_origin(ngx_http_request_t *r);
static ngx_int_t ngx_chat_html_csrf_ok(ngx_chat_html_t *h, ngx_str_t *v);
static ngx_int_t ngx_chat_html_list(ngx_http_request_t *r,
    ngx_chat_html_t *h);
static void ngx_chat_html_list_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static ngx_int_t ngx_chat_html_page(ngx_http_request_t *r,
    ngx_chat_html_t *h);
static void ngx_chat_html_page_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);
static void ngx_chat_html_message(ngx_chat_buf_t *b, json_t *m);
static void ngx_chat_html_send_form(ngx_http_request_t *r, u_char *data,
    size_t len);
static void ngx_chat_html_uploaded(ngx_http_request_t *r,
    ngx_chat_upload_t *up, ngx_int_t status);
static void ngx_chat_html_send(ngx_http_request_t *r, ngx_str_t *cmid,
    ngx_str_t *body, u_char *attachment);
static void ngx_chat_html_sent(ngx_chat_send_t *snd);
static void ngx_chat_html_logout(ngx_http_request_t *r, u_char *data,
    size_t len);
static ngx_int_t ngx_chat_html_form_field(u_char *data, size_t len,
    const char *name, ngx_pool_t *pool, ngx_str_t *value);
static ngx_int_t ngx_chat_html_head(ngx_chat_buf_t *b, const char *title,
    size_t tlen, ngx_uint_t refresh);
static ngx_int_t ngx_chat_html_add(ngx_chat_buf_t *b, const u_char *p,
    size_t n);
static ngx_int_t ngx_chat_html_add_json(ngx_chat_buf_t *b, json_t *o,
    const char *key);
static ngx_int_t ngx_chat_html_members(ngx_chat_buf_t *b, json_t *conv);
static ngx_int_t ngx_chat_html_hidden(ngx_chat_buf_t *b, ngx_chat_html_t *h);
static ngx_int_t ngx_chat_html_reply(ngx_http_request_t *r,
    ngx_chat_html_t *h, ngx_uint_t status, ngx_chat_buf_t *b);
static ngx_int_t ngx_chat_html_error(ngx_http_request_t *r,
    ngx_chat_html_t *h, ngx_uint_t status, const char *text);
static ngx_int_t ngx_chat_html_redirect(ngx_http_request_t *r,
    ngx_chat_html_t *h, int64_t conv);
static ngx_chat_html_t *ngx_chat_html_get(ngx_http_request_t *r);
static ngx_int_t ngx_chat_html_body_error(ngx_http_request_t *r,
    ngx_int_t status, const char *why);


static ngx_str_t  ngx_chat_html_cookie_name = ngx_string(NGX_CHAT_HTML_COOKIE);


ngx_int_t
ngx_chat_html_handler(ngx_http_request_t *r, ngx_str_t *path)
{
    u_char                    *p, *end, *slash;
    ngx_int_t                  rc;
    ngx_msec_t                 retry_after;
    ngx_chat_html_t           *h;
    ngx_chat_identity_t       *id;
    ngx_http_core_loc_conf_t  *clcf;

    id = ngx_chat_api_start(r);
    if (id == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h = ngx_pcalloc(r->pool, sizeof(ngx_chat_html_t));
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ngx_chat_api_set_data(r, h) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_chat_api_on_error(r, ngx_chat_html_body_error);

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);
    h->loc = clcf->name;

    p = path->data;
    end = p + path->len;

    if (p == end) {
        /* "html" without its slash: the pages' relative links need it */
        return ngx_chat_html_redirect(r, h, 0);
    }

    p++;

    if (r->method == NGX_HTTP_POST && ngx_chat_html_same_origin(r) != NGX_OK)
    {
        return ngx_chat_html_error(r, h, NGX_HTTP_FORBIDDEN,
                                   "This form came from another site.");
    }

    if (end - p == 5 && ngx_strncmp(p, "login", 5) == 0) {
        return ngx_chat_html_login(r, h);
    }

    if (ngx_chat_html_verify(r, h) != NGX_OK) {
        if (r->method == NGX_HTTP_GET || r->method == NGX_HTTP_HEAD) {
            return ngx_chat_html_redirect(r, h, -1);
        }

        return ngx_chat_html_error(r, h, NGX_HTTP_FORBIDDEN,
                                   "Your session has ended: sign in again.");
    }

    id->user = h->user;
    id->name = h->name;
    id->role = NGX_CHAT_ROLE_USER;

    if (ngx_chat_rate_request(r, NGX_CHAT_RATE_REST, id, &retry_after)
        != NGX_OK)
    {
        return ngx_chat_html_error(r, h, NGX_HTTP_TOO_MANY_REQUESTS,
                                   "Too many requests: wait a moment.");
    }

    if (p == end) {
        if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
            return ngx_chat_html_error(r, h, NGX_HTTP_NOT_ALLOWED,
                                       "Method not allowed.");
        }

        return ngx_chat_html_list(r, h);
    }

    if (end - p == 6 && ngx_strncmp(p, "logout", 6) == 0
        && r->method == NGX_HTTP_POST)
    {
        return ngx_chat_api_read_form(r, ngx_chat_html_logout);
    }

    if (end - p < 3 || ngx_strncmp(p, "c/", 2) != 0) {
        return ngx_chat_html_error(r, h, NGX_HTTP_NOT_FOUND,
                                   "No such page.");
    }

    p += 2;
    slash = ngx_strlchr(p, end, '/');

    if (ngx_chat_parse_id(p, (slash ? slash : end) - p, &h->conv) != NGX_OK) {
        return ngx_chat_html_error(r, h, NGX_HTTP_NOT_FOUND,
                                   "No such conversation.");
    }

    if (slash == NULL) {
        if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
            return ngx_chat_html_error(r, h, NGX_HTTP_NOT_ALLOWED,
                                       "Method not allowed.");
        }

        return ngx_chat_html_page(r, h);
    }

    if (r->method != NGX_HTTP_POST) {
        return ngx_chat_html_error(r, h, NGX_HTTP_NOT_ALLOWED,
                                   "Method not allowed.");
    }

    p = slash + 1;

    if (end - p == 4 && ngx_strncmp(p, "send", 4) == 0) {
        return ngx_chat_api_read_form(r, ngx_chat_html_send_form);
    }

    if (end - p == 6 && ngx_strncmp(p, "attach", 6) == 0) {
        ngx_str_t  csrf, prefix;
        u_char    *p;

        /* checked before the file is read: the token is in the action */

        if (ngx_http_arg(r, (u_char *) "csrf", 4, &csrf) != NGX_OK
            || ngx_chat_html_csrf_ok(h, &csrf) != NGX_OK)
        {
            return ngx_chat_html_error(r, h, NGX_HTTP_FORBIDDEN,
                                       "This form has expired: reload the "
                                       "page and try again.");
        }

        if (ngx_chat_worker.cmcf->attach_dir.len == 0) {
            return ngx_chat_html_error(r, h, NGX_HTTP_NOT_FOUND,
                                       "Files are not taken here.");
        }

        /* the api of this location: "<loc>api" or "<loc>/api" */

        prefix.data = ngx_pnalloc(r->pool, h->loc.len + 4);
        if (prefix.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        p = ngx_cpymem(prefix.data, h->loc.data, h->loc.len);

        if (h->loc.len == 0 || h->loc.data[h->loc.len - 1] != '/') {
            *p++ = '/';
        }

        p = ngx_cpymem(p, "api", 3);
        prefix.len = p - prefix.data;

        h->attach = 1;

        return ngx_chat_api_read_upload(r, &prefix, ngx_chat_html_uploaded);
    }

    rc = ngx_chat_html_error(r, h, NGX_HTTP_NOT_FOUND, "No such page.");

    return rc;
}


/* the signed-in user of the cookie, for GET attachments from a page */

ngx_int_t
ngx_chat_html_session(ngx_http_request_t *r, ngx_chat_identity_t *id)
{
    ngx_chat_html_t  h;

    ngx_memzero(&h, sizeof(ngx_chat_html_t));

    if (ngx_chat_html_verify(r, &h) != NGX_OK) {
        return NGX_DECLINED;
    }

    id->user = h.user;
    id->name = h.name;
    id->role = NGX_CHAT_ROLE_USER;
    id->exp = h.exp;

    return NGX_OK;
}


/* login: GET ?ticket= or ?token=, or POST token=...; GET alone: the form */

static ngx_int_t
ngx_chat_html_login(ngx_http_request_t *r, ngx_chat_html_t *h)
{
    ngx_str_t        arg;
    ngx_chat_buf_t   b;

    if (r->method == NGX_HTTP_POST) {
        return ngx_chat_api_read_form(r, ngx_chat_html_login_form);
    }

    if (r->method != NGX_HTTP_GET && r->method != NGX_HTTP_HEAD) {
        return ngx_chat_html_error(r, h, NGX_HTTP_NOT_ALLOWED,
                                   "Method not allowed.");
    }

    /*
     * A link from the platform (login?ticket=...) only shows a button
     * that posts the ticket: a GET signs nobody in (a link scanner does
     * not spend the ticket, another site cannot sign a visitor in with
     * its own), and a token never travels in a URL.
     */

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_html_head(&b, "Sign in", 7, 0) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "<main><h1>Sign in to chat</h1>"
                                "<form method=\"post\" action=\"login\">")
           != NGX_OK)
    {
        goto failed;
    }

    if (ngx_http_arg(r, (u_char *) "ticket", 6, &arg) == NGX_OK
        && arg.len <= 256)
    {
        if (ngx_chat_buf_add_lit(&b, "<input type=\"hidden\" name=\"ticket\" "
                                 "value=\"") != NGX_OK
            || ngx_chat_html_add(&b, arg.data, arg.len) != NGX_OK
            || ngx_chat_buf_add_lit(&b, "\"><p><button>Continue to the chat"
                                    "</button></p>") != NGX_OK)
        {
            goto failed;
        }

    } else if (ngx_chat_buf_add_lit(&b, "<p><label>Your platform token "
                   "<input name=\"token\" required autocomplete=\"off\">"
                   "</label></p><p><button>Sign in</button></p>") != NGX_OK)
    {
        goto failed;
    }

    if (ngx_chat_buf_add_lit(&b, "</form></main></body></html>") != NGX_OK) {
        goto failed;
    }

    return ngx_chat_html_reply(r, h, NGX_HTTP_OK, &b);

failed:

    ngx_chat_buf_free(&b);
    return NGX_HTTP_INTERNAL_SERVER_ERROR;
}


static void
ngx_chat_html_login_form(ngx_http_request_t *r, u_char *data, size_t len)
{
    ngx_str_t             token, ticket;
    ngx_int_t             rc;
    const char           *code, *msg;
    ngx_chat_html_t      *h;
    ngx_chat_identity_t   id;

    h = ngx_chat_html_get(r);

    ngx_memzero(&id, sizeof(ngx_chat_identity_t));

    if (ngx_chat_html_form_field(data, len, "ticket", r->pool, &ticket)
        == NGX_OK)
    {
        rc = ngx_chat_ticket_redeem(&ticket, r->pool, &id);

    } else if (ngx_chat_html_form_field(data, len, "token", r->pool, &token)
               == NGX_OK)
    {
        rc = ngx_chat_auth_verify(&token, r->pool, &id, &code, &msg);

    } else {
        rc = NGX_DECLINED;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_UNAUTHORIZED,
                                "This sign-in is not valid (any more)."));
        return;
    }

    ngx_http_finalize_request(r, ngx_chat_html_signed_in(r, h, &id));
}


static ngx_int_t
ngx_chat_html_signed_in(ngx_http_request_t *r, ngx_chat_html_t *h,
    ngx_chat_identity_t *id)
{
    if (id->role != NGX_CHAT_ROLE_USER) {
        return ngx_chat_html_error(r, h, NGX_HTTP_FORBIDDEN,
                                   "These pages are for users.");
    }

    h->user = id->user;
    h->name = id->name;
    h->start = ngx_time();
    h->renew = 1;

    return ngx_chat_html_redirect(r, h, 0);
}


/*
 * The cookie: "<start>.<exp>.<user>.<name>.<mac>", user and name in
 * base64url, mac the HMAC-SHA256 of what comes before it.
 */

static ngx_int_t
ngx_chat_html_verify(ngx_http_request_t *r, ngx_chat_html_t *h)
{
    u_char            *p, *last, *f[5];
    size_t             n;
    time_t             now;
    ngx_str_t          v, s, d;
    ngx_uint_t         i;
    unsigned int       mdlen;
    u_char             md[EVP_MAX_MD_SIZE], mac[64];

    if (ngx_http_parse_multi_header_lines(&r->headers_in.cookies,
                                          &ngx_chat_html_cookie_name, &v)
        == NGX_DECLINED)
    {
        return NGX_DECLINED;
    }

    if (v.len > 1024) {
        return NGX_DECLINED;
    }

    p = v.data;
    last = v.data + v.len;

    for (i = 0; i < 5; i++) {
        f[i] = p;
        p = (i < 4) ? ngx_strlchr(p, last, '.') : last;

        if (p == NULL) {
            return NGX_DECLINED;
        }

        p++;
    }

    /* the MAC */

    if (HMAC(EVP_sha256(), ngx_chat_worker.sh->html_key,
             sizeof(ngx_chat_worker.sh->html_key), v.data, f[4] - 1 - v.data,
             md, &mdlen) == NULL)
    {
        return NGX_DECLINED;
    }

    s.data = md;
    s.len = mdlen;
    d.data = mac;
    ngx_encode_base64url(&d, &s);

    n = last - f[4];

    if (n != d.len || CRYPTO_memcmp(f[4], mac, n) != 0) {
        return NGX_DECLINED;
    }

    h->start = ngx_atotm(f[0], f[1] - 1 - f[0]);
    h->exp = ngx_atotm(f[1], f[2] - 1 - f[1]);
    now = ngx_time();

    if (h->start == NGX_ERROR || h->exp == NGX_ERROR || h->exp <= now
        || h->start + NGX_CHAT_HTML_MAX_AGE <= now)
    {
        return NGX_DECLINED;
    }

    s.data = f[2];
    s.len = f[3] - 1 - f[2];
    h->user.data = ngx_pnalloc(r->pool, ngx_base64_decoded_length(s.len));
    if (h->user.data == NULL || ngx_decode_base64url(&h->user, &s) != NGX_OK
        || ngx_chat_valid_user_id(h->user.data, h->user.len) != NGX_OK)
    {
        return NGX_DECLINED;
    }

    s.data = f[3];
    s.len = f[4] - 1 - f[3];
    h->name.data = ngx_pnalloc(r->pool, ngx_base64_decoded_length(s.len) + 1);
    if (h->name.data == NULL || ngx_decode_base64url(&h->name, &s) != NGX_OK)
    {
        return NGX_DECLINED;
    }

    /* renewed when used, up to the end of its sign-in's life */
    h->renew = (h->exp - now < NGX_CHAT_HTML_RENEW);

    ngx_chat_html_csrf(h);

    return NGX_OK;
}


static ngx_int_t
ngx_chat_html_cookie(ngx_http_request_t *r, ngx_chat_html_t *h,
    ngx_uint_t clear)
{
    u_char           *p, *start;
    time_t            now, exp;
    size_t            len;
    ngx_str_t         s, d;
    unsigned int      mdlen;
    ngx_table_elt_t  *set;
    u_char            md[EVP_MAX_MD_SIZE];

    set = ngx_list_push(&r->headers_out.headers);
    if (set == NULL) {
        return NGX_ERROR;
    }

    set->hash = 1;
    ngx_str_set(&set->key, "Set-Cookie");

    len = sizeof(NGX_CHAT_HTML_COOKIE "=") - 1
          + 2 * NGX_TIME_T_LEN + 4 + ngx_base64_encoded_length(h->user.len)
          + ngx_base64_encoded_length(h->name.len) + 48
          + sizeof("; Path=; Max-Age=; HttpOnly; Secure; SameSite=Lax") - 1
          + h->loc.len + NGX_TIME_T_LEN;

    start = ngx_pnalloc(r->pool, len);
    if (start == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(start, NGX_CHAT_HTML_COOKIE "=",
                   sizeof(NGX_CHAT_HTML_COOKIE "=") - 1);

    now = ngx_time();
    exp = ngx_min(now + NGX_CHAT_HTML_SESSION,
                  h->start + NGX_CHAT_HTML_MAX_AGE);

    if (!clear) {
        s.data = p;
        p = ngx_sprintf(p, "%T.%T.", h->start, exp);

        d.data = p;
        ngx_encode_base64url(&d, &h->user);
        p += d.len;
        *p++ = '.';

        d.data = p;
        ngx_encode_base64url(&d, &h->name);
        p += d.len;

        s.len = p - s.data;

        if (HMAC(EVP_sha256(), ngx_chat_worker.sh->html_key,
                 sizeof(ngx_chat_worker.sh->html_key), s.data, s.len,
                 md, &mdlen) == NULL)
        {
            return NGX_ERROR;
        }

        *p++ = '.';
        s.data = md;
        s.len = mdlen;
        d.data = p;
        ngx_encode_base64url(&d, &s);
        p += d.len;
    }

    p = ngx_sprintf(p, "; Path=%V; Max-Age=%T; HttpOnly; Secure; "
                    "SameSite=Lax", &h->loc, clear ? 0 : exp - now);

    set->value.data = start;
    set->value.len = p - start;

    return NGX_OK;
}


/* the session's CSRF token: a MAC of its user and its sign-in time */

static void
ngx_chat_html_csrf(ngx_chat_html_t *h)
{
    u_char        *p;
    ngx_str_t      s, d;
    unsigned int   mdlen;
    u_char         buf[NGX_CHAT_MAX_ID_LEN + NGX_TIME_T_LEN + 8];
    u_char         md[EVP_MAX_MD_SIZE], out[64];

    p = ngx_sprintf(buf, "csrf.%T.", h->start);
    p = ngx_cpymem(p, h->user.data,
                   ngx_min(h->user.len, NGX_CHAT_MAX_ID_LEN));

    if (HMAC(EVP_sha256(), ngx_chat_worker.sh->html_key,
             sizeof(ngx_chat_worker.sh->html_key), buf, p - buf, md, &mdlen)
        == NULL)
    {
        ngx_memzero(h->csrf, sizeof(h->csrf));
        return;
    }

    s.data = md;
    s.len = 16;
    d.data = out;
    ngx_encode_base64url(&d, &s);

    ngx_memcpy(h->csrf, out, NGX_CHAT_HTML_CSRF_LEN);
}


static ngx_int_t
ngx_chat_html_csrf_ok(ngx_chat_html_t *h, ngx_str_t *v)
{
    if (v->len != NGX_CHAT_HTML_CSRF_LEN
        || CRYPTO_memcmp(v->data, h->csrf, NGX_CHAT_HTML_CSRF_LEN) != 0)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/*
 * A POST that says it comes from a page of another site is refused (the
 * SameSite cookie would not come with it either; this covers browsers
 * that send it anyway and the sign-in form, which has no session yet).
 */

static ngx_int_t
ngx_chat_html_same_origin(ngx_http_request_t *r)
{
    u_char           *p;
    ngx_str_t        *origin, host;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *hd;
    ngx_uint_t        i;

    origin = NULL;
    part = &r->headers_in.headers.part;
    hd = part->elts;

    for (i = 0; /* void */; i++) {
        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            hd = part->elts;
            i = 0;
        }

        if (hd[i].key.len == 6
            && ngx_strncasecmp(hd[i].key.data, (u_char *) "origin", 6) == 0)
        {
            origin = &hd[i].value;
            break;
        }
    }

    if (origin == NULL) {
        return NGX_OK;
    }

    if (r->headers_in.host == NULL) {
        return NGX_DECLINED;
    }

    host = r->headers_in.host->value;

    p = ngx_strlchr(origin->data, origin->data + origin->len, ':');

    if (p == NULL || origin->data + origin->len - p < 3
        || p[1] != '/' || p[2] != '/')
    {
        return NGX_DECLINED;
    }

    p += 3;

    if ((size_t) (origin->data + origin->len - p) != host.len
        || ngx_strncasecmp(p, host.data, host.len) != 0)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/* the list of conversations */

static ngx_int_t
ngx_chat_html_list(ngx_http_request_t *r, ngx_chat_html_t *h)
{
    u_char            *p, *colon;
    ngx_str_t          before;
    ngx_chat_query_t  *q;

    ngx_str_null(&before);
    colon = NULL;

    if (ngx_http_arg(r, (u_char *) "before", 6, &before) == NGX_OK) {
        colon = ngx_strlchr(before.data, before.data + before.len, ':');

        if (colon == NULL || before.len > 2 * NGX_INT64_LEN
            || ngx_atoof(before.data, colon - before.data) == NGX_ERROR
            || ngx_atoof(colon + 1, before.data + before.len - colon - 1)
               == NGX_ERROR)
        {
            return ngx_chat_html_error(r, h, NGX_HTTP_BAD_REQUEST,
                                       "This page link is broken.");
        }
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_LIST_CONVS,
                             h->user.len + 1 + before.len + 2 + 8);
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, h->user.data, h->user.len);
    *p++ = '\0';

    if (colon) {
        q->params[1] = (char *) p;
        p = ngx_cpymem(p, before.data, colon - before.data);
        *p++ = '\0';

        q->params[2] = (char *) p;
        p = ngx_cpymem(p, colon + 1, before.data + before.len - colon - 1);
        *p++ = '\0';
    }

    q->params[3] = "50";
    q->handler = ngx_chat_html_list_done;

    return ngx_chat_api_run(r, q);
}


static void
ngx_chat_html_list_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    size_t               i;
    json_t              *root, *list, *c, *m, *v;
    ngx_chat_buf_t       b;
    ngx_chat_html_t     *h;
    ngx_http_request_t  *r;

    r = ngx_chat_api_owner(q);

    if (r == NULL) {
        return;
    }

    h = ngx_chat_html_get(r);

    if (rc != NGX_OK || PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "The chat is unavailable: try again soon."));
        return;
    }

    root = json_loadb(PQgetvalue(res, 0, 0), PQgetlength(res, 0, 0), 0, NULL);
    list = json_object_get(root, "conversations");

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (!json_is_array(list)
        || ngx_chat_html_head(&b, "Conversations", 13, 1) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "<header><b>") != NGX_OK
        || ngx_chat_html_add(&b, h->name.len ? h->name.data : h->user.data,
                             h->name.len ? h->name.len : h->user.len)
           != NGX_OK
        || ngx_chat_buf_add_lit(&b, "</b> <form class=\"inline\" "
                                "method=\"post\" action=\"logout\">")
           != NGX_OK
        || ngx_chat_html_hidden(&b, h) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "<button>Sign out</button></form>"
                                "</header><main><h1>Conversations</h1>"
                                "<ul class=\"convs\">") != NGX_OK)
    {
        goto failed;
    }

    json_array_foreach(list, i, c) {
        v = json_object_get(c, "id");

        if (!json_is_string(v)
            || ngx_chat_buf_add_lit(&b, "<li><a href=\"c/") != NGX_OK
            || ngx_chat_html_add_json(&b, c, "id") != NGX_OK
            || ngx_chat_buf_add_lit(&b, "\">") != NGX_OK)
        {
            goto failed;
        }

        v = json_object_get(c, "title");

        if (json_is_string(v) && json_string_length(v)) {
            if (ngx_chat_html_add_json(&b, c, "title") != NGX_OK) {
                goto failed;
            }

        } else {
            /* a conversation without a title: its members */
            if (ngx_chat_html_members(&b, c) != NGX_OK) {
                goto failed;
            }
        }

        if (ngx_chat_buf_add_lit(&b, "</a>") != NGX_OK) {
            goto failed;
        }

        v = json_object_get(c, "unread_count");

        if (json_is_integer(v) && json_integer_value(v) > 0) {
            u_char  num[NGX_INT64_LEN + 40];

            if (ngx_chat_buf_add(&b, num,
                    ngx_snprintf(num, sizeof(num), " <span class=\"unread\">%L unread"
                                "</span>", (int64_t) json_integer_value(v))
                    - num) != NGX_OK)
            {
                goto failed;
            }
        }

        m = json_object_get(c, "last_message");

        if (json_is_object(m)) {
            size_t   n;
            json_t  *body;

            body = json_object_get(m, "body");
            n = json_is_string(body) ? json_string_length(body) : 0;

            /* a preview: 80 bytes, not cut inside a character */
            if (n > 80) {
                n = 80;

                while (n && ngx_chat_utf8_valid((u_char *)
                                                json_string_value(body), n)
                            != NGX_OK)
                {
                    n--;
                }
            }

            if (ngx_chat_buf_add_lit(&b, "<br><small>") != NGX_OK
                || ngx_chat_html_add_json(&b, m, "sender") != NGX_OK
                || ngx_chat_buf_add_lit(&b, ": ") != NGX_OK
                || (n && ngx_chat_html_add(&b, (u_char *)
                                           json_string_value(body), n)
                         != NGX_OK)
                || ngx_chat_buf_add_lit(&b, "</small>") != NGX_OK)
            {
                goto failed;
            }
        }

        if (ngx_chat_buf_add_lit(&b, "</li>") != NGX_OK) {
            goto failed;
        }
    }

    if (json_array_size(list) == 0
        && ngx_chat_buf_add_lit(&b, "<li>No conversations yet.</li>")
           != NGX_OK)
    {
        goto failed;
    }

    if (ngx_chat_buf_add_lit(&b, "</ul>") != NGX_OK) {
        goto failed;
    }

    v = json_object_get(root, "next");

    if (json_is_string(v)
        && (ngx_chat_buf_add_lit(&b, "<p><a href=\"?before=") != NGX_OK
            || ngx_chat_html_add_json(&b, root, "next") != NGX_OK
            || ngx_chat_buf_add_lit(&b, "\">Older conversations</a></p>")
               != NGX_OK))
    {
        goto failed;
    }

    if (ngx_chat_buf_add_lit(&b, "</main></body></html>") != NGX_OK) {
        goto failed;
    }

    json_decref(root);
    ngx_http_finalize_request(r, ngx_chat_html_reply(r, h, NGX_HTTP_OK, &b));

    return;

failed:

    json_decref(root);
    ngx_chat_buf_free(&b);
    ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
}


/* a conversation's page */

static ngx_int_t
ngx_chat_html_page(ngx_http_request_t *r, ngx_chat_html_t *h)
{
    u_char            *p;
    off_t              n;
    ngx_str_t          arg;
    ngx_chat_query_t  *q;

    if (ngx_http_arg(r, (u_char *) "before", 6, &arg) == NGX_OK) {
        n = ngx_atoof(arg.data, arg.len);

        if (n <= 0) {
            return ngx_chat_html_error(r, h, NGX_HTTP_BAD_REQUEST,
                                       "This page link is broken.");
        }

        h->before = n;
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_PAGE,
                             h->user.len + 1 + 2 * (NGX_INT64_LEN + 1));
    if (q == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_cpymem(p, h->user.data, h->user.len);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_sprintf(p, "%L", h->conv);
    *p++ = '\0';

    if (h->before) {
        q->params[2] = (char *) p;
        p = ngx_sprintf(p, "%L", h->before);
        *p++ = '\0';
    }

    q->params[3] = NGX_CHAT_HTML_PAGE == 30 ? "30" : "50";
    q->handler = ngx_chat_html_page_done;

    return ngx_chat_api_run(r, q);
}


static void
ngx_chat_html_page_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    u_char               num[256];
    size_t               i, n;
    int64_t              top, oldest, seq;
    json_t              *root, *conv, *msgs, *m, *v;
    ngx_chat_buf_t       b;
    ngx_chat_html_t     *h;
    ngx_http_request_t  *r;

    r = ngx_chat_api_owner(q);

    if (r == NULL) {
        return;
    }

    h = ngx_chat_html_get(r);

    if (rc != NGX_OK || PQntuples(res) != 1) {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_SERVICE_UNAVAILABLE,
                                "The chat is unavailable: try again soon."));
        return;
    }

    if (PQgetisnull(res, 0, 0)
        || ngx_strcmp(PQgetvalue(res, 0, 0), "forbidden") == 0)
    {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_NOT_FOUND,
                                "No such conversation."));
        return;
    }

    root = json_loadb(PQgetvalue(res, 0, 0), PQgetlength(res, 0, 0), 0, NULL);
    conv = json_object_get(root, "conversation");
    msgs = json_object_get(json_object_get(root, "history"), "messages");

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (!json_is_object(conv) || !json_is_array(msgs)) {
        goto failed;
    }

    v = json_object_get(conv, "title");

    if (ngx_chat_html_head(&b, json_is_string(v) ? json_string_value(v)
                                                 : "Conversation",
                           json_is_string(v) ? json_string_length(v) : 12,
                           h->before == 0) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "<header><a href=\"../\">"
                                "&larr; Conversations</a></header><main>"
                                "<h1>") != NGX_OK
        || (json_is_string(v) && json_string_length(v)
            ? ngx_chat_html_add_json(&b, conv, "title")
            : ngx_chat_buf_add_lit(&b, "Conversation")) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "</h1><p class=\"members\">Members: ")
           != NGX_OK)
    {
        goto failed;
    }

    if (ngx_chat_html_members(&b, conv) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "</p>") != NGX_OK)
    {
        goto failed;
    }

    n = json_array_size(msgs);
    top = 0;
    oldest = 0;

    /* the history comes newest first; the page reads oldest first */

    for (i = 0; i < n; i++) {
        seq = json_integer_value(json_object_get(json_array_get(msgs, i),
                                                 "seq"));
        top = ngx_max(top, seq);
        oldest = (oldest == 0) ? seq : ngx_min(oldest, seq);
    }

    if (n == NGX_CHAT_HTML_PAGE && oldest > 1
        && ngx_chat_buf_add(&b, num,
                            ngx_snprintf(num, sizeof(num), "<p><a href=\"?before=%L\">"
                                        "Older messages</a></p>", oldest)
                            - num) != NGX_OK)
    {
        goto failed;
    }

    if (ngx_chat_buf_add_lit(&b, "<ol class=\"msgs\">") != NGX_OK) {
        goto failed;
    }

    for (i = n; i > 0; i--) {
        m = json_array_get(msgs, i - 1);
        ngx_chat_html_message(&b, m);
    }

    if (n == 0 && ngx_chat_buf_add_lit(&b, "<li>No messages yet.</li>")
                  != NGX_OK)
    {
        goto failed;
    }

    if (ngx_chat_buf_add_lit(&b, "</ol>") != NGX_OK) {
        goto failed;
    }

    if (h->before
        && ngx_chat_buf_add_lit(&b, "<p><a href=\"?\">Newest messages</a>"
                                "</p>") != NGX_OK)
    {
        goto failed;
    }

    if (json_is_true(json_object_get(conv, "archived"))) {
        if (ngx_chat_buf_add_lit(&b, "<p class=\"note\">This conversation "
                                 "is archived: it can be read, not "
                                 "written to.</p>") != NGX_OK)
        {
            goto failed;
        }

    } else {
        /* a new client_msg_id per rendering: a double submit stores once */
        u_char  cmid[32], rnd[12];

        if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
            goto failed;
        }

        *ngx_hex_dump(cmid, rnd, sizeof(rnd)) = '\0';

        if (ngx_chat_buf_add(&b, num,
                ngx_snprintf(num, sizeof(num), "<form class=\"send\" method=\"post\" "
                            "action=\"%L/send\">", h->conv) - num) != NGX_OK
            || ngx_chat_html_hidden(&b, h) != NGX_OK
            || ngx_chat_buf_add_lit(&b, "<input type=\"hidden\" "
                                    "name=\"client_msg_id\" value=\"html-")
               != NGX_OK
            || ngx_chat_buf_add(&b, cmid, sizeof(rnd) * 2) != NGX_OK
            || ngx_chat_buf_add_lit(&b, "\"><label>Message<br><textarea "
                                    "name=\"body\" rows=\"3\" required>"
                                    "</textarea></label> <button>Send"
                                    "</button></form>") != NGX_OK)
        {
            goto failed;
        }

        if (ngx_chat_worker.cmcf->attach_dir.len
            && (ngx_chat_buf_add(&b, num,
                    ngx_snprintf(num, sizeof(num), "<form class=\"attach\" method=\"post\" "
                                "enctype=\"multipart/form-data\" "
                                "action=\"%L/attach?csrf=", h->conv) - num)
                != NGX_OK
                || ngx_chat_buf_add(&b, h->csrf, NGX_CHAT_HTML_CSRF_LEN)
                   != NGX_OK
                || ngx_chat_buf_add_lit(&b, "\"><input type=\"hidden\" "
                                        "name=\"client_msg_id\" "
                                        "value=\"file-") != NGX_OK
                || ngx_chat_buf_add(&b, cmid, sizeof(rnd) * 2) != NGX_OK
                || ngx_chat_buf_add_lit(&b, "\"><label>File <input "
                                        "type=\"file\" name=\"file\" "
                                        "required></label> <label>Caption "
                                        "<input name=\"body\"></label> "
                                        "<button>Send file</button></form>")
                   != NGX_OK))
        {
            goto failed;
        }
    }

    if (ngx_chat_buf_add_lit(&b, "</main></body></html>") != NGX_OK) {
        goto failed;
    }

    /* the newest page was seen: read up to its last message */
    if (h->before == 0 && top > 0) {
        ngx_chat_receipts_mark(h->conv, &h->user, 0, top,
                               ngx_chat_bus_known());
    }

    json_decref(root);
    ngx_http_finalize_request(r, ngx_chat_html_reply(r, h, NGX_HTTP_OK, &b));

    return;

failed:

    json_decref(root);
    ngx_chat_buf_free(&b);
    ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
}


/* one message: sender, time, body, its files (errors end the page short) */

static void
ngx_chat_html_message(ngx_chat_buf_t *b, json_t *m)
{
    size_t       i;
    json_t      *v, *a, *f;
    const char  *mime;
    ngx_uint_t   system, image;

    v = json_object_get(m, "format");
    system = json_is_string(v)
             && ngx_strcmp(json_string_value(v), "system") == 0;

    if (ngx_chat_buf_add_lit(b, "<li class=\"msg") != NGX_OK
        || (system && ngx_chat_buf_add_lit(b, " system") != NGX_OK)
        || ngx_chat_buf_add_lit(b, "\" id=\"m-") != NGX_OK
        || ngx_chat_html_add_json(b, m, "id") != NGX_OK
        || ngx_chat_buf_add_lit(b, "\"><b>") != NGX_OK
        || ngx_chat_html_add_json(b, m, "sender") != NGX_OK
        || ngx_chat_buf_add_lit(b, "</b> <time>") != NGX_OK)
    {
        return;
    }

    v = json_object_get(m, "created_at");

    /* "2026-12-07T16:14:03.370Z": the date and the minute */
    if (json_is_string(v) && json_string_length(v) >= 16) {
        if (ngx_chat_html_add(b, (u_char *) json_string_value(v), 10)
            != NGX_OK
            || ngx_chat_buf_add_lit(b, " ") != NGX_OK
            || ngx_chat_html_add(b, (u_char *) json_string_value(v) + 11, 5)
               != NGX_OK)
        {
            return;
        }
    }

    if (ngx_chat_buf_add_lit(b, "</time>") != NGX_OK) {
        return;
    }

    if (json_is_true(json_object_get(m, "deleted"))) {
        (void) ngx_chat_buf_add_lit(b, "<p class=\"gone\">(deleted)</p></li>");
        return;
    }

    if (ngx_chat_buf_add_lit(b, "<p>") != NGX_OK
        || ngx_chat_html_add_json(b, m, "body") != NGX_OK
        || ngx_chat_buf_add_lit(b, "</p>") != NGX_OK)
    {
        return;
    }

    json_array_foreach(json_object_get(m, "attachments"), i, a) {
        f = json_object_get(a, "mime");
        mime = json_is_string(f) ? json_string_value(f) : "";

        image = (ngx_strcmp(mime, "image/png") == 0
                 || ngx_strcmp(mime, "image/jpeg") == 0
                 || ngx_strcmp(mime, "image/gif") == 0
                 || ngx_strcmp(mime, "image/webp") == 0);

        if (ngx_chat_buf_add_lit(b, "<p class=\"file\"><a href=\"") != NGX_OK
            || ngx_chat_html_add_json(b, a, "url") != NGX_OK
            || ngx_chat_buf_add_lit(b, "\">") != NGX_OK)
        {
            return;
        }

        if (image
            && (ngx_chat_buf_add_lit(b, "<img src=\"") != NGX_OK
                || ngx_chat_html_add_json(b, a, "url") != NGX_OK
                || ngx_chat_buf_add_lit(b, "\" alt=\"") != NGX_OK
                || ngx_chat_html_add_json(b, a, "name") != NGX_OK
                || ngx_chat_buf_add_lit(b, "\"><br>") != NGX_OK))
        {
            return;
        }

        if (ngx_chat_html_add_json(b, a, "name") != NGX_OK
            || ngx_chat_buf_add_lit(b, "</a></p>") != NGX_OK)
        {
            return;
        }
    }

    (void) ngx_chat_buf_add_lit(b, "</li>");
}


/* POST c/{id}/send: csrf, client_msg_id, body */

static void
ngx_chat_html_send_form(ngx_http_request_t *r, u_char *data, size_t len)
{
    ngx_str_t         csrf, cmid, body;
    ngx_chat_html_t  *h;

    h = ngx_chat_html_get(r);

    if (ngx_chat_html_form_field(data, len, "csrf", r->pool, &csrf) != NGX_OK
        || ngx_chat_html_csrf_ok(h, &csrf) != NGX_OK)
    {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_FORBIDDEN,
                                "This form has expired: reload the page and "
                                "try again."));
        return;
    }

    if (ngx_chat_html_form_field(data, len, "client_msg_id", r->pool, &cmid)
        != NGX_OK
        || ngx_chat_html_form_field(data, len, "body", r->pool, &body)
           != NGX_OK)
    {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_BAD_REQUEST,
                                "The form is incomplete."));
        return;
    }

    ngx_chat_html_send(r, &cmid, &body, NULL);
}


/* POST c/{id}/attach: the file is stored, its message follows */

static void
ngx_chat_html_uploaded(ngx_http_request_t *r, ngx_chat_upload_t *up,
    ngx_int_t status)
{
    ngx_str_t         *cmid, *body, empty;
    ngx_chat_html_t   *h;

    h = ngx_chat_html_get(r);

    cmid = ngx_chat_attach_field(up, "client_msg_id");
    body = ngx_chat_attach_field(up, "body");

    if (body == NULL) {
        ngx_str_null(&empty);
        body = &empty;
    }

    if (status != NGX_HTTP_CREATED) {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, status,
                                status == NGX_HTTP_UNSUPPORTED_MEDIA_TYPE
                                ? "This type of file is not taken."
                                : status == NGX_HTTP_REQUEST_ENTITY_TOO_LARGE
                                  ? "The file is too large."
                                  : up->error ? up->error
                                              : "The file was not taken."));
        return;
    }

    if (cmid == NULL) {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_BAD_REQUEST,
                                "The form is incomplete."));
        return;
    }

    ngx_chat_html_send(r, cmid, body, up->id);
}


static void
ngx_chat_html_send(ngx_http_request_t *r, ngx_str_t *cmid, ngx_str_t *body,
    u_char *attachment)
{
    json_t           *root;
    ngx_int_t         rc;
    const char       *code, *msg;
    ngx_chat_html_t  *h;
    ngx_chat_send_t  *snd;

    h = ngx_chat_html_get(r);

    root = json_pack("{s:s%,s:s%}", "client_msg_id", cmid->data, cmid->len,
                     "body", body->len ? (char *) body->data : "",
                     body->len);

    if (root && attachment
        && json_object_set_new(root, "attachments",
                               json_pack("[s#]", attachment,
                                         (size_t) NGX_CHAT_ATTACH_ID_LEN)))
    {
        json_decref(root);
        root = NULL;
    }

    if (root == NULL) {
        /* jansson takes UTF-8 only */
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_BAD_REQUEST,
                                "The message is not valid text."));
        return;
    }

    snd = ngx_chat_store_send_from_json(root, &h->user, h->conv, 0, &code,
                                        &msg);
    json_decref(root);

    if (snd == NULL) {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_BAD_REQUEST, msg));
        return;
    }

    snd->handler = ngx_chat_html_sent;

    rc = ngx_chat_api_store(r, snd);

    if (rc == NGX_DONE) {
        return;
    }

    ngx_http_finalize_request(r,
        ngx_chat_html_error(r, h, rc == NGX_BUSY ? NGX_HTTP_TOO_MANY_REQUESTS
                                                 : NGX_HTTP_SERVICE_UNAVAILABLE,
                            "The chat is busy: try again."));
}


static void
ngx_chat_html_sent(ngx_chat_send_t *snd)
{
    ngx_uint_t           status;
    ngx_chat_html_t     *h;
    ngx_http_request_t  *r;

    r = ngx_chat_api_sender(snd);

    if (r == NULL) {
        return;
    }

    h = ngx_chat_html_get(r);

    if (snd->rc != NGX_OK) {
        status = (ngx_strcmp(snd->error, "unavailable") == 0)
                 ? NGX_HTTP_SERVICE_UNAVAILABLE
                 : (ngx_strcmp(snd->error, "not_found") == 0)
                   ? NGX_HTTP_NOT_FOUND
                   : (ngx_strcmp(snd->error, "bad_request") == 0
                      || ngx_strcmp(snd->error, "conflict") == 0)
                     ? NGX_HTTP_BAD_REQUEST : NGX_HTTP_FORBIDDEN;

        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, status, snd->error_msg));
        return;
    }

    ngx_http_finalize_request(r, ngx_chat_html_redirect(r, h, h->conv));
}


static void
ngx_chat_html_logout(ngx_http_request_t *r, u_char *data, size_t len)
{
    ngx_str_t         csrf;
    ngx_chat_html_t  *h;

    h = ngx_chat_html_get(r);

    if (ngx_chat_html_form_field(data, len, "csrf", r->pool, &csrf) != NGX_OK
        || ngx_chat_html_csrf_ok(h, &csrf) != NGX_OK)
    {
        ngx_http_finalize_request(r,
            ngx_chat_html_error(r, h, NGX_HTTP_FORBIDDEN,
                                "This form has expired: reload the page and "
                                "try again."));
        return;
    }

    if (ngx_chat_html_cookie(r, h, 1) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    h->renew = 0;

    ngx_http_finalize_request(r, ngx_chat_html_redirect(r, h, -1));
}


/* a field of an application/x-www-form-urlencoded body, decoded */

static ngx_int_t
ngx_chat_html_form_field(u_char *data, size_t len, const char *name,
    ngx_pool_t *pool, ngx_str_t *value)
{
    u_char  *p, *end, *amp, *src, *dst, *q;
    size_t   n;

    n = ngx_strlen(name);
    p = data;
    end = data + len;

    while (p < end) {
        amp = ngx_strlchr(p, end, '&');
        if (amp == NULL) {
            amp = end;
        }

        if ((size_t) (amp - p) > n && p[n] == '='
            && ngx_strncmp(p, name, n) == 0)
        {
            p += n + 1;

            dst = ngx_pnalloc(pool, amp - p + 1);
            if (dst == NULL) {
                return NGX_ERROR;
            }

            for (q = dst, src = p; src < amp; src++) {
                *q++ = (*src == '+') ? ' ' : *src;
            }

            src = dst;
            q = dst;
            ngx_unescape_uri(&q, &src, q - dst + (amp - p), 0);

            value->data = dst;
            value->len = q - dst;

            return NGX_OK;
        }

        p = amp + 1;
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_chat_html_head(ngx_chat_buf_t *b, const char *title, size_t tlen,
    ngx_uint_t refresh)
{
    if (ngx_chat_buf_add_lit(b, "<!doctype html><html lang=\"en\"><head>"
                             "<meta charset=\"utf-8\"><meta name=\"viewport\" "
                             "content=\"width=device-width, initial-scale=1\">")
        != NGX_OK
        || (refresh
            && ngx_chat_buf_add_lit(b, "<meta http-equiv=\"refresh\" "
                                    "content=\"" NGX_CHAT_HTML_REFRESH "\">")
               != NGX_OK)
        || ngx_chat_buf_add_lit(b, "<title>") != NGX_OK
        || ngx_chat_html_add(b, (u_char *) title, tlen) != NGX_OK
        || ngx_chat_buf_add_lit(b, " &middot; Chat</title><style>"
               "body{font:16px/1.4 system-ui,sans-serif;margin:0 auto;"
               "max-width:48em;padding:0 1em}"
               "header{padding:.5em 0;border-bottom:1px solid #ccc}"
               "form.inline{display:inline}"
               ".msgs{list-style:none;padding:0}"
               ".msg{border-bottom:1px solid #eee;padding:.4em 0}"
               ".msg p{margin:.2em 0;white-space:pre-wrap;"
               "overflow-wrap:anywhere}"
               ".system{font-style:italic;color:#555}"
               ".gone{color:#888}.unread{font-weight:bold;color:#b00}"
               ".file img{max-width:100%;max-height:20em}"
               "textarea{width:100%}form{margin:1em 0}"
               "</style></head><body>") != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* text as HTML: the five characters that could end a text or a value */

static ngx_int_t
ngx_chat_html_add(ngx_chat_buf_t *b, const u_char *p, size_t n)
{
    u_char        *d;
    const u_char  *end;

    if (ngx_chat_buf_reserve(b, n * 6) != NGX_OK) {
        return NGX_ERROR;
    }

    d = b->data + b->len;

    for (end = p + n; p < end; p++) {
        switch (*p) {
        case '&':
            d = ngx_cpymem(d, "&amp;", 5);
            break;
        case '<':
            d = ngx_cpymem(d, "&lt;", 4);
            break;
        case '>':
            d = ngx_cpymem(d, "&gt;", 4);
            break;
        case '"':
            d = ngx_cpymem(d, "&quot;", 6);
            break;
        case '\'':
            d = ngx_cpymem(d, "&#39;", 5);
            break;
        default:
            *d++ = *p;
        }
    }

    b->len = d - b->data;

    return NGX_OK;
}


/* a conversation's members, comma separated, escaped */

static ngx_int_t
ngx_chat_html_members(ngx_chat_buf_t *b, json_t *conv)
{
    size_t   i;
    json_t  *u;

    json_array_foreach(json_object_get(conv, "members"), i, u) {
        if (!json_is_string(u)
            || (i && ngx_chat_buf_add_lit(b, ", ") != NGX_OK)
            || ngx_chat_html_add(b, (u_char *) json_string_value(u),
                                 json_string_length(u)) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* a string member of a JSON object, escaped; nothing when not a string */

static ngx_int_t
ngx_chat_html_add_json(ngx_chat_buf_t *b, json_t *o, const char *key)
{
    json_t  *v;

    v = json_object_get(o, key);

    if (!json_is_string(v)) {
        return NGX_OK;
    }

    return ngx_chat_html_add(b, (u_char *) json_string_value(v),
                             json_string_length(v));
}


static ngx_int_t
ngx_chat_html_hidden(ngx_chat_buf_t *b, ngx_chat_html_t *h)
{
    if (ngx_chat_buf_add_lit(b, "<input type=\"hidden\" name=\"csrf\" "
                             "value=\"") != NGX_OK
        || ngx_chat_buf_add(b, h->csrf, NGX_CHAT_HTML_CSRF_LEN) != NGX_OK
        || ngx_chat_buf_add_lit(b, "\">") != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* a page: its security headers, a renewed cookie; b is freed */

static ngx_int_t
ngx_chat_html_reply(ngx_http_request_t *r, ngx_chat_html_t *h,
    ngx_uint_t status, ngx_chat_buf_t *b)
{
    ngx_int_t         rc;
    ngx_uint_t        i;
    ngx_table_elt_t  *hd;

    static ngx_str_t  html = ngx_string("text/html; charset=utf-8");

    static ngx_str_t  headers[][2] = {
        { ngx_string("Content-Security-Policy"),
          ngx_string("default-src 'none'; img-src 'self'; "
                     "style-src 'unsafe-inline'; form-action 'self'; "
                     "frame-ancestors 'none'; base-uri 'none'") },
        { ngx_string("X-Content-Type-Options"), ngx_string("nosniff") },
        /* not "no-referrer": a form's Origin would then be "null" */
        { ngx_string("Referrer-Policy"), ngx_string("same-origin") },
        { ngx_string("Cache-Control"), ngx_string("no-store") },
        { ngx_null_string, ngx_null_string }
    };

    if (r->header_sent) {
        ngx_chat_buf_free(b);
        return NGX_ERROR;
    }

    for (i = 0; headers[i][0].len; i++) {
        hd = ngx_list_push(&r->headers_out.headers);
        if (hd == NULL) {
            ngx_chat_buf_free(b);
            return NGX_ERROR;
        }

        hd->hash = 1;
        hd->key = headers[i][0];
        hd->value = headers[i][1];
    }

    if (h->renew && h->user.len && ngx_chat_html_cookie(r, h, 0) != NGX_OK) {
        ngx_chat_buf_free(b);
        return NGX_ERROR;
    }

    h->renew = 0;

    rc = ngx_chat_http_send(r, status, &html, sizeof("text/html") - 1,
                            b->data, b->len);
    ngx_chat_buf_free(b);

    return rc;
}


static ngx_int_t
ngx_chat_html_error(ngx_http_request_t *r, ngx_chat_html_t *h,
    ngx_uint_t status, const char *text)
{
    ngx_chat_buf_t  b;

    ngx_memzero(&b, sizeof(ngx_chat_buf_t));

    if (ngx_chat_html_head(&b, "Chat", 4, 0) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "<main><h1>Sorry</h1><p>") != NGX_OK
        || ngx_chat_html_add(&b, (u_char *) text, ngx_strlen(text)) != NGX_OK
        || ngx_chat_buf_add_lit(&b, "</p><p><a href=\"") != NGX_OK
        || ngx_chat_html_add(&b, h->loc.data, h->loc.len) != NGX_OK
        || ((h->loc.len == 0 || h->loc.data[h->loc.len - 1] != '/')
            && ngx_chat_buf_add_lit(&b, "/") != NGX_OK)
        || ngx_chat_buf_add_lit(&b, "html/\">Back to the conversations</a>"
                                "</p></main></body></html>") != NGX_OK)
    {
        ngx_chat_buf_free(&b);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->renew = 0;

    return ngx_chat_html_reply(r, h, status, &b);
}


/* 303 to a page: conv > 0 its conversation, 0 the list, -1 the sign-in */

static ngx_int_t
ngx_chat_html_redirect(ngx_http_request_t *r, ngx_chat_html_t *h,
    int64_t conv)
{
    u_char           *p;
    ngx_table_elt_t  *loc;

    loc = ngx_list_push(&r->headers_out.headers);
    if (loc == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_pnalloc(r->pool, h->loc.len + sizeof("html/login") + 2
                             + NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    loc->hash = 1;
    ngx_str_set(&loc->key, "Location");
    loc->value.data = p;

    p = ngx_cpymem(p, h->loc.data, h->loc.len);

    if (h->loc.len == 0 || h->loc.data[h->loc.len - 1] != '/') {
        *p++ = '/';
    }

    p = (conv < 0) ? ngx_cpymem(p, "html/login", 10)
        : (conv == 0) ? ngx_cpymem(p, "html/", 5)
        : ngx_sprintf(p, "html/c/%L", conv);

    loc->value.len = p - loc->value.data;
    r->headers_out.location = loc;

    if (h->renew && h->user.len && ngx_chat_html_cookie(r, h, 0) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (r->method != NGX_HTTP_HEAD && !r->discard_body
        && r->request_body == NULL
        && ngx_http_discard_request_body(r) != NGX_OK)
    {
        r->keepalive = 0;
    }

    r->headers_out.status = NGX_HTTP_SEE_OTHER;
    r->headers_out.content_length_n = 0;
    r->header_only = 1;

    return ngx_http_send_header(r);
}


static ngx_chat_html_t *
ngx_chat_html_get(ngx_http_request_t *r)
{
    return ngx_chat_api_data(r);
}


/* a form or a file refused while it was read */

static ngx_int_t
ngx_chat_html_body_error(ngx_http_request_t *r, ngx_int_t status,
    const char *why)
{
    return ngx_chat_html_error(r, ngx_chat_html_get(r), status,
                               status == NGX_HTTP_REQUEST_ENTITY_TOO_LARGE
                               ? "The file or the message is too large."
                               : why ? why : "The form could not be read.");
}
