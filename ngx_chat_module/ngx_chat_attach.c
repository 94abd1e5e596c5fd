
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Attachments: uploads, their files, who may read them, and the sweep.
 *
 * An upload's body is written by nginx's own request body machinery into
 * its temporary file (client_body_temp_path: put it on the file system of
 * chat_attachments, so that placing the file is a rename).  On its way
 * there it passes ngx_chat_attach_filter(), which counts it against
 * chat_attachment_max_size, hashes it (SHA-256), keeps its first bytes to
 * tell its type by (the client's Content-Type and file name are not
 * trusted), and cuts a multipart/form-data body down to its one file
 * part, keeping the form's other fields in memory (the page without
 * JavaScript posts a form).  The file then gets a random id as its name.
 *
 * Reading goes through an internal location that the configuration maps
 * to the directory (chat_attachment_location): the module only decides
 * and sets the headers; nginx serves the bytes (sendfile, ranges,
 * validators).  A type that a browser could run (HTML, SVG, anything not
 * a plain image) is sent as a download, and every answer carries nosniff
 * and a sandboxing CSP.
 *
 * The first worker sweeps: chat_attachments_sweep() deletes the rows of
 * uploads that are gone (their messages deleted, their owner erased) or
 * were never sent, then the worker removes their files.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_json.h"
#include "ngx_chat_attach.h"

#include <openssl/evp.h>
#include <openssl/rand.h>


#define NGX_CHAT_ATTACH_SWEEP        10000
#define NGX_CHAT_ATTACH_SWEEP_BATCH  100

#define NGX_CHAT_ATTACH_FIELDS       16
#define NGX_CHAT_ATTACH_FIELD_BYTES  (16 * 1024)
#define NGX_CHAT_ATTACH_NAME_MAX     200

#define NGX_CHAT_MP_PREAMBLE         0
#define NGX_CHAT_MP_AFTER_DELIM      1
#define NGX_CHAT_MP_HEADERS          2
#define NGX_CHAT_MP_BODY             3
#define NGX_CHAT_MP_DONE             4


typedef struct {
    ngx_event_t                tick;
    ngx_chat_query_t          *query;            /* in flight */
    ngx_uint_t                 removed;
    ngx_connection_t           ident;            /* for the timer's log */
} ngx_chat_attach_sweep_t;


static ngx_int_t ngx_chat_attach_boundary(ngx_http_request_t *r,
    ngx_chat_upload_t *up);
static ngx_int_t ngx_chat_attach_multipart(ngx_http_request_t *r,
    ngx_chat_upload_t *up, ngx_buf_t *b, ngx_chain_t ***ll);
static ngx_int_t ngx_chat_attach_line(ngx_chat_upload_t *up, u_char c);
static ngx_int_t ngx_chat_attach_part_header(ngx_chat_upload_t *up);
static ngx_int_t ngx_chat_attach_param(u_char *p, u_char *end,
    const char *name, ngx_str_t *value);
static ngx_int_t ngx_chat_attach_data(ngx_http_request_t *r,
    ngx_chat_upload_t *up, u_char *p, size_t len, ngx_chain_t ***ll);
static ngx_int_t ngx_chat_attach_account(ngx_chat_upload_t *up, u_char *p,
    size_t len);
static void ngx_chat_attach_set_name(ngx_chat_upload_t *up, u_char *p,
    size_t len);
static const char *ngx_chat_attach_sniff(u_char *p, size_t n);
static ngx_int_t ngx_chat_attach_allowed(const char *mime);
static void ngx_chat_attach_sha_free(void *data);
static ngx_msec_t ngx_chat_attach_period(void);
static void ngx_chat_attach_tick(ngx_event_t *ev);
static void ngx_chat_attach_swept(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);


static ngx_chat_attach_sweep_t  ngx_chat_attach_sweeper;


/* images a browser shows and never runs: the only types served inline */
static const char  *ngx_chat_attach_inline[] = {
    "image/png", "image/jpeg", "image/gif", "image/webp", NULL
};


