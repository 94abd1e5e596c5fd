/*
 * chatbench: options, worker processes, phase control, merged report.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "cb.h"


static const char  *cb_mode_names[] = { "chat", "nchan", "socketio" };
static const char  *cb_sc_names[] = { "idle", "dm", "group", "connect-storm",
                                      "mixed" };

static pid_t  cb_pids[CB_MAX_WORKERS];
static int    cb_nworkers;


static void
cb_usage(void)
{
    fprintf(stderr,
"usage: chatbench [options]\n"
"  --mode chat|nchan|socketio     protocol (chat)\n"
"  --scenario idle|dm|group|connect-storm|mixed   (dm)\n"
"  --host 127.0.0.1 --port 8080   server (loopback only)\n"
"  --path P          WebSocket path (chat: /chat/ws, nchan: /pubsub/,\n"
"                    socketio: /socket.io/)\n"
"  --api P           chat REST prefix (/chat/api)\n"
"  --conns N         connections = users (200)\n"
"  --workers W       generator processes (1), <= 19000 conns each\n"
"  --src LIST        source addresses: 127.0.0.2-9,127.0.1.1 (127.0.0.1)\n"
"  --pin LIST        CPUs for the workers, round robin (none)\n"
"  --rate R          messages/s in total (100)\n"
"  --duration S      measured seconds (5)   --warmup S (1)  --drain S (3)\n"
"  --hold S          idle / connect-storm: seconds to hold (5 / 1)\n"
"  --connect-rate R  connects/s in total (2000)\n"
"  --connect-timeout S (10)   --max-pending N handshakes/worker (256)\n"
"  --size B          message body bytes (64)\n"
"  --group-size K    members per group (10)\n"
"  --group-frac F    mixed: share of users also in a group (0.2)\n"
"  --group-msgs F    mixed: share of their messages to the group (0.3)\n"
"  --typing P        mixed: typing request before a message (0.1)\n"
"  --read-every N    mixed: read receipt every N deliveries (5)\n"
"  --live            chat: also in dm and group, typing (--typing), reads\n"
"                    (--read-every) and acks of received events, as the\n"
"                    browser client sends them\n"
"  --ack-ms N        live: an ack at most every N ms of received events (100)\n"
"  --retries N       chat: retries of unavailable/rate_limited (3)\n"
"  --rest-parallel N chat: REST connections per worker (8)\n"
"  --rest-keepalive  chat: reuse REST connections (default: one request\n"
"                    per connection, Connection: close)\n"
"  --secret-file F   HS256 secret (exact bytes, one trailing \\n dropped)\n"
"  --auth header|hello   chat: token in Authorization or hello (header)\n"
"  --token-ttl S     (3600)   --user-prefix P (bench_<run>_)\n"
"  --self-echo 0|1   sender receives its own message (mode default)\n"
"  --server-pids LIST | --server-ppid PID (its children, e.g. nginx\n"
"                    workers) | --server-match STR (like pgrep -f STR)\n"
"                    server processes whose VmRSS is read\n"
"  --out DIR (bench/results)  --tag NAME   --verbose\n"
"  --check           exit 3 unless loss/dup/order/errors are all zero\n"
"  --cpu-limit PCT   a generator process above PCT%% of a core makes the\n"
"                    run INVALID (90)\n"
"  --quickack        diagnostic: TCP_QUICKACK after every read (no delayed\n"
"                    ACKs from the client; shows Nagle stalls on a server)\n");
}


static int
cb_parse_ip(const char *s, uint32_t *ip)
{
    struct in_addr  a;

    if (inet_pton(AF_INET, s, &a) != 1) {
        return -1;
    }

    *ip = a.s_addr;

    return 0;
}


/* "127.0.0.2-9,127.0.1.1" */
static int
cb_parse_src(cb_opt_t *o, const char *arg)
{
    char      buf[512], *tok, *save, *dash;
    uint32_t  ip, h;
    long      last, i;

    snprintf(buf, sizeof(buf), "%s", arg);
    o->nsrc = 0;

    for (tok = strtok_r(buf, ",", &save); tok != NULL;
         tok = strtok_r(NULL, ",", &save))
    {
        dash = strchr(tok, '-');
        last = -1;

        if (dash != NULL) {
            *dash = '\0';
            last = strtol(dash + 1, NULL, 10);
        }

        if (cb_parse_ip(tok, &ip) != 0) {
            return -1;
        }

        h = ntohl(ip);

        if ((h >> 24) != 127) {
            fprintf(stderr, "--src: only loopback addresses\n");
            return -1;
        }

        if (last < 0) {
            last = h & 255;
        }

        for (i = h & 255; i <= last && o->nsrc < CB_MAX_SRC; i++) {
            o->src[o->nsrc++] = htonl((h & ~255U) | (uint32_t) i);
        }
    }

    return o->nsrc > 0 ? 0 : -1;
}


static int
cb_parse_list(const char *arg, int *out, int max)
{
    char  buf[512], *tok, *save;
    int   n;

    snprintf(buf, sizeof(buf), "%s", arg);
    n = 0;

    for (tok = strtok_r(buf, ",", &save); tok != NULL && n < max;
         tok = strtok_r(NULL, ",", &save))
    {
        out[n++] = atoi(tok);
    }

    return n;
}


static int
cb_read_secret(cb_opt_t *o)
{
    FILE    *f;
    size_t   n;

    f = fopen(o->secret_file, "rb");
    if (f == NULL) {
        fprintf(stderr, "%s: %s\n", o->secret_file, strerror(errno));
        return -1;
    }

    n = fread(o->secret, 1, sizeof(o->secret), f);

    if (!feof(f)) {
        fprintf(stderr, "%s: secret too long\n", o->secret_file);
        fclose(f);
        return -1;
    }

    fclose(f);

    /* exactly the file's bytes, minus one trailing newline */
    if (n > 0 && o->secret[n - 1] == '\n') {
        n--;
    }

    o->secret_len = n;
    o->have_secret = 1;

    return 0;
}


