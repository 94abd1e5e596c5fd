
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Caps on what one client can hold in a worker.  nginx's limit_conn counts
 * a connection while it is an HTTP request; a WebSocket detached from its
 * request, or a session that never authenticates, would escape it.  The
 * counts are per worker (a listen with reuseport spreads one address over
 * the workers, so the whole server allows up to workers x the cap) and
 * live in the worker's own memory: a worker that dies takes its counts
 * with it.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_limit.h"


struct ngx_chat_limit_addr_s {
    ngx_str_node_t             sn;               /* key: address bytes */
    ngx_uint_t                 count;
};


static ngx_rbtree_t        ngx_chat_limit_addrs;
static ngx_rbtree_node_t   ngx_chat_limit_sentinel;
static ngx_uint_t          ngx_chat_limit_unauth;


static ngx_int_t
ngx_chat_limit_key(ngx_connection_t *c, ngx_str_t *key)
{
    switch (c->sockaddr->sa_family) {

#if (NGX_HAVE_INET6)
    case AF_INET6:
        key->data = ((struct sockaddr_in6 *) c->sockaddr)->sin6_addr.s6_addr;
        key->len = 16;
        return NGX_OK;
#endif

    case AF_INET:
        key->data = (u_char *) &((struct sockaddr_in *) c->sockaddr)->sin_addr;
        key->len = 4;
        return NGX_OK;

    default:
        /* a unix socket: the client is local, there is nothing to tell */
        return NGX_DECLINED;
    }
}


/*
 * NGX_OK: counted (*node to release; NULL when not counted at all);
 * NGX_BUSY: the address holds chat_max_connections_per_address already.
 */
ngx_int_t
ngx_chat_limit_addr_acquire(ngx_connection_t *c, ngx_chat_limit_addr_t **node)
{
    uint32_t                hash;
    ngx_str_t               key;
    ngx_uint_t              max;
    ngx_chat_limit_addr_t  *a;

    *node = NULL;
    max = ngx_chat_worker.cmcf->max_connections_per_address;

    if (max == 0 || ngx_chat_limit_key(c, &key) != NGX_OK) {
        return NGX_OK;
    }

    if (ngx_chat_limit_addrs.root == NULL) {
        ngx_rbtree_init(&ngx_chat_limit_addrs, &ngx_chat_limit_sentinel,
                        ngx_str_rbtree_insert_value);
    }

    hash = ngx_crc32_short(key.data, key.len);

    a = (ngx_chat_limit_addr_t *) ngx_str_rbtree_lookup(&ngx_chat_limit_addrs,
                                                        &key, hash);

    if (a == NULL) {
        a = ngx_alloc(sizeof(ngx_chat_limit_addr_t) + key.len, c->log);
        if (a == NULL) {
            return NGX_ERROR;
        }

        a->sn.str.data = (u_char *) &a[1];
        a->sn.str.len = key.len;
        ngx_memcpy(a->sn.str.data, key.data, key.len);
        a->sn.node.key = hash;
        a->count = 0;

        ngx_rbtree_insert(&ngx_chat_limit_addrs, &a->sn.node);

    } else if (a->count >= max) {
        ngx_log_error(NGX_LOG_WARN, c->log, 0,
                      "chat: client address holds %ui connections "
                      "in this worker, refusing another", a->count);
        return NGX_BUSY;
    }

    a->count++;
    *node = a;

    return NGX_OK;
}


void
ngx_chat_limit_addr_release(ngx_chat_limit_addr_t *a)
{
    if (a == NULL) {
        return;
    }

    if (--a->count == 0) {
        ngx_rbtree_delete(&ngx_chat_limit_addrs, &a->sn.node);
        ngx_free(a);
    }
}


ngx_int_t
ngx_chat_limit_unauth_full(void)
{
    ngx_uint_t  max;

    max = ngx_chat_worker.cmcf->max_unauthenticated;

    return max && ngx_chat_limit_unauth >= max;
}


void
ngx_chat_limit_unauth_add(ngx_int_t n)
{
    ngx_chat_limit_unauth += n;
}
