
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
#include "ngx_chat_metrics.h"


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


/*
 * Rate limits.  A bucket per (kind, user) and per (kind, address) in the
 * shared zone, so that every worker counts against one: a client spread
 * over workers (or reconnecting to another) gets no more.  The bucket is
 * limit_req's: "excess" is how far ahead of the rate the key is, in
 * thousandths of a request; a request that would take it past the burst
 * is refused and changes nothing.  Buckets are kept in LRU order and the
 * least recent ones are dropped when there are too many or the zone is
 * full: a dropped bucket only forgets a key that was quiet.
 */

typedef struct {
    ngx_str_node_t             sn;               /* kind, per, key bytes */
    ngx_queue_t                lru;
    ngx_msec_t                 last;
    ngx_int_t                  excess;           /* x 1000 */
    ngx_uint_t                 refused;          /* since the last taken */
} ngx_chat_rate_node_t;


static const char  *ngx_chat_rate_kinds[] = {
    "send", "typing", "connect", "rest"
};


static ngx_chat_rate_node_t *ngx_chat_rate_node(ngx_uint_t kind,
    ngx_uint_t per, ngx_str_t *key, ngx_int_t *excess,
    ngx_chat_rate_node_t *keep, ngx_uint_t *created);
static void ngx_chat_rate_free(ngx_chat_rate_sh_t *rs,
    ngx_chat_rate_node_t *node);
static void ngx_chat_rate_expire(ngx_chat_rate_sh_t *rs, ngx_uint_t n,
    ngx_chat_rate_node_t *keep);


void
ngx_chat_rate_init_zone(ngx_chat_rate_sh_t *rs)
{
    ngx_rbtree_init(&rs->rbtree, &rs->sentinel, ngx_str_rbtree_insert_value);
    ngx_queue_init(&rs->lru);
    rs->count = 0;
}


/* the key of a client address: its bytes; empty for a unix socket */

void
ngx_chat_rate_addr(ngx_connection_t *c, u_char *buf, size_t *len)
{
    ngx_str_t  key;

    if (ngx_chat_limit_key(c, &key) != NGX_OK) {
        *len = 0;
        return;
    }

    ngx_memcpy(buf, key.data, key.len);
    *len = key.len;
}


/*
 * NGX_OK: taken from the user's bucket and the address's (either may be
 * NULL or empty: not counted); NGX_BUSY: refused, *retry_after says when
 * the next may come.  A refusal by either bucket takes from neither.
 */
ngx_int_t
ngx_chat_rate_check(ngx_uint_t kind, ngx_str_t *user, ngx_str_t *addr,
    ngx_log_t *log, ngx_msec_t *retry_after)
{
    ngx_str_t              *keys[2];
    ngx_int_t               excess[2];
    ngx_uint_t              per, refused, n, created[2];
    ngx_slab_pool_t        *shpool;
    ngx_chat_rate_node_t   *node[2];
    ngx_chat_rate_conf_t   *rc;
    u_char                  text[NGX_INET6_ADDRSTRLEN];

    keys[NGX_CHAT_RATE_USER] = user;
    keys[NGX_CHAT_RATE_ADDRESS] = addr;

    for (per = 0; per < 2; per++) {
        rc = &ngx_chat_worker.cmcf->rates[kind][per];

        if (rc->rate == 0 || keys[per] == NULL || keys[per]->len == 0) {
            keys[per] = NULL;
        }
    }

    if (keys[0] == NULL && keys[1] == NULL) {
        return NGX_OK;
    }

    shpool = ngx_chat_worker.shpool;
    refused = 0;
    n = 0;

    ngx_shmtx_lock(&shpool->mutex);

    for (per = 0; per < 2; per++) {
        node[per] = NULL;
        created[per] = 0;

        if (keys[per] == NULL) {
            continue;
        }

        /* the first key's bucket is not dropped to make room for this */
        node[per] = ngx_chat_rate_node(kind, per, keys[per], &excess[per],
                                       per ? node[0] : NULL, &created[per]);

        if (node[per] == NULL) {
            /* a full zone must not stop the chat: not counted */
            continue;
        }

        rc = &ngx_chat_worker.cmcf->rates[kind][per];

        if (excess[per] > (ngx_int_t) rc->burst) {
            node[per]->refused++;
            n = node[per]->refused;

            /* a bucket made for this request only goes again */
            if (per == 1 && created[0]) {
                ngx_chat_rate_free(&ngx_chat_worker.sh->rate, node[0]);
                node[0] = NULL;
            }

            *retry_after = (ngx_msec_t) (((int64_t) excess[per]
                                          - (int64_t) rc->burst) * 1000
                                         / (int64_t) rc->rate) + 1;
            refused = per + 1;
            break;
        }
    }

    if (!refused) {
        for (per = 0; per < 2; per++) {
            if (node[per]) {
                node[per]->excess = excess[per];
                node[per]->last = ngx_current_msec;
                node[per]->refused = 0;
            }
        }
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (!refused) {
        return NGX_OK;
    }

    /* the first refusal of a run, then every hundredth: out of the lock */

    per = refused - 1;

    if (n == 1 || n % 100 == 0) {
        ngx_str_t  k;

        if (per == NGX_CHAT_RATE_USER) {
            k = *keys[per];

        } else {
            k.data = text;
            k.len = ngx_inet_ntop(keys[per]->len == 4 ? AF_INET : AF_INET6,
                                  keys[per]->data, text, sizeof(text));
        }

        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "chat: rate limit \"%s\" per %s exceeded by \"%V\", "
                      "%ui refused in a row", ngx_chat_rate_kinds[kind],
                      per == NGX_CHAT_RATE_USER ? "user" : "address", &k, n);
    }

    ngx_chat_count(NGX_CHAT_MC_RATE_LIMITED + kind, 1);

    return NGX_BUSY;
}