/* bench/results, next to bench/build/chatbench */
static void
cb_default_out(cb_opt_t *o)
{
    char     exe[200];
    char    *p;
    ssize_t  n;

    n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = '\0';
        p = strrchr(exe, '/');
        if (p != NULL) {
            *p = '\0';
            p = strrchr(exe, '/');
            if (p != NULL && strcmp(p, "/build") == 0) {
                *p = '\0';
                snprintf(o->out_dir, sizeof(o->out_dir), "%s/results", exe);
                return;
            }
        }
    }

    snprintf(o->out_dir, sizeof(o->out_dir), "results");
}


static int
cb_options(cb_opt_t *o, int argc, char **argv)
{
    static struct option  opts[] = {
        { "mode", 1, 0, 'm' }, { "scenario", 1, 0, 's' },
        { "host", 1, 0, 'H' }, { "port", 1, 0, 'p' },
        { "path", 1, 0, 'P' }, { "api", 1, 0, 'A' },
        { "conns", 1, 0, 'c' }, { "workers", 1, 0, 'w' },
        { "src", 1, 0, 'S' }, { "pin", 1, 0, 'C' },
        { "rate", 1, 0, 'r' }, { "duration", 1, 0, 'd' },
        { "warmup", 1, 0, 'W' }, { "drain", 1, 0, 'D' },
        { "hold", 1, 0, 'h' }, { "connect-rate", 1, 0, 1 },
        { "connect-timeout", 1, 0, 2 }, { "max-pending", 1, 0, 3 },
        { "size", 1, 0, 'b' }, { "group-size", 1, 0, 'k' },
        { "group-frac", 1, 0, 4 }, { "group-msgs", 1, 0, 5 },
        { "typing", 1, 0, 6 }, { "read-every", 1, 0, 7 },
        { "retries", 1, 0, 8 }, { "rest-parallel", 1, 0, 9 },
        { "secret-file", 1, 0, 10 }, { "auth", 1, 0, 11 },
        { "token-ttl", 1, 0, 12 }, { "user-prefix", 1, 0, 13 },
        { "self-echo", 1, 0, 14 }, { "server-pids", 1, 0, 15 },
        { "server-ppid", 1, 0, 16 }, { "out", 1, 0, 'o' },
        { "tag", 1, 0, 't' }, { "check", 0, 0, 17 },
        { "verbose", 0, 0, 'v' }, { "help", 0, 0, 18 },
        { "quickack", 0, 0, 19 }, { "cpu-limit", 1, 0, 20 },
        { "server-match", 1, 0, 21 }, { "rest-keepalive", 0, 0, 22 },
        { "live", 0, 0, 23 }, { "ack-ms", 1, 0, 24 },
        { 0, 0, 0, 0 }
    };

    int  ch, i, pids[CB_MAX_PIDS], hold_set, echo, path_set;

    memset(o, 0, sizeof(cb_opt_t));
    o->mode = CB_MODE_CHAT;
    o->scenario = CB_SC_DM;
    snprintf(o->host, sizeof(o->host), "127.0.0.1");
    o->port = 8080;
    snprintf(o->api, sizeof(o->api), "/chat/api");
    o->conns = 200;
    o->workers = 1;
    o->src[0] = htonl(INADDR_LOOPBACK);
    o->nsrc = 1;
    o->rate = 100;
    o->duration = 5;
    o->warmup = 1;
    o->drain = 3;
    o->hold = 5;
    o->connect_rate = 2000;
    o->connect_timeout = 10;
    o->max_pending = 256;
    o->size = 64;
    o->group_size = 10;
    o->mixed_group_frac = 0.2;
    o->mixed_group_msgs = 0.3;
    o->typing_prob = 0.1;
    o->read_every = 5;
    o->ack_ms = 100;
    o->retries = 3;
    o->rest_parallel = 8;
    o->token_ttl = 3600;
    o->cpu_limit = 90;
    cb_default_out(o);
    hold_set = 0;
    path_set = 0;
    echo = -1;

    while ((ch = getopt_long(argc, argv, "v", opts, NULL)) != -1) {
        switch (ch) {
        case 'm':
            for (i = 0; i < 3 && strcmp(optarg, cb_mode_names[i]); i++) {
                /* void */
            }
            if (i == 3) {
                fprintf(stderr, "unknown mode %s\n", optarg);
                return -1;
            }
            o->mode = (cb_mode_e) i;
            break;
        case 's':
            for (i = 0; i < 5 && strcmp(optarg, cb_sc_names[i]); i++) {
                /* void */
            }
            if (i == 5) {
                fprintf(stderr, "unknown scenario %s\n", optarg);
                return -1;
            }
            o->scenario = (cb_scenario_e) i;
            break;
        case 'H':
            snprintf(o->host, sizeof(o->host), "%s", optarg);
            break;
        case 'p':
            o->port = atoi(optarg);
            break;
        case 'P':
            snprintf(o->path, sizeof(o->path), "%s", optarg);
            path_set = 1;
            break;
        case 'A':
            snprintf(o->api, sizeof(o->api), "%s", optarg);
            break;
        case 'c':
            o->conns = (uint32_t) strtoul(optarg, NULL, 10);
            break;
        case 'w':
            o->workers = atoi(optarg);
            break;
        case 'S':
            if (cb_parse_src(o, optarg) != 0) {
                fprintf(stderr, "bad --src %s\n", optarg);
                return -1;
            }
            break;
        case 'C':
            o->npin = cb_parse_list(optarg, o->pin, CB_MAX_WORKERS);
            break;
        case 'r':
            o->rate = atof(optarg);
            break;
        case 'd':
            o->duration = atof(optarg);
            break;
        case 'W':
            o->warmup = atof(optarg);
            break;
        case 'D':
            o->drain = atof(optarg);
            break;
        case 'h':
            o->hold = atof(optarg);
            hold_set = 1;
            break;
        case 1:
            o->connect_rate = atof(optarg);
            break;
        case 2:
            o->connect_timeout = atof(optarg);
            break;
        case 3:
            o->max_pending = (uint32_t) strtoul(optarg, NULL, 10);
            break;
        case 'b':
            o->size = (uint32_t) strtoul(optarg, NULL, 10);
            break;
        case 'k':
            o->group_size = (uint32_t) strtoul(optarg, NULL, 10);
            break;
        case 4:
            o->mixed_group_frac = atof(optarg);
            break;
        case 5:
            o->mixed_group_msgs = atof(optarg);
            break;
        case 6:
            o->typing_prob = atof(optarg);
            break;
        case 7:
            o->read_every = (uint32_t) strtoul(optarg, NULL, 10);
            break;
        case 23:
            o->live = 1;
            break;
        case 24:
            o->ack_ms = (uint32_t) strtoul(optarg, NULL, 10);
            break;
        case 8:
            o->retries = (uint32_t) strtoul(optarg, NULL, 10);
            break;
        case 9:
            o->rest_parallel = (uint32_t) strtoul(optarg, NULL, 10);
            break;
        case 10:
            snprintf(o->secret_file, sizeof(o->secret_file), "%s", optarg);
            break;
        case 11:
            o->auth = strcmp(optarg, "hello") == 0 ? CB_AUTH_HELLO
                                                   : CB_AUTH_HEADER;
            break;
        case 12:
            o->token_ttl = (uint32_t) strtoul(optarg, NULL, 10);
            break;
        case 13:
            snprintf(o->user_prefix, sizeof(o->user_prefix), "%s", optarg);
            break;
        case 14:
            echo = atoi(optarg);
            break;
        case 15:
            o->nserver_pids = cb_parse_list(optarg, pids, CB_MAX_PIDS);
            for (i = 0; i < o->nserver_pids; i++) {
                o->server_pids[i] = (pid_t) pids[i];
            }
            break;
        case 16:
            o->server_ppid = (pid_t) atoi(optarg);
            break;
        case 'o':
            snprintf(o->out_dir, sizeof(o->out_dir), "%s", optarg);
            break;
        case 't':
            snprintf(o->tag, sizeof(o->tag), "%s", optarg);
            break;
        case 17:
            o->check = 1;
            break;
        case 'v':
            o->verbose = 1;
            break;
        case 19:
            o->quickack = 1;
            break;
        case 20:
            o->cpu_limit = atof(optarg);
            break;
        case 22:
            o->rest_keepalive = 1;
            break;
        case 21:
            snprintf(o->server_match, sizeof(o->server_match), "%s",
                     optarg);
            break;
        default:
            cb_usage();
            return -1;
        }
    }

    if (optind < argc) {
        cb_usage();
        return -1;
    }

    if (!path_set) {
        snprintf(o->path, sizeof(o->path), "%s",
                 o->mode == CB_MODE_CHAT ? "/chat/ws"
                 : o->mode == CB_MODE_NCHAN ? "/pubsub/" : "/socket.io/");
    }

    if (!hold_set && o->scenario == CB_SC_STORM) {
        o->hold = 1;
    }

    o->self_echo = echo >= 0 ? echo : 1;

    if ((o->scenario != CB_SC_MIXED && !o->live)
        || o->mode != CB_MODE_CHAT)
    {
        o->typing_prob = 0;
        o->read_every = 0;
    }

    if (o->mode != CB_MODE_CHAT) {
        o->live = 0;
    }

    if (o->mode != CB_MODE_CHAT && o->scenario == CB_SC_MIXED) {
        fprintf(stderr, "note: mixed runs typing/read only in chat mode\n");
    }

    if (o->mode == CB_MODE_NCHAN && o->scenario == CB_SC_MIXED) {
        fprintf(stderr, "mixed needs two channels per connection; "
                "not available in nchan mode\n");
        return -1;
    }

    if (o->workers < 1 || o->workers > CB_MAX_WORKERS || o->conns < 1
        || o->rate < 0 || o->duration < 0 || o->connect_rate <= 0
        || o->size > 1 << 20 || o->group_size < 2 || o->max_pending < 1
        || o->rest_parallel < 1 || o->rest_parallel > 256)
    {
        fprintf(stderr, "bad option value\n");
        return -1;
    }

    /* bounded runs */
    if (o->duration + o->warmup + o->drain + o->hold > 3600) {
        fprintf(stderr, "a run is limited to one hour\n");
        return -1;
    }

    if (cb_parse_ip(o->host, &o->src[CB_MAX_SRC - 1]) != 0
        || (ntohl(o->src[CB_MAX_SRC - 1]) >> 24) != 127)
    {
        fprintf(stderr, "--host must be a loopback IPv4 address\n");
        return -1;
    }
    o->src[CB_MAX_SRC - 1] = 0;

    if (o->secret_file[0] && cb_read_secret(o) != 0) {
        return -1;
    }

    if (o->mode == CB_MODE_CHAT && !o->have_secret) {
        fprintf(stderr, "chat mode needs --secret-file\n");
        return -1;
    }

    snprintf(o->run_id, sizeof(o->run_id), "r%llx%x",
             (unsigned long long) (cb_wall_ms() / 1000) & 0xffffff,
             (unsigned) getpid() & 0xfff);

    if (o->user_prefix[0] == '\0') {
        snprintf(o->user_prefix, sizeof(o->user_prefix), "bench_%s_",
                 o->run_id);
    }

    if (o->tag[0] == '\0') {
        snprintf(o->tag, sizeof(o->tag), "%s-%s-%u-%s",
                 cb_mode_names[o->mode], cb_sc_names[o->scenario], o->size,
                 o->run_id);
    }

    return 0;
}