ngx_chat_upload_t *
ngx_chat_attach_upload(ngx_http_request_t *r)
{
    EVP_MD_CTX           *sha;
    ngx_str_t             name;
    ngx_pool_cleanup_t   *cln;
    ngx_chat_upload_t    *up;

    up = ngx_pcalloc(r->pool, sizeof(ngx_chat_upload_t));
    if (up == NULL) {
        return NULL;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    sha = EVP_MD_CTX_new();
    if (sha == NULL || EVP_DigestInit_ex(sha, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(sha);
        return NULL;
    }

    cln->handler = ngx_chat_attach_sha_free;
    cln->data = sha;

    up->sha = sha;
    up->pool = r->pool;
    up->max = ngx_chat_worker.cmcf->attach_max_size;

    if (ngx_array_init(&up->fields, r->pool, 4,
                       sizeof(ngx_chat_form_field_t))
        != NGX_OK)
    {
        return NULL;
    }

    if (ngx_chat_attach_boundary(r, up) != NGX_OK) {
        return NULL;
    }

    if (!up->multipart) {
        /* a raw body names its file in the query string */
        if (ngx_http_arg(r, (u_char *) "filename", 8, &name) == NGX_OK) {
            u_char  *dst, *src, *d;

            d = ngx_pnalloc(r->pool, name.len);
            if (d == NULL) {
                return NULL;
            }

            dst = d;
            src = name.data;
            ngx_unescape_uri(&dst, &src, name.len, 0);

            ngx_chat_attach_set_name(up, d, dst - d);
        }
    }

    return up;
}


/* multipart/form-data; boundary=...: the delimiter is CRLF "--" boundary */

static ngx_int_t
ngx_chat_attach_boundary(ngx_http_request_t *r, ngx_chat_upload_t *up)
{
    u_char     *p, *end;
    ngx_str_t  *ct, b;

    if (r->headers_in.content_type == NULL) {
        return NGX_OK;
    }

    ct = &r->headers_in.content_type->value;

    if (ct->len < 19
        || ngx_strncasecmp(ct->data, (u_char *) "multipart/form-data", 19)
           != 0)
    {
        return NGX_OK;
    }

    up->multipart = 1;

    /* multipart/form-data exactly, then a "boundary" parameter */

    if (ct->len > 19 && ct->data[19] != ';' && ct->data[19] != ' '
        && ct->data[19] != '\t')
    {
        up->multipart = 0;
        return NGX_OK;
    }

    p = ngx_strlcasestrn(ct->data + 19, ct->data + ct->len,
                         (u_char *) "boundary=", 9 - 1);

    while (p && p[-1] != ';' && p[-1] != ' ' && p[-1] != '\t') {
        p = ngx_strlcasestrn(p + 9, ct->data + ct->len,
                             (u_char *) "boundary=", 9 - 1);
    }

    if (p == NULL) {
        up->error = "a multipart body needs a boundary";
        up->status = NGX_HTTP_BAD_REQUEST;
        return NGX_OK;
    }

    p += 9;
    end = ct->data + ct->len;

    if (p < end && *p == '"') {
        p++;
        b.data = p;

        while (p < end && *p != '"') {
            p++;
        }

    } else {
        b.data = p;

        while (p < end && *p != ';' && *p != ' ' && *p != '\t') {
            p++;
        }
    }

    b.len = p - b.data;

    /* RFC 2046: 1 to 70 characters, no CR or LF */
    if (b.len == 0 || b.len > 70
        || ngx_strlchr(b.data, b.data + b.len, CR)
        || ngx_strlchr(b.data, b.data + b.len, LF))
    {
        up->error = "a bad multipart boundary";
        up->status = NGX_HTTP_BAD_REQUEST;
        return NGX_OK;
    }

    p = ngx_cpymem(up->delim, "\r\n--", 4);
    p = ngx_cpymem(p, b.data, b.len);
    up->ndelim = p - up->delim;

    /* the first delimiter comes without its CRLF: as if it were seen */
    up->matched = 2;
    up->state = NGX_CHAT_MP_PREAMBLE;

    return NGX_OK;
}


/*
 * The request body filter's part for an upload: *out is what goes on to
 * the temporary file.  An error is kept in up (the body is still read to
 * its end, then refused); only a body over the size limit stops the
 * reading at once.
 */
ngx_int_t
ngx_chat_attach_filter(ngx_http_request_t *r, ngx_chat_upload_t *up,
    ngx_chain_t *in, ngx_chain_t **out)
{
    ngx_buf_t     *b;
    ngx_chain_t   *cl, *ln, **ll;

    if (!up->multipart) {
        for (cl = in; cl; cl = cl->next) {
            if (cl->buf->in_file
                || ngx_chat_attach_account(up, cl->buf->pos,
                                           cl->buf->last - cl->buf->pos)
                   != NGX_OK)
            {
                return NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
            }
        }

        *out = in;
        return NGX_OK;
    }

    *out = NULL;
    ll = out;

    for (cl = in; cl; cl = cl->next) {
        if (cl->buf->in_file) {
            return NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
        }

        if (up->error == NULL
            && ngx_chat_attach_multipart(r, up, cl->buf, &ll) != NGX_OK)
        {
            return up->status ? (ngx_int_t) up->status
                              : NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        /*
         * Consumed: the length filter frees its buffer, and the read
         * buffer is reused only after the save filter has written what
         * points into it (both when the read buffer is full).
         */
        cl->buf->pos = cl->buf->last;

        if (cl->buf->last_buf) {
            ln = ngx_chain_get_free_buf(r->pool, &up->free);
            if (ln == NULL) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }

            b = ln->buf;
            ngx_memzero(b, sizeof(ngx_buf_t));
            b->tag = (ngx_buf_tag_t) &ngx_chat_attach_filter;
            b->last_buf = 1;

            *ll = ln;
            ll = &ln->next;
        }
    }

    *ll = NULL;

    return NGX_OK;
}


/* after the save filter took out: what it has written comes back */

void
ngx_chat_attach_filtered(ngx_http_request_t *r, ngx_chat_upload_t *up,
    ngx_chain_t *out)
{
    if (up->multipart) {
        ngx_chain_update_chains(r->pool, &up->free, &up->busy, &out,
                                (ngx_buf_tag_t) &ngx_chat_attach_filter);
    }
}


/*
 * One buffer of a multipart body.  Bytes that may be the start of a
 * delimiter are held back (up->matched of them; those of earlier buffers
 * are in up->delim) until the next bytes tell.
 */

static ngx_int_t
ngx_chat_attach_multipart(ngx_http_request_t *r, ngx_chat_upload_t *up,
    ngx_buf_t *b, ngx_chain_t ***ll)
{
    u_char     *p, *run, *end;
    size_t      held;
    ngx_int_t   rc;

    p = b->pos;
    end = b->last;
    run = p;
    held = up->matched;      /* of earlier buffers, never passed on */

    while (p < end) {

        if (up->state == NGX_CHAT_MP_AFTER_DELIM
            || up->state == NGX_CHAT_MP_HEADERS)
        {
            rc = ngx_chat_attach_line(up, *p++);

            if (rc != NGX_OK) {
                return rc;
            }

            run = p;
            continue;
        }

        if (up->state == NGX_CHAT_MP_DONE) {
            return NGX_OK;
        }

        /* the preamble or a part's data, up to the next delimiter */

        if (*p == up->delim[up->matched]) {
            up->matched++;
            p++;

            if (up->matched < up->ndelim) {
                continue;
            }

            /* a delimiter: the data ends where it began */

            if (p - run > (ssize_t) (up->ndelim - held)
                && ngx_chat_attach_data(r, up, run,
                                        p - run - (up->ndelim - held), ll)
                   != NGX_OK)
            {
                return NGX_ERROR;
            }

            up->matched = 0;
            held = 0;
            up->nline = 0;
            up->state = NGX_CHAT_MP_AFTER_DELIM;
            up->in_file = 0;
            up->field = NULL;
            run = p;
            continue;
        }

        if (up->matched) {
            /* not a delimiter after all: what was held is data */

            if (held) {
                if (ngx_chat_attach_data(r, up, up->delim, held, ll)
                    != NGX_OK)
                {
                    return NGX_ERROR;
                }

                held = 0;
            }

            up->matched = 0;

            /* this byte may begin one (a delimiter's CR is its only one) */
            continue;
        }

        p++;
    }

    /* the bytes of a delimiter begun here wait for the next buffer */

    if ((size_t) (end - run) > up->matched - held
        && ngx_chat_attach_data(r, up, run,
                                end - run - (up->matched - held), ll)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* a line after a delimiter, or a part's header line */

static ngx_int_t
ngx_chat_attach_line(ngx_chat_upload_t *up, u_char c)
{
    if (c != LF) {
        if (up->nline == sizeof(up->line)) {
            up->error = "a multipart header line is too long";
            up->status = NGX_HTTP_BAD_REQUEST;
            return NGX_ERROR;
        }

        up->line[up->nline++] = c;
        return NGX_OK;
    }

    if (up->nline && up->line[up->nline - 1] == CR) {
        up->nline--;
    }

    if (up->state == NGX_CHAT_MP_AFTER_DELIM) {
        up->state = (up->nline >= 2 && up->line[0] == '-'
                     && up->line[1] == '-')
                    ? NGX_CHAT_MP_DONE : NGX_CHAT_MP_HEADERS;
        up->nline = 0;
        return NGX_OK;
    }

    if (up->nline == 0) {
        /* the part's data begins */
        up->state = NGX_CHAT_MP_BODY;
        return NGX_OK;
    }

    if (ngx_chat_attach_part_header(up) != NGX_OK) {
        return NGX_ERROR;
    }

    up->nline = 0;

    return NGX_OK;
}


/* Content-Disposition: form-data; name="..."[; filename="..."] */

static ngx_int_t
ngx_chat_attach_part_header(ngx_chat_upload_t *up)
{
    u_char                 *p, *end;
    ngx_str_t               name, filename;
    ngx_chat_form_field_t  *f;

    p = up->line;
    end = p + up->nline;

    if (up->nline < 20
        || ngx_strncasecmp(p, (u_char *) "content-disposition:", 20) != 0)
    {
        return NGX_OK;
    }

    p += 20;

    if (ngx_chat_attach_param(p, end, "filename", &filename) == NGX_OK) {
        if (up->had_file) {
            up->error = "one file per upload";
            up->status = NGX_HTTP_BAD_REQUEST;
            return NGX_ERROR;
        }

        up->had_file = 1;
        up->in_file = 1;
        ngx_chat_attach_set_name(up, filename.data, filename.len);
        return NGX_OK;
    }

    if (ngx_chat_attach_param(p, end, "name", &name) != NGX_OK
        || name.len == 0 || name.len > 64)
    {
        return NGX_OK;
    }

    if (up->fields.nelts == NGX_CHAT_ATTACH_FIELDS) {
        up->error = "too many form fields";
        up->status = NGX_HTTP_BAD_REQUEST;
        return NGX_ERROR;
    }

    f = ngx_array_push(&up->fields);
    if (f == NULL) {
        return NGX_ERROR;
    }

    f->name.data = ngx_pnalloc(up->pool, name.len);
    if (f->name.data == NULL) {
        return NGX_ERROR;
    }

    f->name.len = name.len;
    ngx_memcpy(f->name.data, name.data, name.len);
    ngx_str_null(&f->value);

    up->field = f;

    return NGX_OK;
}


/* a parameter of a header value: name=value or name="value" */

static ngx_int_t
ngx_chat_attach_param(u_char *p, u_char *end, const char *name,
    ngx_str_t *value)
{
    size_t  n;

    n = ngx_strlen(name);

    while (p < end) {
        /* the next parameter starts after a ';' */
        p = ngx_strlchr(p, end, ';');
        if (p == NULL) {
            return NGX_DECLINED;
        }

        p++;

        while (p < end && (*p == ' ' || *p == '\t')) {
            p++;
        }

        if ((size_t) (end - p) <= n || p[n] != '='
            || ngx_strncasecmp(p, (u_char *) name, n) != 0)
        {
            continue;
        }

        p += n + 1;

        if (p < end && *p == '"') {
            value->data = ++p;

            while (p < end && *p != '"') {
                p++;
            }

        } else {
            value->data = p;

            while (p < end && *p != ';') {
                p++;
            }
        }

        value->len = p - value->data;

        return NGX_OK;
    }

    return NGX_DECLINED;
}


/* data of the current part: to the file, to a field, or nowhere */

static ngx_int_t
ngx_chat_attach_data(ngx_http_request_t *r, ngx_chat_upload_t *up,
    u_char *p, size_t len, ngx_chain_t ***ll)
{
    u_char                 *v;
    ngx_buf_t              *b;
    ngx_chain_t            *cl;
    ngx_chat_form_field_t  *f;

    if (up->state != NGX_CHAT_MP_BODY) {
        return NGX_OK;
    }

    if (up->field) {
        f = up->field;

        if (up->field_bytes + len > NGX_CHAT_ATTACH_FIELD_BYTES) {
            up->error = "the form's fields are too large";
            up->status = NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
            return NGX_ERROR;
        }

        /* one arena for all of them: a field is read whole before the next */

        if (up->arena == NULL) {
            up->arena = ngx_pnalloc(up->pool, NGX_CHAT_ATTACH_FIELD_BYTES);
            if (up->arena == NULL) {
                return NGX_ERROR;
            }
        }

        v = up->arena + up->field_bytes;

        if (f->value.data == NULL) {
            f->value.data = v;
        }

        ngx_memcpy(v, p, len);
        f->value.len += len;
        up->field_bytes += len;

        return NGX_OK;
    }

    if (!up->in_file) {
        return NGX_OK;
    }

    if (ngx_chat_attach_account(up, p, len) != NGX_OK) {
        up->error = "the file is too large";
        up->status = NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
        return NGX_ERROR;
    }

    /*
     * The bytes are in the read buffer, which the save filter writes out
     * before it is reused, or they are the start of the delimiter, which
     * is up->delim's: no copy.  The buffers come back once written.
     */

    cl = ngx_chain_get_free_buf(r->pool, &up->free);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    b = cl->buf;
    ngx_memzero(b, sizeof(ngx_buf_t));

    b->tag = (ngx_buf_tag_t) &ngx_chat_attach_filter;
    b->temporary = 1;
    b->start = p;
    b->pos = p;
    b->last = p + len;
    b->end = p + len;

    **ll = cl;
    *ll = &cl->next;

    return NGX_OK;
}


static ngx_int_t
ngx_chat_attach_account(ngx_chat_upload_t *up, u_char *p, size_t len)
{
    size_t  n;

    up->size += len;

    if (up->size > up->max) {
        return NGX_ERROR;
    }

    if (up->nhead < sizeof(up->head)) {
        n = ngx_min(len, sizeof(up->head) - up->nhead);
        ngx_memcpy(up->head + up->nhead, p, n);
        up->nhead += n;
    }

    if (len && EVP_DigestUpdate(up->sha, p, len) != 1) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * The name shown for the file: its last path segment, without control
 * characters, valid UTF-8, at most NGX_CHAT_ATTACH_NAME_MAX bytes.
 */

static void
ngx_chat_attach_set_name(ngx_chat_upload_t *up, u_char *p, size_t len)
{
    u_char  *s, *d, *end, *last;
    size_t   n;

    end = p + len;

    for (s = p; s < end; s++) {
        if (*s == '/' || *s == '\\') {
            p = s + 1;
        }
    }

    n = ngx_min((size_t) (end - p), NGX_CHAT_ATTACH_NAME_MAX);

    d = ngx_pnalloc(up->pool, n);
    if (d == NULL) {
        return;
    }

    up->name.data = d;

    for (s = p; s < p + n; s++) {
        *d++ = (*s < 0x20 || *s == 0x7f) ? '_' : *s;
    }

    /* a cut in the middle of a character: back to its start */

    last = d;

    while (ngx_chat_utf8_valid(up->name.data, last - up->name.data)
           != NGX_OK && last > up->name.data && last > d - 4)
    {
        last--;
    }

    up->name.len = last - up->name.data;

    if (ngx_chat_utf8_valid(up->name.data, up->name.len) != NGX_OK) {
        up->name.len = 0;
    }
}


ngx_str_t *
ngx_chat_attach_field(ngx_chat_upload_t *up, const char *name)
{
    size_t                  n;
    ngx_uint_t              i;
    ngx_chat_form_field_t  *f;

    n = ngx_strlen(name);
    f = up->fields.elts;

    for (i = 0; i < up->fields.nelts; i++) {
        if (f[i].name.len == n
            && ngx_strncmp(f[i].name.data, name, n) == 0)
        {
            return &f[i].value;
        }
    }

    return NULL;
}


/*
 * The whole body is in the temporary file: tells its type, checks it,
 * names it and moves it into the directory.  NGX_OK, or the HTTP status
 * of the refusal with up->error saying why.
 */
ngx_int_t
ngx_chat_attach_finish(ngx_http_request_t *r, ngx_chat_upload_t *up)
{
    u_char                 *p;
    unsigned int            n;
    ngx_str_t              *src;
    ngx_ext_rename_file_t   ext;
    ngx_chat_main_conf_t   *cmcf;
    u_char                  md[EVP_MAX_MD_SIZE], rnd[16];

    cmcf = ngx_chat_worker.cmcf;

    if (up->error) {
        return up->status;
    }

    if (up->multipart && !up->had_file) {
        up->error = "the form has no file";
        return NGX_HTTP_BAD_REQUEST;
    }

    if (up->size == 0) {
        up->error = "the file is empty";
        return NGX_HTTP_BAD_REQUEST;
    }

    up->mime = ngx_chat_attach_sniff(up->head, up->nhead);

    if (ngx_chat_attach_allowed(up->mime) != NGX_OK) {
        up->error = "this type of file is not taken";
        return NGX_HTTP_UNSUPPORTED_MEDIA_TYPE;
    }

    if (up->name.len == 0) {
        ngx_str_set(&up->name, "file");
    }

    if (EVP_DigestFinal_ex(up->sha, md, &n) != 1
        || RAND_bytes(rnd, sizeof(rnd)) != 1)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    *ngx_hex_dump(up->sha256, md, n) = '\0';
    *ngx_hex_dump(up->id, rnd, sizeof(rnd)) = '\0';

    if (r->request_body == NULL || r->request_body->temp_file == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    src = &r->request_body->temp_file->file.name;

    up->path.len = cmcf->attach_dir.len + 1 + NGX_CHAT_ATTACH_ID_LEN;
    up->path.data = ngx_pnalloc(r->pool, up->path.len + 1);
    if (up->path.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_cpymem(up->path.data, cmcf->attach_dir.data,
                   cmcf->attach_dir.len);
    *p++ = '/';
    p = ngx_cpymem(p, up->id, NGX_CHAT_ATTACH_ID_LEN);
    *p = '\0';

    /* as the dav module: a rename within one file system */

    ext.access = 0600;
    ext.path_access = 0;
    ext.time = -1;
    ext.create_path = 0;
    ext.delete_file = 1;
    ext.log = r->connection->log;

    if (ngx_ext_rename_file(src, &up->path, &ext) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    up->placed = 1;

    return NGX_OK;
}


/*
 * Removes an upload's file by its id (a row never stored, or swept):
 * NGX_OK, also when it was not there.
 */

ngx_int_t
ngx_chat_attach_remove(u_char *id)
{
    u_char                *p;
    ngx_chat_main_conf_t  *cmcf;
    u_char                 path[NGX_MAX_PATH];

    cmcf = ngx_chat_worker.cmcf;

    if (ngx_chat_attach_valid_id(id, ngx_strlen(id)) != NGX_OK
        || cmcf->attach_dir.len + 1 + NGX_CHAT_ATTACH_ID_LEN >= NGX_MAX_PATH)
    {
        return NGX_ERROR;
    }

    p = ngx_cpymem(path, cmcf->attach_dir.data, cmcf->attach_dir.len);
    *p++ = '/';
    p = ngx_cpymem(p, id, NGX_CHAT_ATTACH_ID_LEN);
    *p = '\0';

    if (ngx_delete_file(path) == NGX_FILE_ERROR && ngx_errno != NGX_ENOENT) {
        ngx_log_error(NGX_LOG_ERR, ngx_chat_worker.log, ngx_errno,
                      ngx_delete_file_n " \"%s\" failed", path);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* the store did not take the upload: its file goes */

void
ngx_chat_attach_discard(ngx_chat_upload_t *up, ngx_log_t *log)
{
    if (up->placed && ngx_delete_file(up->path.data) == NGX_FILE_ERROR) {
        ngx_log_error(NGX_LOG_ERR, log, ngx_errno,
                      ngx_delete_file_n " \"%V\" failed", &up->path);
    }

    up->placed = 0;
}


/*
 * The type by the first bytes.  Anything that a browser might take for
 * markup is "text/html" (refused unless listed, and never inline).
 */

static const char *
ngx_chat_attach_sniff(u_char *p, size_t n)
{
    size_t  i;

    if (n >= 8 && ngx_memcmp(p, "\x89PNG\r\n\x1a\n", 8) == 0) {
        return "image/png";
    }

    if (n >= 3 && ngx_memcmp(p, "\xff\xd8\xff", 3) == 0) {
        return "image/jpeg";
    }

    if (n >= 6
        && (ngx_memcmp(p, "GIF87a", 6) == 0 || ngx_memcmp(p, "GIF89a", 6) == 0))
    {
        return "image/gif";
    }

    if (n >= 12 && ngx_memcmp(p, "RIFF", 4) == 0
        && ngx_memcmp(p + 8, "WEBP", 4) == 0)
    {
        return "image/webp";
    }

    if (n >= 5 && ngx_memcmp(p, "%PDF-", 5) == 0) {
        return "application/pdf";
    }

    if (n >= 4 && ngx_memcmp(p, "PK\x03\x04", 4) == 0) {
        return "application/zip";
    }

    /* text: skip a BOM and white space; '<' first is markup */

    i = (n >= 3 && ngx_memcmp(p, "\xef\xbb\xbf", 3) == 0) ? 3 : 0;

    while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == CR
                     || p[i] == LF))
    {
        i++;
    }

    if (i < n && p[i] == '<') {
        return "text/html";
    }

    for (i = 0; i < n; i++) {
        if ((p[i] < 0x20 && p[i] != '\t' && p[i] != CR && p[i] != LF
             && p[i] != '\f')
            || p[i] == 0x7f)
        {
            return "application/octet-stream";
        }
    }

    /* the head may end inside a character: its start must be UTF-8 */

    for (i = n; i > 0 && n - i < 4; i--) {
        if (ngx_chat_utf8_valid(p, i) == NGX_OK) {
            return "text/plain";
        }
    }

    return "application/octet-stream";
}


static ngx_int_t
ngx_chat_attach_allowed(const char *mime)
{
    ngx_str_t   *t;
    ngx_uint_t   i;

    t = ngx_chat_worker.cmcf->attach_types->elts;

    for (i = 0; i < ngx_chat_worker.cmcf->attach_types->nelts; i++) {
        if (t[i].len == ngx_strlen(mime)
            && ngx_strncasecmp(t[i].data, (u_char *) mime, t[i].len) == 0)
        {
            return NGX_OK;
        }
    }

    return NGX_DECLINED;
}


ngx_int_t
ngx_chat_attach_valid_id(u_char *p, size_t len)
{
    size_t  i;

    if (len != NGX_CHAT_ATTACH_ID_LEN) {
        return NGX_DECLINED;
    }

    for (i = 0; i < len; i++) {
        if (!((p[i] >= '0' && p[i] <= '9') || (p[i] >= 'a' && p[i] <= 'f'))) {
            return NGX_DECLINED;
        }
    }

    return NGX_OK;
}


/*
 * The headers of an authorized download, then nginx serves the file from
 * the internal location.  Returns what the content phase returns.
 */
ngx_int_t
ngx_chat_attach_serve(ngx_http_request_t *r, u_char *id, ngx_str_t *name,
    ngx_str_t *mime)
{
    u_char                *p;
    size_t                 len;
    ngx_str_t              uri;
    ngx_uint_t             i, safe;
    ngx_table_elt_t       *h;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_chat_worker.cmcf;

    safe = 0;

    for (i = 0; ngx_chat_attach_inline[i]; i++) {
        if (mime->len == ngx_strlen(ngx_chat_attach_inline[i])
            && ngx_strncmp(mime->data, ngx_chat_attach_inline[i], mime->len)
               == 0)
        {
            safe = 1;
        }
    }

    r->headers_out.content_type.data = ngx_pstrdup(r->pool, mime);
    if (r->headers_out.content_type.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    r->headers_out.content_type.len = mime->len;
    r->headers_out.content_type_len = mime->len;
    r->headers_out.content_type_lowcase = NULL;

    /*
     * Content-Disposition: an ASCII name for old clients, the real one
     * percent-encoded (RFC 6266); the ASCII one has no quote or backslash.
     */

    len = sizeof("attachment; filename=\"\"; filename*=UTF-8''") - 1
          + name->len + 3 * name->len;

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Content-Disposition");
    h->value.data = p;

    p = safe ? ngx_cpymem(p, "inline; filename=\"", 18)
             : ngx_cpymem(p, "attachment; filename=\"", 22);

    for (i = 0; i < name->len; i++) {
        *p++ = (name->data[i] < 0x20 || name->data[i] >= 0x7f
                || name->data[i] == '"' || name->data[i] == '\\')
               ? '_' : name->data[i];
    }

    p = ngx_cpymem(p, "\"; filename*=UTF-8''", 20);
    p = (u_char *) ngx_escape_uri(p, name->data, name->len,
                                  NGX_ESCAPE_URI_COMPONENT);
    h->value.len = p - h->value.data;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "X-Content-Type-Options");
    ngx_str_set(&h->value, "nosniff");

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Content-Security-Policy");
    ngx_str_set(&h->value, "default-src 'none'; img-src 'self'; "
                           "style-src 'unsafe-inline'; sandbox");

    /* what a member may read depends on who asks: no shared caches */

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "private, max-age=300");

    uri.len = cmcf->attach_location.len + NGX_CHAT_ATTACH_ID_LEN;
    uri.data = ngx_pnalloc(r->pool, uri.len);
    if (uri.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_cpymem(uri.data, cmcf->attach_location.data,
                   cmcf->attach_location.len);
    ngx_memcpy(p, id, NGX_CHAT_ATTACH_ID_LEN);

    return ngx_http_internal_redirect(r, &uri, NULL);
}


static void
ngx_chat_attach_sha_free(void *data)
{
    EVP_MD_CTX_free(data);
}


/* chat_attachment_types type ... */

char *
ngx_chat_attach_types(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_main_conf_t *cmcf = conf;

    ngx_str_t   *value, *t;
    ngx_uint_t   i;

    if (cmcf->attach_types != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    cmcf->attach_types = ngx_array_create(cf->pool, cf->args->nelts,
                                          sizeof(ngx_str_t));
    if (cmcf->attach_types == NULL) {
        return NGX_CONF_ERROR;
    }

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {
        if (ngx_strlchr(value[i].data, value[i].data + value[i].len, '/')
            == NULL)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "chat_attachment_types: \"%V\" is not a "
                               "media type", &value[i]);
            return NGX_CONF_ERROR;
        }

        t = ngx_array_push(cmcf->attach_types);
        if (t == NULL) {
            return NGX_CONF_ERROR;
        }

        *t = value[i];
    }

    return NGX_CONF_OK;
}


/* the defaults, and the directory as an absolute path */

char *
ngx_chat_attach_conf(ngx_conf_t *cf, ngx_chat_main_conf_t *cmcf)
{
    ngx_str_t  *t;
    ngx_uint_t  i;

    static const char  *types[] = {
        "image/png", "image/jpeg", "image/gif", "image/webp",
        "application/pdf", "text/plain", NULL
    };

    if (cmcf->attach_max_size == NGX_CONF_UNSET) {
        cmcf->attach_max_size = 10 * 1024 * 1024;
    }
    ngx_conf_init_value(cmcf->attach_unsent, 24 * 3600);

    if (cmcf->attach_location.data == NULL) {
        ngx_str_set(&cmcf->attach_location, "/chat-files/");
    }

    if (cmcf->attach_location.len == 0
        || cmcf->attach_location.data[0] != '/'
        || cmcf->attach_location.data[cmcf->attach_location.len - 1] != '/')
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_attachment_location must begin and end "
                           "with \"/\"");
        return NGX_CONF_ERROR;
    }

    if (cmcf->attach_types == NGX_CONF_UNSET_PTR) {
        cmcf->attach_types = ngx_array_create(cf->pool, 6, sizeof(ngx_str_t));
        if (cmcf->attach_types == NULL) {
            return NGX_CONF_ERROR;
        }

        for (i = 0; types[i]; i++) {
            t = ngx_array_push(cmcf->attach_types);
            if (t == NULL) {
                return NGX_CONF_ERROR;
            }

            t->data = (u_char *) types[i];
            t->len = ngx_strlen(types[i]);
        }
    }

    if (cmcf->attach_dir.len == 0) {
        return NGX_CONF_OK;
    }

    while (cmcf->attach_dir.len > 1
           && cmcf->attach_dir.data[cmcf->attach_dir.len - 1] == '/')
    {
        cmcf->attach_dir.len--;
    }

    if (ngx_conf_full_name(cf->cycle, &cmcf->attach_dir, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


ngx_int_t
ngx_chat_attach_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_attach_sweep_t  *sw;

    sw = &ngx_chat_attach_sweeper;

    if (ngx_chat_worker.cmcf->attach_dir.len == 0
        || ngx_chat_worker.slot != 0)
    {
        return NGX_OK;
    }

    sw->tick.handler = ngx_chat_attach_tick;
    sw->tick.log = cycle->log;
    sw->ident.fd = (ngx_socket_t) -1;
    sw->tick.data = &sw->ident;
    sw->tick.cancelable = 1;

    ngx_add_timer(&sw->tick, ngx_chat_attach_period());

    return NGX_OK;
}


void
ngx_chat_attach_exit_process(void)
{
    ngx_chat_attach_sweep_t  *sw;

    sw = &ngx_chat_attach_sweeper;

    if (sw->tick.timer_set) {
        ngx_del_timer(&sw->tick);
    }

    if (sw->query) {
        sw->query->data = NULL;
        sw->query = NULL;
    }
}


/* every 10 s, or twice per chat_attachment_unsent_ttl when shorter */

static ngx_msec_t
ngx_chat_attach_period(void)
{
    time_t  ttl;

    ttl = ngx_chat_worker.cmcf->attach_unsent;

    if (ttl >= 2 * NGX_CHAT_ATTACH_SWEEP / 1000) {
        return NGX_CHAT_ATTACH_SWEEP;
    }

    return ttl < 2 ? 1000 : (ngx_msec_t) ttl * 500;
}


static void
ngx_chat_attach_tick(ngx_event_t *ev)
{
    u_char                   *p;
    ngx_chat_query_t         *q;
    ngx_chat_attach_sweep_t  *sw;

    sw = &ngx_chat_attach_sweeper;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    ngx_add_timer(&sw->tick, ngx_chat_attach_period());

    if (sw->query || !ngx_chat_db_ready()) {
        return;
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_ATTACH_SWEEP,
                             2 * (NGX_INT64_LEN + 1));
    if (q == NULL) {
        return;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%T", ngx_chat_worker.cmcf->attach_unsent);
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_sprintf(p, "%d", NGX_CHAT_ATTACH_SWEEP_BATCH);
    *p++ = '\0';

    q->handler = ngx_chat_attach_swept;
    q->data = sw;

    if (ngx_chat_db_query(q) != NGX_OK) {
        ngx_chat_query_free(q);
        return;
    }

    sw->query = q;
}


/*
 * The rows are gone (committed): their files go now, at most a batch per
 * tick.  A worker killed between the two leaves files without rows, which
 * nobody can read; they are listed in the log of the next start only by
 * an operator's "find" (README).
 */

static void
ngx_chat_attach_swept(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    int                       i, n;
    ngx_chat_attach_sweep_t  *sw;

    sw = q->data;
    ngx_chat_query_free(q);

    if (sw == NULL) {
        return;
    }

    sw->query = NULL;

    if (rc != NGX_OK) {
        return;
    }

    n = PQntuples(res);

    for (i = 0; i < n; i++) {
        if (ngx_chat_attach_remove((u_char *) PQgetvalue(res, i, 0))
            == NGX_OK)
        {
            sw->removed++;
        }
    }

    if (n) {
        ngx_log_error(NGX_LOG_INFO, ngx_chat_worker.log, 0,
                      "chat: the attachment sweep removed %d uploads "
                      "(%ui files so far)", n, sw->removed);
    }
}
