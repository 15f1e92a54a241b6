/* loadgen.c - closed-loop load generator for the duprep benchmark.
 *
 * What: one thread, one epoll loop, N TCP connections to 127.0.0.1, each with
 * at most D outstanding REQUESTs of P payload bytes; a reply is answered at
 * once by the next request on the same slot (closed loop).  After a warm-up it
 * measures replies and latencies over a fixed window and prints one JSON line.
 * Why C: the generator must not be the bottleneck of any peer, including the
 * C echo reference; a Python client would saturate first.
 *
 * Modes (--mode):
 *   persistent  N connections set up first (HELLO/WELCOME), then load.
 *   connect     N concurrent slots, each doing connect, HELLO, one REQUEST,
 *               wait for REPLY, wait for the server's close, reconnect (depth
 *               1; latency includes the connect).  For the iterative server.
 *   idle        N connections set up, one request each answered, then a
 *               {"event":"ready"} line; holds them idle until stdin closes or
 *               gets a line (or --idle-max seconds pass), then prints the
 *               result.  For memory/CPU probes.
 * Protocols (--proto):
 *   frame       duprep's wire framing: 4-byte BE length + msgpack array.
 *   zmtp        ZMTP 3.0 (NULL mechanism) as a DEALER socket; every message
 *               body is the same msgpack REQUEST/REPLY array.  For the pyzmq
 *               ROUTER broker; there is no HELLO/WELCOME in this protocol.
 * Apps (--app): echo (payload is checked on return) or kv (get/put/delete/list
 * mix on 1000 keys, see benchmarks/apps.py).
 * --watch PID,PID,...: the CPU time (utime, stime from /proc/PID/stat) each of
 * these processes spent during the measurement window is in the result
 * ("watched"), read at the window's two ends, so the harness can give a
 * server's CPU per reply without a clock of its own.
 *
 * Request ids: msgid = (seq << 8) | slot, so out-of-order replies are matched
 * to their slot and checked against the id that slot is waiting for.
 * Latency histogram: log-linear, 64 sub-buckets per power of two (< 1.6 %
 * error), values in nanoseconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "mp.h"

enum { MODE_PERSISTENT, MODE_CONNECT, MODE_IDLE };
enum { PROTO_FRAME, PROTO_ZMTP };
enum { APP_ECHO, APP_KV };
enum { S_FREE, S_CONNECTING, S_HANDSHAKE, S_READY, S_DRAIN, S_DEAD };

#define MAX_DEPTH 255
#define MAX_IN_FRAME (16u << 20)
#define READ_CHUNK (256 * 1024)
#define HIST_BUCKETS 4096
#define STDIN_KEY UINT64_MAX

typedef struct {
    int fd, state;
    uint8_t *in;  size_t inlen, incap;
    uint8_t *out; size_t outlen, outoff, outcap;
    int epollout;
    int zgreeted;                 /* zmtp: peer greeting consumed */
    int got_welcome;
    uint64_t seq;
    uint64_t started_ns;          /* connect mode: when connect() was called */
    uint64_t *sent_ns;            /* per slot */
    uint64_t *slot_msgid;         /* per slot; 0 = free */
    uint8_t *timed_out;           /* per slot */
} conn_t;

/* ---- options ---- */
static const char *opt_host = "127.0.0.1";
static int opt_port, opt_conns = 10, opt_depth = 1, opt_payload = 64;
static double opt_warmup = 1.0, opt_duration = 3.0, opt_setup_timeout = 60.0;
static int opt_mode = MODE_PERSISTENT, opt_proto = PROTO_FRAME, opt_app = APP_ECHO;
static int opt_timeout_ms = 10000, opt_connect_batch = 256;
static double opt_idle_max = 900.0;      /* idle mode: hold at most this long even if stdin stays open */
#define MAX_WATCH 64
static int n_watch, watch_pid[MAX_WATCH];
static long long watch_ticks[2][MAX_WATCH][2];   /* [window start, end][process][utime, stime]; -1: gone */