/* ---- server RSS ---- */

static int
cb_server_pids(const cb_opt_t *o, pid_t *out)
{
    int  n, i;

    n = 0;

    for (i = 0; i < o->nserver_pids; i++) {
        out[n++] = o->server_pids[i];
    }

    if (o->server_match[0] != '\0') {
        n += cb_match_procs(o->server_match, out + n, CB_MAX_PIDS - n);
    }

    if (o->server_ppid > 0) {
        i = cb_children(o->server_ppid, out + n, CB_MAX_PIDS - n);
        if (i == 0) {
            out[n++] = o->server_ppid;
        }
        n += i;
    }

    return n;
}


static long
cb_server_rss(const pid_t *pids, int n)
{
    long  sum, kb;
    int   i;

    if (n == 0) {
        return -1;
    }

    sum = 0;

    for (i = 0; i < n; i++) {
        kb = cb_rss_kb(pids[i]);
        if (kb > 0) {
            sum += kb;
        }
    }

    return sum;
}


/* ---- control ---- */

static void
cb_broadcast(int *to, int n, char cmd, uint64_t t)
{
    cb_ctl_t  m;
    int       i;

    memset(&m, 0, sizeof(m));
    m.cmd = cmd;
    m.t = t;

    for (i = 0; i < n; i++) {
        if (write(to[i], &m, sizeof(m)) != (ssize_t) sizeof(m)) {
            /* the worker is gone; noticed by the wait */
        }
    }
}