/*
 * The bucket of a key, made when new, under the zone's lock; *excess is
 * what it would be after this request.  NULL: no room in the zone.
 */

static ngx_chat_rate_node_t *
ngx_chat_rate_node(ngx_uint_t kind, ngx_uint_t per, ngx_str_t *key,
    ngx_int_t *excess, ngx_chat_rate_node_t *keep, ngx_uint_t *created)
{
    u_char                *p;
    uint32_t               hash;
    ngx_str_t              k;
    ngx_int_t              e, rate;
    ngx_msec_int_t         ms;
    ngx_chat_rate_sh_t    *rs;
    ngx_chat_rate_node_t  *n;
    u_char                 buf[2 + NGX_CHAT_MAX_ID_LEN];

    rs = &ngx_chat_worker.sh->rate;
    rate = ngx_chat_worker.cmcf->rates[kind][per].rate;

    buf[0] = (u_char) kind;
    buf[1] = (u_char) per;
    p = ngx_cpymem(buf + 2, key->data,
                   ngx_min(key->len, NGX_CHAT_MAX_ID_LEN));

    k.data = buf;
    k.len = p - buf;
    hash = ngx_crc32_short(k.data, k.len);

    n = (ngx_chat_rate_node_t *) ngx_str_rbtree_lookup(&rs->rbtree, &k, hash);

    if (n == NULL) {
        ngx_chat_rate_expire(rs, 2, keep);

        n = ngx_slab_alloc_locked(ngx_chat_worker.shpool,
                                  sizeof(ngx_chat_rate_node_t) + k.len);
        if (n == NULL) {
            ngx_chat_rate_expire(rs, 0, keep);

            n = ngx_slab_alloc_locked(ngx_chat_worker.shpool,
                                      sizeof(ngx_chat_rate_node_t) + k.len);
            if (n == NULL) {
                return NULL;
            }
        }

        ngx_chat_str_node_init(&n->sn, (u_char *) &n[1], &k);
        n->last = ngx_current_msec;
        n->excess = 0;
        n->refused = 0;

        ngx_rbtree_insert(&rs->rbtree, &n->sn.node);
        ngx_queue_insert_head(&rs->lru, &n->lru);
        rs->count++;

        /* the first request of a key is free, as limit_req's */
        *excess = 0;
        *created = 1;

        return n;
    }

    ms = (ngx_msec_int_t) (ngx_current_msec - n->last);

    if (ms < 0) {
        ms = 0;
    }

    /* a long quiet drains it whole: no product to overflow */
    if ((int64_t) ms >= ((int64_t) n->excess + 1000) * 1000 / rate) {
        e = 1000;

    } else {
        e = (ngx_int_t) (n->excess - (int64_t) rate * ms / 1000 + 1000);
    }

    *excess = (e < 0) ? 0 : e;

    ngx_queue_remove(&n->lru);
    ngx_queue_insert_head(&rs->lru, &n->lru);

    return n;
}


/*
 * Drops least recent buckets: those quiet and drained (at most n of
 * them), all beyond chat_rate_limit's share of the zone, and with n == 0
 * one whatever its state (the zone is full).
 */