/* ---- state ---- */
static conn_t *conns;
static int epfd;
static uint8_t *payload_tpl;
static uint8_t rbuf[READ_CHUNK];
static struct sockaddr_in server_addr;
static int phase_measuring, phase_running;
static uint64_t t_measure_start, t_end;
static uint64_t hist[HIST_BUCKETS];
static uint64_t n_replies, n_sent, lat_sum_ns, lat_max_ns;
static uint64_t err_connect, err_closed, err_error_frames, err_bad_frames, err_mismatch, err_timeouts;
#define MAX_CODE 32
static uint64_t err_codes[MAX_CODE + 1];   /* ERROR frames by code; the last counts codes >= MAX_CODE */
static int n_ready, n_connecting;
static int idle_answered;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (!q && n) { perror("realloc"); exit(1); }
    return q;
}

static void reserve(uint8_t **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    *buf = xrealloc(*buf, c);
    *cap = c;
}

/* ---- histogram ---- */
static int hist_index(uint64_t v) {
    if (v < 128) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int s = msb - 6;
    int idx = 64 * s + (int)(v >> s);
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}
static double hist_value(int idx) {
    if (idx < 128) return idx;
    int s = idx / 64 - 1;
    uint64_t m = (uint64_t)(idx % 64 + 64);
    return (double)(m << s) + (double)(1ull << s) / 2.0;
}
static double hist_percentile(double q) {
    if (!n_replies) return 0;
    uint64_t want = (uint64_t)(q * (double)n_replies + 0.5), acc = 0;
    if (want < 1) want = 1;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        acc += hist[i];
        if (acc >= want) return hist_value(i);
    }
    return (double)lat_max_ns;
}
static void record(uint64_t lat) {
    if (!phase_measuring) return;
    n_replies++;
    hist[hist_index(lat)]++;
    lat_sum_ns += lat;
    if (lat > lat_max_ns) lat_max_ns = lat;
}

/* ---- epoll plumbing ---- */
static void watch(int i, int want_out, int op) {
    conn_t *c = &conns[i];
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.u64 = (uint64_t)i};
    epoll_ctl(epfd, op, c->fd, &ev);
    c->epollout = want_out;
}

static void drop(int i, int new_state) {
    conn_t *c = &conns[i];
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);   /* unregister, then close */
        close(c->fd);
    }
    if (c->state == S_CONNECTING || c->state == S_HANDSHAKE) n_connecting--;
    if (c->state == S_READY || c->state == S_DRAIN) n_ready--;
    c->fd = -1;
    c->state = new_state;
    c->inlen = c->outlen = c->outoff = 0;
    c->zgreeted = c->got_welcome = 0;
    for (int s = 0; s < opt_depth; s++) { c->slot_msgid[s] = 0; c->timed_out[s] = 0; }
}

