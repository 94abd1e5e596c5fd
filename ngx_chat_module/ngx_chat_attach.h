
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_ATTACH_H_INCLUDED_
#define _NGX_CHAT_ATTACH_H_INCLUDED_


#include "ngx_chat_module.h"


#define NGX_CHAT_ATTACH_ID_LEN  32


typedef struct ngx_chat_upload_s  ngx_chat_upload_t;

/* a small field of a multipart form (no file) */
typedef struct {
    ngx_str_t                  name;
    ngx_str_t                  value;
} ngx_chat_form_field_t;


/*
 * An upload being read: the body goes through ngx_chat_attach_filter()
 * on its way to nginx's temporary file (a multipart body is cut down to
 * its file part, its other fields are kept in memory), which hashes it,
 * keeps its first bytes and counts it.  A body it refuses (too large, a
 * bad form) stops being read at once, with up->error saying why.
 * ngx_chat_attach_finish() moves the file into chat_attachments under a
 * random id.
 */
struct ngx_chat_upload_s {
    void                      *sha;              /* EVP_MD_CTX */
    off_t                      size;             /* of the file */
    off_t                      max;
    u_char                     head[32];         /* its first bytes */
    size_t                     nhead;
    const char                *error;            /* the body is refused */
    ngx_uint_t                 status;           /* and with it */

    /* the result */
    ngx_str_t                  name;             /* sanitized file name */
    const char                *mime;
    u_char                     id[NGX_CHAT_ATTACH_ID_LEN + 1];
    u_char                     sha256[65];
    ngx_str_t                  path;             /* where the file is */
    unsigned                   placed:1;         /* the file is there */

    /* multipart/form-data */
    unsigned                   multipart:1;
    unsigned                   in_file:1;        /* this part is the file */
    unsigned                   had_file:1;
    ngx_uint_t                 state;
    u_char                     delim[80];        /* CRLF "--" boundary */
    size_t                     ndelim;
    size_t                     matched;          /* of delim, held back */
    u_char                     line[1024];       /* a part header line */
    size_t                     nline;
    ngx_array_t                fields;           /* ngx_chat_form_field_t */
    u_char                    *arena;            /* the fields' values */
    size_t                     field_bytes;
    ngx_chat_form_field_t     *field;            /* being read */
    ngx_pool_t                *pool;

    /* buffers passed on, reused once the save filter has written them */
    ngx_chain_t               *free;
    ngx_chain_t               *busy;
};


ngx_chat_upload_t *ngx_chat_attach_upload(ngx_http_request_t *r);
ngx_int_t ngx_chat_attach_filter(ngx_http_request_t *r,
    ngx_chat_upload_t *up, ngx_chain_t *in, ngx_chain_t **out);
void ngx_chat_attach_filtered(ngx_http_request_t *r, ngx_chat_upload_t *up,
    ngx_chain_t *out);
ngx_int_t ngx_chat_attach_finish(ngx_http_request_t *r,
    ngx_chat_upload_t *up);
void ngx_chat_attach_discard(ngx_chat_upload_t *up, ngx_log_t *log);
ngx_int_t ngx_chat_attach_remove(u_char *id);
ngx_str_t *ngx_chat_attach_field(ngx_chat_upload_t *up, const char *name);
ngx_int_t ngx_chat_attach_valid_id(u_char *p, size_t len);
ngx_int_t ngx_chat_attach_serve(ngx_http_request_t *r, u_char *id,
    ngx_str_t *name, ngx_str_t *mime);
ngx_int_t ngx_chat_attach_init_process(ngx_cycle_t *cycle);
void ngx_chat_attach_exit_process(void);
char *ngx_chat_attach_types(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
char *ngx_chat_attach_conf(ngx_conf_t *cf, ngx_chat_main_conf_t *cmcf);


#endif /* _NGX_CHAT_ATTACH_H_INCLUDED_ */