static void
ngx_chat_rate_expire(ngx_chat_rate_sh_t *rs, ngx_uint_t n,
    ngx_chat_rate_node_t *keep)
{
    ngx_uint_t             i, max, rate;
    ngx_queue_t           *q;
    ngx_msec_int_t         ms;
    ngx_chat_rate_node_t  *node;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_chat_worker.cmcf;
    max = cmcf->rate_entries;

    for (i = 0; !ngx_queue_empty(&rs->lru); i++) {
        q = ngx_queue_last(&rs->lru);
        node = ngx_queue_data(q, ngx_chat_rate_node_t, lru);

        if (node == keep) {
            return;
        }

        if (rs->count < max && !(n == 0 && i == 0)) {
            if (i >= n) {
                return;
            }

            /*
             * Quiet for a minute and drained (its key starts with its kind
             * and per): one used just now is not, even at excess 0, as
             * its next request would find it one request ahead.
             */
            rate = cmcf->rates[node->sn.str.data[0]][node->sn.str.data[1]]
                   .rate;
            ms = (ngx_msec_int_t) (ngx_current_msec - node->last);

            if (ms < 60000
                || (rate && (int64_t) node->excess
                            - (int64_t) rate * ms / 1000 > 0))
            {
                return;
            }
        }

        ngx_chat_rate_free(rs, node);
    }
}


static void
ngx_chat_rate_free(ngx_chat_rate_sh_t *rs, ngx_chat_rate_node_t *node)
{
    ngx_queue_remove(&node->lru);
    ngx_rbtree_delete(&rs->rbtree, &node->sn.node);
    ngx_slab_free_locked(ngx_chat_worker.shpool, node);
    rs->count--;
}


/* chat_rate_limit send|typing|connect|rest user|address rate=N[r/s|r/m]
 * [burst=N] */

char *
ngx_chat_rate_conf(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_main_conf_t *cmcf = conf;

    ngx_int_t              rate, scale, burst;
    ngx_str_t             *value, s;
    ngx_uint_t             i, kind, per;
    ngx_chat_rate_conf_t  *rc;

    value = cf->args->elts;

    for (kind = 0; kind < NGX_CHAT_RATE_KINDS; kind++) {
        if (ngx_strcmp(value[1].data, ngx_chat_rate_kinds[kind]) == 0) {
            break;
        }
    }

    if (kind == NGX_CHAT_RATE_KINDS) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "chat_rate_limit: "
                           "\"%V\" is not send, typing, connect or rest",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    if (ngx_strcmp(value[2].data, "user") == 0) {
        per = NGX_CHAT_RATE_USER;

    } else if (ngx_strcmp(value[2].data, "address") == 0) {
        per = NGX_CHAT_RATE_ADDRESS;

    } else {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "chat_rate_limit: "
                           "\"%V\" is not user or address", &value[2]);
        return NGX_CONF_ERROR;
    }

    rc = &cmcf->rates[kind][per];

    if (rc->rate) {
        return "is duplicate";
    }

    rate = 0;
    burst = 0;

    for (i = 3; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "rate=", 5) == 0) {
            s.data = value[i].data + 5;
            s.len = value[i].len - 5;
            scale = 1;

            if (s.len > 3
                && ngx_strncmp(s.data + s.len - 3, "r/s", 3) == 0)
            {
                s.len -= 3;

            } else if (s.len > 3
                       && ngx_strncmp(s.data + s.len - 3, "r/m", 3) == 0)
            {
                s.len -= 3;
                scale = 60;
            }

            rate = ngx_atoi(s.data, s.len);

            if (rate <= 0 || rate > 1000000) {
                goto invalid;
            }

            rate = rate * 1000 / scale;

            if (rate == 0) {
                goto invalid;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "burst=", 6) == 0) {
            burst = ngx_atoi(value[i].data + 6, value[i].len - 6);

            if (burst < 0 || burst > 1000000) {
                goto invalid;
            }

            continue;
        }

        goto invalid;
    }

    if (rate == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_rate_limit: \"rate=\" is required");
        return NGX_CONF_ERROR;
    }

    rc->rate = rate;
    rc->burst = burst * 1000;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "chat_rate_limit: invalid parameter \"%V\"",
                       &value[i]);
    return NGX_CONF_ERROR;
}


/* a request's check, for the user when known (id may be NULL) */

ngx_int_t
ngx_chat_rate_request(ngx_http_request_t *r, ngx_uint_t kind,
    ngx_chat_identity_t *id, ngx_msec_t *retry_after)
{
    size_t     len;
    ngx_str_t  addr;
    u_char     buf[NGX_CHAT_RATE_ADDR_LEN];

    ngx_chat_rate_addr(r->connection, buf, &len);

    addr.data = buf;
    addr.len = len;

    return ngx_chat_rate_check(kind, id ? &id->user : NULL, &addr,
                               r->connection->log, retry_after);
}