static int flush_out(int i) {
    conn_t *c = &conns[i];
    while (c->outoff < c->outlen) {
        ssize_t w = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
        if (w > 0) { c->outoff += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        return 0;
    }
    if (c->outoff == c->outlen) c->outoff = c->outlen = 0;
    int want = c->outlen > 0;
    if (want != c->epollout) watch(i, want, EPOLL_CTL_MOD);
    return 1;
}

/* ---- encoders ---- */

/* Starts a message in the output buffer; returns where the body goes. */
static uint8_t *msg_begin(conn_t *c, size_t maxbody) {
    reserve(&c->out, &c->outcap, c->outlen + 9 + maxbody);
    return c->out + c->outlen + (opt_proto == PROTO_ZMTP ? 9 : 4);
}
/* Finishes it: writes the prefix (zmtp: flags + size, moved down if short). */
static void msg_end(conn_t *c, uint8_t *body_end) {
    uint8_t *start = c->out + c->outlen;
    if (opt_proto == PROTO_FRAME) {
        mp_be32(start, (uint32_t)(body_end - start - 4));
        c->outlen = (size_t)(body_end - c->out);
        return;
    }
    size_t len = (size_t)(body_end - start - 9);
    if (len <= 255) {
        start[0] = 0x00; start[1] = (uint8_t)len;
        memmove(start + 2, start + 9, len);
        c->outlen += 2 + len;
    } else {
        start[0] = 0x02;
        mp_be32(start + 1, (uint32_t)((uint64_t)len >> 32));
        mp_be32(start + 5, (uint32_t)len);
        c->outlen += 9 + len;
    }
}

static void put_hello(conn_t *c) {
    uint8_t *p = msg_begin(c, 16);
    p = mp_put_array(p, 3);
    p = mp_put_uint(p, TAG_HELLO);
    p = mp_put_uint(p, 1);
    p = mp_put_str(p, "", 0);
    msg_end(c, p);
}

static void put_zmtp_handshake(conn_t *c) {
    static const char ready[] = "\x05" "READY" "\x0b" "Socket-Type" "\x00\x00\x00\x06" "DEALER";
    size_t rlen = sizeof ready - 1;
    reserve(&c->out, &c->outcap, c->outlen + 64 + 2 + rlen);
    uint8_t *p = c->out + c->outlen;
    memset(p, 0, 64);
    p[0] = 0xff; p[9] = 0x7f; p[10] = 3; p[11] = 0;      /* signature, version 3.0 */
    memcpy(p + 12, "NULL", 4);                          /* mechanism; as-server = 0 */
    p[64] = 0x04; p[65] = (uint8_t)rlen;                /* short command frame */
    memcpy(p + 66, ready, rlen);
    c->outlen += 66 + rlen;
}

static void put_request(int i, int slot, uint64_t now) {
    conn_t *c = &conns[i];
    uint64_t msgid = (++c->seq << 8) | (uint64_t)slot;
    uint8_t *p = msg_begin(c, 40 + (size_t)opt_payload);
    p = mp_put_array(p, 5);
    p = mp_put_uint(p, TAG_REQUEST);
    p = mp_put_uint(p, msgid);
    p = mp_put_uint(p, (uint64_t)i);
    p = mp_put_uint(p, (uint64_t)opt_timeout_ms);
    p = mp_put_bin_header(p, (uint32_t)opt_payload);
    memcpy(p, payload_tpl, (size_t)opt_payload);
    if (opt_app == APP_KV) {
        /* op mix by sequence: 6 get, 2 put, 1 delete, 1 list per 10 */
        static const char ops[10] = {'g', 'g', 'p', 'g', 'g', 'd', 'g', 'p', 'g', 'l'};
        uint64_t h = (c->seq * 2654435761u) ^ ((uint64_t)i * 40503u);
        uint32_t key = (uint32_t)(h % 1000);
        p[0] = (uint8_t)ops[c->seq % 10];
        mp_be32(p + 1, key);
    }
    msg_end(c, p + opt_payload);
    c->sent_ns[slot] = now;
    c->slot_msgid[slot] = msgid;
    c->timed_out[slot] = 0;
    n_sent++;
}

/* ---- connection lifecycle ---- */

static void start_connect(int i, uint64_t now) {
    conn_t *c = &conns[i];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { err_connect++; c->state = S_DEAD; return; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->started_ns = now;
    int r = connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr);
    if (r < 0 && errno != EINPROGRESS) {
        err_connect++; close(fd); c->fd = -1; c->state = S_DEAD; return;
    }
    c->state = S_CONNECTING;
    n_connecting++;
    watch(i, 1, EPOLL_CTL_ADD);
}

static void on_connected(int i, uint64_t now) {
    conn_t *c = &conns[i];
    c->state = S_HANDSHAKE;
    if (opt_proto == PROTO_ZMTP) put_zmtp_handshake(c);
    else put_hello(c);
    if (opt_mode == MODE_CONNECT) put_request(i, 0, now);   /* pipelined behind HELLO */
}

static void on_ready(int i, uint64_t now) {
    conn_t *c = &conns[i];
    c->state = S_READY;
    n_connecting--;
    n_ready++;
    if (opt_mode == MODE_IDLE) { put_request(i, 0, now); return; }
    if (opt_mode == MODE_PERSISTENT && phase_running)
        for (int s = 0; s < opt_depth; s++) put_request(i, s, now);
}

/* Counts an ERROR frame; the cursor is at its code field. */
static void count_error_code(mp_cur *cur) {
    uint64_t code = MAX_CODE;
    err_error_frames++;
    if (!mp_get_uint(cur, &code) || code > MAX_CODE) code = MAX_CODE;
    err_codes[code]++;
}

/* A REPLY or ERROR frame body arrived on a ready connection. */
static int on_answer(int i, uint64_t tag, mp_cur *cur, uint64_t now) {
    conn_t *c = &conns[i];
    uint64_t msgid, cpid;
    const uint8_t *data; uint32_t dlen;
    if (!mp_get_uint(cur, &msgid) || !mp_get_uint(cur, &cpid)) { err_bad_frames++; return 0; }
    int slot = (int)(msgid & 0xff);
    if (slot >= opt_depth || c->slot_msgid[slot] != msgid) { err_mismatch++; return 1; }
    if (tag == TAG_ERROR) {
        count_error_code(cur);
    } else {
        if (!mp_get_bytes(cur, &data, &dlen)) { err_bad_frames++; return 0; }
        if (opt_app == APP_ECHO && (dlen != (uint32_t)opt_payload || memcmp(data, payload_tpl, dlen) != 0))
            err_mismatch++;
        else
            record(now - (opt_mode == MODE_CONNECT ? c->started_ns : c->sent_ns[slot]));
    }
    c->slot_msgid[slot] = 0;
    if (opt_mode == MODE_IDLE) { idle_answered++; return 1; }
    if (opt_mode == MODE_CONNECT) { c->state = S_DRAIN; return 1; }
    if (phase_running && now < t_end) put_request(i, slot, now);
    return 1;
}

/* One message body; returns 0 to drop the connection. */
static int on_message(int i, const uint8_t *body, size_t len, uint64_t now) {
    conn_t *c = &conns[i];
    mp_cur cur = {body, body + len};
    uint32_t n; uint64_t tag;
    if (!mp_get_array(&cur, &n) || n < 1 || !mp_get_uint(&cur, &tag)) { err_bad_frames++; return 0; }
    if (tag == TAG_WELCOME && c->state == S_HANDSHAKE && !c->got_welcome) {
        c->got_welcome = 1;
        if (opt_mode == MODE_CONNECT) { c->state = S_READY; n_connecting--; n_ready++; }
        else on_ready(i, now);
        return 1;
    }
    if ((tag == TAG_REPLY || tag == TAG_ERROR) && c->state == S_READY) return on_answer(i, tag, &cur, now);
    if (tag == TAG_ERROR) {
        uint64_t msgid, cpid;
        if (mp_get_uint(&cur, &msgid) && mp_get_uint(&cur, &cpid)) count_error_code(&cur);
        else err_error_frames++;
        return 0;
    }
    err_bad_frames++;
    return 0;
}

/* Parses every complete message in buf; returns bytes consumed or -1. */
static long parse(int i, const uint8_t *buf, size_t len, uint64_t now) {
    conn_t *c = &conns[i];
    size_t off = 0;
    if (opt_proto == PROTO_ZMTP && !c->zgreeted) {
        if (len < 64) return 0;
        if (buf[0] != 0xff || buf[9] != 0x7f || buf[10] < 3) { err_bad_frames++; return -1; }
        c->zgreeted = 1;
        off = 64;
    }
    while (off < len) {
        const uint8_t *p = buf + off;
        size_t avail = len - off, hdr, blen;
        if (opt_proto == PROTO_FRAME) {
            if (avail < 4) break;
            hdr = 4; blen = mp_rd32(p);
        } else {
            if (avail < 2) break;
            if (p[0] & 0x02) {
                if (avail < 9) break;
                hdr = 9; blen = ((uint64_t)mp_rd32(p + 1) << 32) | mp_rd32(p + 5);
            } else { hdr = 2; blen = p[1]; }
        }
        if (blen > MAX_IN_FRAME) { err_bad_frames++; return -1; }
        if (avail - hdr < blen) break;
        const uint8_t *body = p + hdr;
        if (opt_proto == PROTO_ZMTP && (p[0] & 0x04)) {          /* command */
            if (blen >= 6 && body[0] == 5 && !memcmp(body + 1, "READY", 5) && c->state == S_HANDSHAKE) {
                if (opt_mode == MODE_CONNECT) { c->state = S_READY; n_connecting--; n_ready++; }
                else on_ready(i, now);
            } else if (blen >= 6 && body[0] == 5 && !memcmp(body + 1, "ERROR", 5)) {
                err_error_frames++; return -1;
            }
        } else {
            if (opt_proto == PROTO_ZMTP && (p[0] & 0x01)) { err_bad_frames++; return -1; }  /* multipart */
            if (!on_message(i, body, blen, now)) return -1;
        }
        off += hdr + blen;
    }
    return (long)off;
}

static int on_readable(int i, uint64_t now) {
    conn_t *c = &conns[i];
    ssize_t r = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (r == 0) {
        if (c->state == S_DRAIN) return 2;          /* connect mode: server closed, done */
        return 0;
    }
    if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 1 : 0;
    if (c->state == S_DRAIN) { err_bad_frames++; return 0; }
    const uint8_t *buf = rbuf; size_t len = (size_t)r;
    if (c->inlen) {
        reserve(&c->in, &c->incap, c->inlen + len);
        memcpy(c->in + c->inlen, rbuf, len);
        c->inlen += len;
        buf = c->in; len = c->inlen;
    }
    long used = parse(i, buf, len, now);
    if (used < 0) return 0;
    size_t rest = len - (size_t)used;
    if (rest) {
        if (buf == c->in) memmove(c->in, c->in + used, rest);
        else { reserve(&c->in, &c->incap, rest); memcpy(c->in, buf + used, rest); }
    }
    c->inlen = rest;
    return flush_out(i);
}

static void on_event(int i, uint32_t events, uint64_t now) {
    conn_t *c = &conns[i];
    if (c->state == S_CONNECTING) {
        int err = 0; socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err || (events & (EPOLLERR | EPOLLHUP))) { err_connect++; drop(i, S_DEAD); return; }
        on_connected(i, now);
        if (!flush_out(i)) { err_closed++; drop(i, S_DEAD); }
        return;
    }
    int ok = 1;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) ok = on_readable(i, now);
    if (ok == 1 && (events & EPOLLOUT)) ok = flush_out(i);
    if (ok == 2) {                                   /* connect mode cycle finished */
        drop(i, S_FREE);
        if (phase_running && now < t_end) start_connect(i, now_ns());
        return;
    }
    if (!ok) {
        int was_ready = c->state == S_READY || c->state == S_DRAIN;
        if (was_ready) err_closed++; else err_connect++;
        drop(i, S_DEAD);
        if (opt_mode == MODE_CONNECT && phase_running && now < t_end) start_connect(i, now_ns());
    }
}