/* wait until every worker sent cmd; returns 0, or -1 on timeout/death */
static int
cb_wait_all(int from, char cmd, int n, double timeout, cb_ctl_t *msgs)
{
    struct pollfd  pfd;
    cb_ctl_t       m;
    uint64_t       end, now;
    int            got, rc, status;
    char           seen[CB_MAX_WORKERS];

    memset(seen, 0, sizeof(seen));
    got = 0;
    end = cb_now() + (uint64_t) (timeout * 1e9);

    while (got < n) {
        now = cb_now();
        if (now >= end) {
            fprintf(stderr, "timeout waiting for workers ('%c')\n", cmd);
            return -1;
        }

        pfd.fd = from;
        pfd.events = POLLIN;
        rc = poll(&pfd, 1, (int) ((end - now) / CB_MS) + 1);

        if (rc < 0 && errno != EINTR) {
            return -1;
        }

        if (rc <= 0) {
            continue;
        }

        if (read(from, &m, sizeof(m)) != (ssize_t) sizeof(m)) {
            fprintf(stderr, "worker control pipe closed\n");
            return -1;
        }

        if (m.cmd == cmd && m.worker >= 0 && m.worker < n
            && !seen[m.worker])
        {
            seen[m.worker] = 1;
            msgs[m.worker] = m;
            got++;
        }

        /* a worker that died early */
        if (waitpid(-1, &status, WNOHANG) > 0
            && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        {
            fprintf(stderr, "a worker exited abnormally\n");
            return -1;
        }
    }

    return 0;
}


static void
cb_kill_workers(void)
{
    int  i;

    for (i = 0; i < cb_nworkers; i++) {
        if (cb_pids[i] > 0) {
            kill(cb_pids[i], SIGTERM);
        }
    }

    for (i = 0; i < cb_nworkers; i++) {
        if (cb_pids[i] > 0) {
            waitpid(cb_pids[i], NULL, 0);
        }
    }
}


/* ---- report ---- */

typedef struct {
    cb_res_t   *t;                  /* merged */
    double      cpu_run_max;        /* % of one core */
    double      cpu_connect_max;
    double      cpu_cpu_max;        /* per pinned CPU sum */
    double      conn_rate;
    double      conn_wall;
    long        rss_before;
    long        rss_after;
    long        rss_end;
    double      rss_per_conn;
    int64_t     lost;
    uint64_t    conn_failed;
    int         valid;
    char        reason[256];
    char        warn[256];
} cb_sum_t;


static double
cb_ms(uint64_t ns)
{
    return (double) ns / 1e6;
}


static void
cb_merge(const cb_opt_t *o, cb_res_t *res, int nw, uint64_t t_connect,
    cb_sum_t *s)
{
    cb_res_t  *t = s->t;
    uint64_t  *dst, *src, last;
    double     cpu, per_cpu[256];
    size_t     i, nfields;
    int        w, storm;

    memset(per_cpu, 0, sizeof(per_cpu));
    storm = o->scenario == CB_SC_STORM;
    nfields = offsetof(cb_res_t, t_conn_first) / sizeof(uint64_t);
    last = 0;

    for (w = 0; w < nw; w++) {
        dst = (uint64_t *) t;
        src = (uint64_t *) &res[w];

        for (i = 0; i < nfields; i++) {
            dst[i] += src[i];
        }

        cb_hist_merge(&t->h_e2e, &res[w].h_e2e);
        cb_hist_merge(&t->h_ack, &res[w].h_ack);
        cb_hist_merge(&t->h_conn, &res[w].h_conn);
        cb_hist_merge(&t->h_lag, &res[w].h_lag);

        if (res[w].t_conn_last > last) {
            last = res[w].t_conn_last;
        }

        cpu = res[w].wall_run > 0
              ? 100.0 * res[w].cpu_run / res[w].wall_run : 0;
        if (cpu > s->cpu_run_max) {
            s->cpu_run_max = cpu;
        }

        if (o->npin > 0) {
            per_cpu[o->pin[w % o->npin] & 255] += storm
                ? (res[w].wall_connect > 0
                   ? 100.0 * res[w].cpu_connect / res[w].wall_connect : 0)
                : cpu;
        }

        cpu = res[w].wall_connect > 0
              ? 100.0 * res[w].cpu_connect / res[w].wall_connect : 0;
        if (cpu > s->cpu_connect_max) {
            s->cpu_connect_max = cpu;
        }

        if (res[w].maxrss_kb > t->maxrss_kb) {
            t->maxrss_kb = res[w].maxrss_kb;
        }
    }

    for (i = 0; i < 256; i++) {
        if (per_cpu[i] > s->cpu_cpu_max) {
            s->cpu_cpu_max = per_cpu[i];
        }
    }

    s->conn_wall = last > t_connect ? (double) (last - t_connect) / 1e9 : 0;
    s->conn_rate = s->conn_wall > 0 ? (double) t->conn_ok / s->conn_wall : 0;
    s->conn_failed = t->conn_fail + t->hs_fail + t->auth_fail
                     + t->conn_timeout;
    s->lost = (int64_t) t->expected - (int64_t) t->unique;

    if (s->rss_before >= 0 && s->rss_after >= 0 && t->conn_ok > 0) {
        s->rss_per_conn = (double) (s->rss_after - s->rss_before) * 1024.0
                          / (double) t->conn_ok;
    }

    s->valid = 1;

    if ((storm ? s->cpu_connect_max : s->cpu_run_max) > o->cpu_limit) {
        s->valid = 0;
        snprintf(s->reason, sizeof(s->reason),
                 "generator process used %.0f%% of a core (> %.0f%%)",
                 storm ? s->cpu_connect_max : s->cpu_run_max,
                 o->cpu_limit);

    } else if (s->cpu_cpu_max > o->cpu_limit) {
        s->valid = 0;
        snprintf(s->reason, sizeof(s->reason),
                 "generator processes used %.0f%% of their pinned CPU "
                 "(> %.0f%%)", s->cpu_cpu_max, o->cpu_limit);
    }

    if (t->sent > 0 && t->late_sends * 100 > t->sent) {
        snprintf(s->warn, sizeof(s->warn),
                 "%.1f%% of sends left > 1 ms after their intended time",
                 100.0 * (double) t->late_sends / (double) t->sent);
    }
}


static void
cb_print(const cb_opt_t *o, const cb_sum_t *s)
{
    const cb_res_t  *t = s->t;
    const cb_hist_t *h;

    printf("\n== chatbench %s: mode=%s scenario=%s conns=%u workers=%d",
           o->tag, cb_mode_names[o->mode], cb_sc_names[o->scenario],
           o->conns, o->workers);

    if (o->scenario == CB_SC_IDLE || o->scenario == CB_SC_STORM) {
        printf(" connect-rate=%.0f/s hold=%.1fs\n", o->connect_rate,
               o->hold);
    } else {
        printf(" size=%u rate=%.0f/s duration=%.1fs", o->size, o->rate,
               o->duration);
        if (o->scenario != CB_SC_DM) {
            printf(" group=%u", o->group_size);
        }
        printf("\n");
    }

    printf("%-22s %s%s%s\n", "result", s->valid ? "VALID" : "INVALID: ",
           s->valid ? "" : s->reason, "");

    if (s->warn[0]) {
        printf("%-22s %s\n", "warning", s->warn);
    }

    printf("%-22s ok %llu  failed %llu (tcp %llu, upgrade %llu, auth %llu,"
           " timeout %llu)  dropped %llu\n", "connections",
           (unsigned long long) t->conn_ok,
           (unsigned long long) s->conn_failed,
           (unsigned long long) t->conn_fail,
           (unsigned long long) t->hs_fail,
           (unsigned long long) t->auth_fail,
           (unsigned long long) t->conn_timeout,
           (unsigned long long) t->disconnects);

    h = &t->h_conn;
    printf("%-22s %.0f/s over %.2fs; p50 %.2f p99 %.2f max %.2f ms\n",
           "connect", s->conn_rate, s->conn_wall, cb_ms(cb_hist_pct(h, 50)),
           cb_ms(cb_hist_pct(h, 99)), cb_ms(h->max == 0 ? 0 : h->max));

    if (o->mode == CB_MODE_CHAT && t->convs + t->setup_fail > 0) {
        printf("%-22s %llu created, %llu failed\n", "conversations",
               (unsigned long long) t->convs,
               (unsigned long long) t->setup_fail);
    }

    if (o->scenario != CB_SC_IDLE && o->scenario != CB_SC_STORM) {
        printf("%-22s scheduled %llu sent %llu (%.0f/s measured) acked "
               "%llu skipped %llu\n", "messages",
               (unsigned long long) t->sched, (unsigned long long) t->sent,
               o->duration > 0 ? t->sent_measured / o->duration : 0,
               (unsigned long long) t->acked,
               (unsigned long long) t->skipped);

        printf("%-22s expected %llu received %llu (%.0f/s measured to "
               "others) self %llu\n", "deliveries",
               (unsigned long long) t->expected,
               (unsigned long long) t->received,
               o->duration > 0 ? t->recv_measured / o->duration : 0,
               (unsigned long long) t->self_recv);

        printf("%-22s lost %lld dup %llu out-of-order %llu stray %llu "
               "seq-gap %llu seq-back %llu (resent late %llu)\n",
               "integrity",
               (long long) s->lost, (unsigned long long) t->dup,
               (unsigned long long) t->ooo, (unsigned long long) t->stray,
               (unsigned long long) t->seq_gap,
               (unsigned long long) t->seq_back,
               (unsigned long long) t->ooo_retry);

        printf("%-22s send-fail %llu unacked %llu retries %llu "
               "unavailable %llu rate-limited %llu other %llu\n", "errors",
               (unsigned long long) t->send_fail,
               (unsigned long long) t->unacked,
               (unsigned long long) t->retries,
               (unsigned long long) t->err_unavailable,
               (unsigned long long) t->err_rate_limited,
               (unsigned long long) t->err_other);

        h = &t->h_e2e;
        printf("%-22s n %llu  p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  "
               "max %.3f  mean %.3f ms\n", "latency e2e",
               (unsigned long long) h->n, cb_ms(cb_hist_pct(h, 50)),
               cb_ms(cb_hist_pct(h, 90)), cb_ms(cb_hist_pct(h, 99)),
               cb_ms(cb_hist_pct(h, 99.9)), cb_ms(h->n ? h->max : 0),
               h->n ? h->sum / (double) h->n / 1e6 : 0);

        h = &t->h_ack;
        if (h->n > 0) {
            printf("%-22s n %llu  p50 %.3f  p99 %.3f  max %.3f ms\n",
                   "latency ack", (unsigned long long) h->n,
                   cb_ms(cb_hist_pct(h, 50)), cb_ms(cb_hist_pct(h, 99)),
                   cb_ms(h->max));
        }

        h = &t->h_lag;
        printf("%-22s p99 %.3f max %.3f ms; late (>1 ms) %llu\n",
               "send lag (generator)", cb_ms(cb_hist_pct(h, 99)),
               cb_ms(h->n ? h->max : 0),
               (unsigned long long) t->late_sends);
    }

    if (t->typing_sent + t->read_sent + t->acks_sent > 0) {
        printf("%-22s typing %llu read %llu ack %llu other events %llu\n",
               "requests", (unsigned long long) t->typing_sent,
               (unsigned long long) t->read_sent,
               (unsigned long long) t->acks_sent,
               (unsigned long long) t->other_events);
    }

    printf("%-22s run max %.1f%% of a core, connect max %.1f%%, "
           "maxrss %ld MiB\n", "generator cpu", s->cpu_run_max,
           s->cpu_connect_max, t->maxrss_kb / 1024);

    if (s->rss_before >= 0) {
        printf("%-22s before %ld KiB, connected %ld KiB, end %ld KiB; "
               "%.0f B per connection\n", "server rss", s->rss_before,
               s->rss_after, s->rss_end, s->rss_per_conn);
    }

    printf("%-22s out %.1f MiB in %.1f MiB; pings %llu\n", "bytes",
           t->bytes_out / 1048576.0, t->bytes_in / 1048576.0,
           (unsigned long long) t->pings);
}


static void
cb_write_hgrm(const char *path, const cb_hist_t *h)
{
    FILE     *f;
    uint64_t  acc;
    uint32_t  i;

    f = fopen(path, "w");
    if (f == NULL) {
        return;
    }

    fprintf(f, "#%12s %14s %10s %14s\n", "Value(ms)", "Percentile",
            "TotalCount", "1/(1-P)");

    acc = 0;

    for (i = 0; i < CB_HIST_BUCKETS && h->n > 0; i++) {
        if (h->b[i] == 0) {
            continue;
        }

        acc += h->b[i];

        fprintf(f, "%13.4f %14.9f %10llu %14.2f\n",
                cb_ms(cb_hist_value(i) > h->max ? h->max : cb_hist_value(i)),
                (double) acc / (double) h->n, (unsigned long long) acc,
                acc < h->n ? 1.0 / (1.0 - (double) acc / (double) h->n) : 0);
    }

    fclose(f);
}


#define CB_CSV_HEADER                                                         \
    "tag,mode,scenario,size,conns,workers,rate,duration,group_size,"         \
    "valid,conn_ok,conn_failed,disconnects,connect_rate,conn_p50_ms,"        \
    "conn_p99_ms,conn_max_ms,sent,sent_per_s,recv_per_s,e2e_n,e2e_p50_ms,"   \
    "e2e_p90_ms,e2e_p99_ms,e2e_p999_ms,e2e_max_ms,e2e_mean_ms,ack_p50_ms,"   \
    "ack_p99_ms,lost,dup,ooo,stray,seq_gap,seq_back,send_fail,unacked,"      \
    "retries,err_other,lag_p99_ms,late_sends,gen_cpu_run_pct,"               \
    "gen_cpu_connect_pct,server_rss_before_kb,server_rss_after_kb,"          \
    "rss_per_conn_b,invalid_reason\n"


static int
cb_write_results(const cb_opt_t *o, const cb_sum_t *s)
{
    const cb_res_t  *t = s->t;
    const cb_hist_t *e = &t->h_e2e, *a = &t->h_ack, *c = &t->h_conn;
    struct stat      st;
    FILE            *f;
    char             path[600], ack50[32], ack99[32];
    int              fresh;
    double           sps, rps;

    mkdir(o->out_dir, 0755);

    /* no acks in the protocol (nchan): empty, not zero */
    ack50[0] = ack99[0] = '\0';
    if (a->n > 0) {
        snprintf(ack50, sizeof(ack50), "%.4f", cb_ms(cb_hist_pct(a, 50)));
        snprintf(ack99, sizeof(ack99), "%.4f", cb_ms(cb_hist_pct(a, 99)));
    }

    sps = o->duration > 0 ? t->sent_measured / o->duration : 0;
    rps = o->duration > 0 ? t->recv_measured / o->duration : 0;

    snprintf(path, sizeof(path), "%s/runs.csv", o->out_dir);
    fresh = stat(path, &st) != 0 || st.st_size == 0;

    f = fopen(path, "a");
    if (f == NULL) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }

    if (fresh) {
        fputs(CB_CSV_HEADER, f);
    }

    fprintf(f, "%s,%s,%s,%u,%u,%d,%.1f,%.1f,%u,%d,%llu,%llu,%llu,%.1f,"
            "%.3f,%.3f,%.3f,%llu,%.1f,%.1f,%llu,%.4f,%.4f,%.4f,%.4f,%.4f,"
            "%.4f,%s,%s,%lld,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,"
            "%llu,%.4f,%llu,%.1f,%.1f,%ld,%ld,%.0f,\"%s\"\n",
            o->tag, cb_mode_names[o->mode], cb_sc_names[o->scenario],
            o->size, o->conns, o->workers, o->rate, o->duration,
            o->group_size, s->valid, (unsigned long long) t->conn_ok,
            (unsigned long long) s->conn_failed,
            (unsigned long long) t->disconnects, s->conn_rate,
            cb_ms(cb_hist_pct(c, 50)), cb_ms(cb_hist_pct(c, 99)),
            cb_ms(c->n ? c->max : 0), (unsigned long long) t->sent, sps,
            rps, (unsigned long long) e->n, cb_ms(cb_hist_pct(e, 50)),
            cb_ms(cb_hist_pct(e, 90)), cb_ms(cb_hist_pct(e, 99)),
            cb_ms(cb_hist_pct(e, 99.9)), cb_ms(e->n ? e->max : 0),
            e->n ? e->sum / (double) e->n / 1e6 : 0,
            ack50, ack99,
            (long long) s->lost, (unsigned long long) t->dup,
            (unsigned long long) t->ooo, (unsigned long long) t->stray,
            (unsigned long long) t->seq_gap,
            (unsigned long long) t->seq_back,
            (unsigned long long) t->send_fail,
            (unsigned long long) t->unacked,
            (unsigned long long) t->retries,
            (unsigned long long) t->err_other,
            cb_ms(cb_hist_pct(&t->h_lag, 99)),
            (unsigned long long) t->late_sends, s->cpu_run_max,
            s->cpu_connect_max, s->rss_before, s->rss_after,
            s->rss_per_conn, s->valid ? "" : s->reason);

    fclose(f);

    snprintf(path, sizeof(path), "%s/%s.json", o->out_dir, o->tag);

    f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }

    fprintf(f,
            "{\n"
            "  \"tag\": \"%s\", \"run_id\": \"%s\", \"version\": \"%s\",\n"
            "  \"mode\": \"%s\", \"scenario\": \"%s\", \"size\": %u,\n"
            "  \"conns\": %u, \"workers\": %d, \"rate\": %.3f,\n"
            "  \"duration\": %.3f, \"warmup\": %.3f, \"group_size\": %u,\n"
            "  \"valid\": %s, \"invalid_reason\": \"%s\",\n"
            "  \"warning\": \"%s\",\n"
            "  \"connections\": {\"ok\": %llu, \"failed\": %llu, "
            "\"tcp_failed\": %llu, \"upgrade_failed\": %llu, "
            "\"auth_failed\": %llu, \"timeout\": %llu, "
            "\"dropped\": %llu},\n"
            "  \"connect\": {\"rate_per_s\": %.1f, \"seconds\": %.3f, "
            "\"p50_ms\": %.4f, \"p90_ms\": %.4f, \"p99_ms\": %.4f, "
            "\"p999_ms\": %.4f, \"max_ms\": %.4f},\n"
            "  \"messages\": {\"scheduled\": %llu, \"sent\": %llu, "
            "\"sent_measured\": %llu, \"sent_per_s\": %.1f, "
            "\"acked\": %llu, \"skipped\": %llu},\n"
            "  \"deliveries\": {\"expected\": %llu, \"received\": %llu, "
            "\"unique\": %llu, \"measured\": %llu, \"per_s\": %.1f, "
            "\"self\": %llu},\n"
            "  \"integrity\": {\"lost\": %lld, \"dup\": %llu, "
            "\"out_of_order\": %llu, \"stray\": %llu, \"seq_gap\": %llu, "
            "\"seq_back\": %llu, \"resent_late\": %llu},\n"
            "  \"errors\": {\"send_fail\": %llu, \"unacked\": %llu, "
            "\"retries\": %llu, \"unavailable\": %llu, "
            "\"rate_limited\": %llu, \"other\": %llu, "
            "\"setup_fail\": %llu},\n"
            "  \"latency_e2e_ms\": {\"n\": %llu, \"p50\": %.4f, "
            "\"p90\": %.4f, \"p99\": %.4f, \"p999\": %.4f, \"max\": %.4f, "
            "\"mean\": %.4f},\n"
            "  \"latency_ack_ms\": {\"n\": %llu, \"p50\": %.4f, "
            "\"p99\": %.4f, \"max\": %.4f},\n"
            "  \"send_lag_ms\": {\"p99\": %.4f, \"max\": %.4f, "
            "\"late\": %llu},\n"
            "  \"requests\": {\"typing\": %llu, \"read\": %llu, "
            "\"ack\": %llu, \"other_events\": %llu, \"pings\": %llu},\n"
            "  \"generator\": {\"cpu_run_max_pct\": %.2f, "
            "\"cpu_connect_max_pct\": %.2f, \"cpu_per_pinned_max_pct\": "
            "%.2f, \"maxrss_kb\": %ld, \"bytes_out\": %llu, "
            "\"bytes_in\": %llu},\n"
            "  \"server_rss_kb\": {\"before\": %ld, \"connected\": %ld, "
            "\"end\": %ld, \"per_conn_bytes\": %.1f}\n"
            "}\n",
            o->tag, o->run_id, CB_VERSION, cb_mode_names[o->mode],
            cb_sc_names[o->scenario], o->size, o->conns, o->workers,
            o->rate, o->duration, o->warmup, o->group_size,
            s->valid ? "true" : "false", s->reason, s->warn,
            (unsigned long long) t->conn_ok,
            (unsigned long long) s->conn_failed,
            (unsigned long long) t->conn_fail,
            (unsigned long long) t->hs_fail,
            (unsigned long long) t->auth_fail,
            (unsigned long long) t->conn_timeout,
            (unsigned long long) t->disconnects,
            s->conn_rate, s->conn_wall, cb_ms(cb_hist_pct(c, 50)),
            cb_ms(cb_hist_pct(c, 90)), cb_ms(cb_hist_pct(c, 99)),
            cb_ms(cb_hist_pct(c, 99.9)), cb_ms(c->n ? c->max : 0),
            (unsigned long long) t->sched, (unsigned long long) t->sent,
            (unsigned long long) t->sent_measured, sps,
            (unsigned long long) t->acked, (unsigned long long) t->skipped,
            (unsigned long long) t->expected,
            (unsigned long long) t->received,
            (unsigned long long) t->unique,
            (unsigned long long) t->recv_measured, rps,
            (unsigned long long) t->self_recv,
            (long long) s->lost, (unsigned long long) t->dup,
            (unsigned long long) t->ooo, (unsigned long long) t->stray,
            (unsigned long long) t->seq_gap,
            (unsigned long long) t->seq_back,
            (unsigned long long) t->ooo_retry,
            (unsigned long long) t->send_fail,
            (unsigned long long) t->unacked,
            (unsigned long long) t->retries,
            (unsigned long long) t->err_unavailable,
            (unsigned long long) t->err_rate_limited,
            (unsigned long long) t->err_other,
            (unsigned long long) t->setup_fail,
            (unsigned long long) e->n, cb_ms(cb_hist_pct(e, 50)),
            cb_ms(cb_hist_pct(e, 90)), cb_ms(cb_hist_pct(e, 99)),
            cb_ms(cb_hist_pct(e, 99.9)), cb_ms(e->n ? e->max : 0),
            e->n ? e->sum / (double) e->n / 1e6 : 0,
            (unsigned long long) a->n, cb_ms(cb_hist_pct(a, 50)),
            cb_ms(cb_hist_pct(a, 99)), cb_ms(a->n ? a->max : 0),
            cb_ms(cb_hist_pct(&t->h_lag, 99)),
            cb_ms(t->h_lag.n ? t->h_lag.max : 0),
            (unsigned long long) t->late_sends,
            (unsigned long long) t->typing_sent,
            (unsigned long long) t->read_sent,
            (unsigned long long) t->acks_sent,
            (unsigned long long) t->other_events,
            (unsigned long long) t->pings,
            s->cpu_run_max, s->cpu_connect_max, s->cpu_cpu_max,
            t->maxrss_kb, (unsigned long long) t->bytes_out,
            (unsigned long long) t->bytes_in,
            s->rss_before, s->rss_after, s->rss_end, s->rss_per_conn);

    fclose(f);

    snprintf(path, sizeof(path), "%s/%s.e2e.hgrm", o->out_dir, o->tag);
    cb_write_hgrm(path, e);

    if (c->n > 0) {
        snprintf(path, sizeof(path), "%s/%s.connect.hgrm", o->out_dir,
                 o->tag);
        cb_write_hgrm(path, c);
    }

    return 0;
}


