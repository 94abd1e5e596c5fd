
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_JSON_H_INCLUDED_
#define _NGX_CHAT_JSON_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <jansson.h>


/* a growable byte buffer on the heap, for text that outlives a pool */
typedef struct {
    u_char                    *data;
    size_t                     len;
    size_t                     cap;
} ngx_chat_buf_t;


ngx_int_t ngx_chat_buf_reserve(ngx_chat_buf_t *b, size_t n);
ngx_int_t ngx_chat_buf_add(ngx_chat_buf_t *b, const void *p, size_t n);
ngx_int_t ngx_chat_buf_add_json_str(ngx_chat_buf_t *b, const u_char *p,
    size_t n);
ngx_int_t ngx_chat_buf_add_uint(ngx_chat_buf_t *b, uint64_t v);
ngx_int_t ngx_chat_buf_add_error(ngx_chat_buf_t *b, const char *code,
    const char *msg, ngx_msec_t retry_after);
void ngx_chat_buf_free(ngx_chat_buf_t *b);

#define ngx_chat_buf_add_lit(b, s)  ngx_chat_buf_add(b, s, sizeof(s) - 1)
#define ngx_chat_buf_add_str(b, s)  ngx_chat_buf_add(b, (s)->data, (s)->len)


json_t *ngx_chat_json_parse(const u_char *p, size_t n);
ngx_int_t ngx_chat_json_str(json_t *o, const char *key, ngx_str_t *v,
    size_t max, ngx_uint_t required);
ngx_int_t ngx_chat_json_id(json_t *o, const char *key, int64_t *v,
    ngx_uint_t required);
ngx_int_t ngx_chat_json_int(json_t *o, const char *key, int64_t *v,
    ngx_uint_t required);
ngx_int_t ngx_chat_parse_id(u_char *p, size_t n, int64_t *v);
ngx_int_t ngx_chat_valid_user_id(u_char *p, size_t n);
ngx_int_t ngx_chat_utf8_valid(u_char *p, size_t len);


#endif /* _NGX_CHAT_JSON_H_INCLUDED_ */