static void scan_timeouts(uint64_t now) {
    uint64_t limit = (uint64_t)opt_timeout_ms * 1000000ull;
    for (int i = 0; i < opt_conns; i++) {
        conn_t *c = &conns[i];
        if (c->state != S_READY && c->state != S_HANDSHAKE) continue;
        for (int s = 0; s < opt_depth; s++)
            if (c->slot_msgid[s] && !c->timed_out[s] && now - c->sent_ns[s] > limit) {
                c->timed_out[s] = 1; err_timeouts++;
            }
    }
}

static int loop_once(int timeout_ms) {
    struct epoll_event evs[1024];
    int n = epoll_wait(epfd, evs, 1024, timeout_ms);
    if (n < 0 && errno != EINTR) { perror("epoll_wait"); exit(1); }
    int stdin_event = 0;
    for (int k = 0; k < n; k++) {
        if (evs[k].data.u64 == STDIN_KEY) { stdin_event = 1; continue; }
        on_event((int)evs[k].data.u64, evs[k].events, now_ns());
    }
    return stdin_event;
}

static int outstanding(void) {
    int o = 0;
    for (int i = 0; i < opt_conns; i++)
        for (int s = 0; s < opt_depth; s++) o += conns[i].slot_msgid[s] != 0;
    return o;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* utime and stime of every watched process now, in clock ticks, into watch_ticks[end]. */
static void read_watched(int end) {
    for (int k = 0; k < n_watch; k++) {
        char path[64], buf[1024];
        long long *t = watch_ticks[end][k];
        t[0] = t[1] = -1;
        snprintf(path, sizeof path, "/proc/%d/stat", watch_pid[k]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) continue;
        buf[n] = 0;
        char *p = strrchr(buf, ')');      /* the command name may hold spaces and parentheses */
        /* after ") ": state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime */
        if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lld %lld", &t[0], &t[1]) != 2)
            t[0] = t[1] = -1;
    }
}

/* , "clk_tck": 100, "watched": [{"pid": 1, "user_ticks": 2, "sys_ticks": 3}, ...]: processes gone
 * before the window ended are left out. */
static void print_watched(void) {
    printf(", \"clk_tck\": %ld, \"watched\": [", sysconf(_SC_CLK_TCK));
    for (int k = 0, first = 1; k < n_watch; k++) {
        long long *a = watch_ticks[0][k], *b = watch_ticks[1][k];
        if (a[0] < 0 || b[0] < 0) continue;
        printf("%s{\"pid\": %d, \"user_ticks\": %lld, \"sys_ticks\": %lld}", first ? "" : ", ", watch_pid[k],
               b[0] - a[0], b[1] - a[1]);
        first = 0;
    }
    printf("]");
}

static void print_result(const char *event, double setup_s, double measured_s, double cpu_s) {
    double rate = measured_s > 0 ? (double)n_replies / measured_s : 0;
    /* ERROR frames by code, appended to the JSON object: , "error_codes": {"9": 3}} */
    char codes[1024];
    size_t len = (size_t)snprintf(codes, sizeof codes, ", \"error_codes\": {");
    for (int k = 0, first = 1; k <= MAX_CODE && len < sizeof codes - 64; k++)
        if (err_codes[k]) {
            len += (size_t)snprintf(codes + len, sizeof codes - len, "%s\"%d\": %llu", first ? "" : ", ", k,
                                    (unsigned long long)err_codes[k]);
            first = 0;
        }
    snprintf(codes + len, sizeof codes - len, "}}\n");
    printf("{\"event\": \"%s\", \"mode\": \"%s\", \"proto\": \"%s\", \"app\": \"%s\", "
           "\"conns\": %d, \"connected\": %d, \"depth\": %d, \"payload\": %d, "
           "\"setup_s\": %.3f, \"measured_s\": %.3f, \"replies\": %llu, \"sent\": %llu, \"replies_per_s\": %.1f, "
           "\"lat_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"p999\": %.1f, \"max\": %.1f, \"mean\": %.1f}, "
           "\"errors\": {\"connect\": %llu, \"closed\": %llu, \"error_frames\": %llu, \"bad_frames\": %llu, "
           "\"mismatched\": %llu, \"timeouts\": %llu}, \"outstanding\": %d, \"loadgen_cpu_pct\": %.1f",
           event,
           opt_mode == MODE_PERSISTENT ? "persistent" : opt_mode == MODE_CONNECT ? "connect" : "idle",
           opt_proto == PROTO_FRAME ? "frame" : "zmtp", opt_app == APP_ECHO ? "echo" : "kv",
           opt_conns, n_ready, opt_depth, opt_payload, setup_s, measured_s,
           (unsigned long long)n_replies, (unsigned long long)n_sent, rate,
           hist_percentile(0.50) / 1e3, hist_percentile(0.90) / 1e3, hist_percentile(0.99) / 1e3,
           hist_percentile(0.999) / 1e3, (double)lat_max_ns / 1e3,
           n_replies ? (double)lat_sum_ns / (double)n_replies / 1e3 : 0.0,
           (unsigned long long)err_connect, (unsigned long long)err_closed,
           (unsigned long long)err_error_frames, (unsigned long long)err_bad_frames,
           (unsigned long long)err_mismatch, (unsigned long long)err_timeouts,
           outstanding(), measured_s > 0 ? 100.0 * cpu_s / measured_s : 0.0);
    if (measured_s > 0) print_watched();
    printf("%s", codes);
    fflush(stdout);
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen --port P [--host H] [--conns N] [--depth D] [--payload P]\n"
                    "  [--warmup S] [--duration S] [--mode persistent|connect|idle] [--proto frame|zmtp]\n"
                    "  [--app echo|kv] [--setup-timeout S] [--timeout-ms MS] [--connect-batch N] [--idle-max S]\n"
                    "  [--watch PID,PID,...]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host")) opt_host = v;
        else if (!strcmp(a, "--port")) opt_port = atoi(v);
        else if (!strcmp(a, "--conns")) opt_conns = atoi(v);
        else if (!strcmp(a, "--depth")) opt_depth = atoi(v);
        else if (!strcmp(a, "--payload")) opt_payload = atoi(v);
        else if (!strcmp(a, "--warmup")) opt_warmup = atof(v);
        else if (!strcmp(a, "--duration")) opt_duration = atof(v);
        else if (!strcmp(a, "--setup-timeout")) opt_setup_timeout = atof(v);
        else if (!strcmp(a, "--timeout-ms")) opt_timeout_ms = atoi(v);
        else if (!strcmp(a, "--connect-batch")) opt_connect_batch = atoi(v);
        else if (!strcmp(a, "--idle-max")) opt_idle_max = atof(v);
        else if (!strcmp(a, "--watch")) {
            for (char *end; *v && n_watch < MAX_WATCH; v = *end ? end + 1 : end) {
                long pid = strtol(v, &end, 10);
                if (end == v || pid <= 0 || (*end && *end != ',')) usage();
                watch_pid[n_watch++] = (int)pid;
            }
            if (*v) usage();                  /* more than MAX_WATCH */
        }
        else if (!strcmp(a, "--mode"))
            opt_mode = !strcmp(v, "persistent") ? MODE_PERSISTENT : !strcmp(v, "connect") ? MODE_CONNECT
                     : !strcmp(v, "idle") ? MODE_IDLE : (usage(), 0);
        else if (!strcmp(a, "--proto"))
            opt_proto = !strcmp(v, "frame") ? PROTO_FRAME : !strcmp(v, "zmtp") ? PROTO_ZMTP : (usage(), 0);
        else if (!strcmp(a, "--app"))
            opt_app = !strcmp(v, "echo") ? APP_ECHO : !strcmp(v, "kv") ? APP_KV : (usage(), 0);
        else usage();
    }
    if (opt_port <= 0 || opt_conns < 1 || opt_depth < 1 || opt_depth > MAX_DEPTH || opt_payload < 0
        || (opt_app == APP_KV && opt_payload < 5) || opt_connect_batch < 1)
        usage();
    if (opt_mode != MODE_PERSISTENT) opt_depth = 1;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }

    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)opt_port);
    if (inet_pton(AF_INET, opt_host, &server_addr.sin_addr) != 1) { fprintf(stderr, "bad host\n"); return 2; }

    payload_tpl = malloc((size_t)opt_payload + 1);
    for (int k = 0; k < opt_payload; k++) payload_tpl[k] = (uint8_t)('a' + k % 26);
    conns = calloc((size_t)opt_conns, sizeof *conns);
    for (int i = 0; i < opt_conns; i++) {
        conns[i].fd = -1;
        conns[i].sent_ns = calloc((size_t)opt_depth, sizeof(uint64_t));
        conns[i].slot_msgid = calloc((size_t)opt_depth, sizeof(uint64_t));
        conns[i].timed_out = calloc((size_t)opt_depth, 1);
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);

    uint64_t t0 = now_ns();
    uint64_t setup_deadline = t0 + (uint64_t)(opt_setup_timeout * 1e9);
    uint64_t hard_deadline = setup_deadline + (uint64_t)((opt_warmup + opt_duration + 10) * 1e9);
    double setup_s = 0;

    /* Phase 1: set up the connections (not in connect mode). */
    if (opt_mode != MODE_CONNECT) {
        int next = 0;
        while (now_ns() < setup_deadline) {
            while (next < opt_conns && n_connecting < opt_connect_batch) start_connect(next++, now_ns());
            if (next >= opt_conns && n_connecting == 0) break;
            loop_once(50);
        }
        for (int i = 0; i < opt_conns; i++)
            if (conns[i].state == S_CONNECTING || conns[i].state == S_HANDSHAKE) { err_connect++; drop(i, S_DEAD); }
        setup_s = (double)(now_ns() - t0) / 1e9;
    }

    if (opt_mode == MODE_IDLE) {
        /* Phase 2 (idle): one answered request per connection, then hold. */
        uint64_t deadline = now_ns() + (uint64_t)(opt_setup_timeout * 1e9);
        while (idle_answered < n_ready && now_ns() < deadline) loop_once(50);
        print_result("ready", setup_s, 0, 0);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = STDIN_KEY};
        epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
        uint64_t idle_end = now_ns() + (uint64_t)(opt_idle_max * 1e9);
        while (now_ns() < idle_end)              /* until stdin is readable (line or EOF) */
            if (loop_once(1000)) break;
        print_result("done", setup_s, 0, 0);
        return 0;
    }

    /* Phase 2: warm-up, then the measurement window. */
    uint64_t now = now_ns();
    uint64_t t_warm_end = now + (uint64_t)(opt_warmup * 1e9);
    t_end = t_warm_end + (uint64_t)(opt_duration * 1e9);
    phase_running = 1;
    if (opt_mode == MODE_CONNECT) {
        for (int i = 0; i < opt_conns; i++) start_connect(i, now_ns());
    } else {
        for (int i = 0; i < opt_conns; i++)
            if (conns[i].state == S_READY) {
                for (int s = 0; s < opt_depth; s++) put_request(i, s, now);
                if (!flush_out(i)) { err_closed++; drop(i, S_DEAD); }
            }
    }
    double cpu0 = 0;
    uint64_t next_scan = now + 250000000ull;
    for (;;) {
        now = now_ns();
        if (!phase_measuring && now >= t_warm_end) {
            phase_measuring = 1;
            t_measure_start = now;
            cpu0 = cpu_seconds();
            read_watched(0);
        }
        if (now >= t_end || now >= hard_deadline) break;
        if (now >= next_scan) { scan_timeouts(now); next_scan = now + 250000000ull; }
        uint64_t wake = phase_measuring ? t_end : t_warm_end;
        if (next_scan < wake) wake = next_scan;
        int ms = (int)((wake - now) / 1000000ull) + 1;
        loop_once(ms);
    }
    now = now_ns();
    read_watched(1);
    double measured = phase_measuring ? (double)(now - t_measure_start) / 1e9 : 0;
    print_result("done", setup_s, measured, cpu_seconds() - cpu0);
    return 0;
}