int
main(int argc, char **argv)
{
    static cb_opt_t   o;
    cb_res_t         *res;
    cb_sum_t          s;
    cb_ctl_t          msgs[CB_MAX_WORKERS];
    pid_t             spids[CB_MAX_PIDS];
    uint64_t          t_connect, unit, fails;
    uint32_t          lo, hi;
    double            setup_to, connect_to, run_to;
    int               to[CB_MAX_WORKERS], from[2], p[2], nsp, w, rc;
    int               status, bad;

    if (cb_options(&o, argc, argv) != 0) {
        return 1;
    }

    unit = cb_unit(&o);
    if (o.conns / unit < (uint64_t) o.workers) {
        fprintf(stderr, "need at least %llu connections per worker\n",
                (unsigned long long) unit);
        return 1;
    }
    o.conns = (uint32_t) (o.conns / unit * unit);

    for (w = 0; w < o.workers; w++) {
        cb_worker_range(&o, w, &lo, &hi);
        if (hi - lo > CB_MAX_CONNS_PER_W) {
            fprintf(stderr, "worker %d would hold %u connections (max %d): "
                    "use more --workers\n", w, hi - lo, CB_MAX_CONNS_PER_W);
            return 1;
        }
    }

    if (o.nsrc == 1 && o.conns > 25000) {
        fprintf(stderr, "warning: %u connections from one source address; "
                "use --src 127.0.0.2-9\n", o.conns);
    }

    nsp = cb_server_pids(&o, spids);

    memset(&s, 0, sizeof(s));
    s.rss_before = cb_server_rss(spids, nsp);
    s.rss_after = -1;
    s.rss_end = -1;

    res = mmap(NULL, sizeof(cb_res_t) * (size_t) o.workers,
               PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    s.t = malloc(sizeof(cb_res_t));
    if (res == MAP_FAILED || s.t == NULL) {
        perror("mmap");
        return 1;
    }

    memset(s.t, 0, sizeof(cb_res_t));
    cb_hist_init(&s.t->h_e2e);
    cb_hist_init(&s.t->h_ack);
    cb_hist_init(&s.t->h_conn);
    cb_hist_init(&s.t->h_lag);

    if (pipe(from) != 0) {
        perror("pipe");
        return 1;
    }

    fflush(stdout);
    fflush(stderr);

    for (w = 0; w < o.workers; w++) {
        if (pipe(p) != 0) {
            perror("pipe");
            cb_kill_workers();
            return 1;
        }

        cb_pids[w] = fork();

        if (cb_pids[w] < 0) {
            perror("fork");
            cb_kill_workers();
            return 1;
        }

        if (cb_pids[w] == 0) {
            close(p[1]);
            close(from[0]);
            memset(&res[w], 0, sizeof(cb_res_t));
            rc = cb_worker(&o, w, p[0], from[1], &res[w]);
            if (rc != 0 && res[w].error[0]) {
                fprintf(stderr, "worker %d: %s\n", w, res[w].error);
            }
            _exit(rc);
        }

        close(p[0]);
        to[w] = p[1];
        cb_nworkers = w + 1;
    }

    close(from[1]);
    signal(SIGPIPE, SIG_IGN);

    /* bounded waits for each phase */
    setup_to = 60 + (double) o.conns / 200.0;
    connect_to = (double) o.conns / o.connect_rate + o.connect_timeout + 30;
    run_to = o.warmup + o.duration + o.drain + o.hold + 30;

    bad = 0;

    if (cb_wait_all(from[0], CB_CTL_SETUP_DONE, o.workers, setup_to, msgs)
        != 0)
    {
        bad = 1;
        goto out;
    }

    fails = 0;
    for (w = 0; w < o.workers; w++) {
        fails += msgs[w].a;
    }

    if (fails > 0) {
        fprintf(stderr, "%llu conversations could not be created; "
                "stopping\n", (unsigned long long) fails);
        bad = 1;
        goto out;
    }

    t_connect = cb_now() + 20 * CB_MS;
    cb_broadcast(to, o.workers, CB_CTL_CONNECT, t_connect);

    if (cb_wait_all(from[0], CB_CTL_READY, o.workers, connect_to, msgs)
        != 0)
    {
        bad = 1;
        goto out;
    }

    if (o.scenario == CB_SC_IDLE) {
        /* let the server settle before reading its RSS */
        usleep(1000000);
    }

    s.rss_after = cb_server_rss(spids, nsp);

    cb_broadcast(to, o.workers, CB_CTL_RUN, cb_now() + 50 * CB_MS);

    if (o.scenario == CB_SC_IDLE && o.hold > 2) {
        /* near the end of the hold, still connected */
        usleep((useconds_t) ((o.hold - 1) * 1e6));
        s.rss_end = cb_server_rss(spids, nsp);
    }

    if (cb_wait_all(from[0], CB_CTL_FINISHED, o.workers, run_to, msgs) != 0)
    {
        bad = 1;
        goto out;
    }

    if (s.rss_end < 0) {
        s.rss_end = cb_server_rss(spids, nsp);
    }

out:

    if (bad) {
        cb_broadcast(to, o.workers, CB_CTL_ABORT, 0);
        usleep(200000);
        cb_kill_workers();
        fprintf(stderr, "run %s failed\n", o.tag);
        return 2;
    }

    for (w = 0; w < o.workers; w++) {
        if (waitpid(cb_pids[w], &status, 0) > 0
            && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        {
            bad = 1;
        }
        close(to[w]);
    }

    cb_merge(&o, res, o.workers, t_connect, &s);
    cb_print(&o, &s);
    cb_write_results(&o, &s);

    if (bad) {
        return 2;
    }

    if (o.check
        && (s.lost != 0 || s.t->dup || s.t->ooo || s.t->stray
            || s.t->seq_gap || s.t->seq_back || s.t->send_fail
            || s.t->unacked || s.conn_failed || s.t->disconnects
            || s.t->skipped
            || (o.scenario != CB_SC_IDLE && o.scenario != CB_SC_STORM
                && o.rate > 0 && s.t->h_e2e.n == 0)))
    {
        printf("CHECK FAILED: loss/dup/order/errors not all zero\n");
        return 3;
    }

    return 0;
}
