/* cecho.c - single-threaded epoll echo server speaking duprep's wire framing.
 *
 * What: the physical-limit reference line of the benchmark.  It answers HELLO
 * with WELCOME and every REQUEST with a REPLY carrying the same data, doing no
 * other work, in one process with one epoll loop (level-triggered).
 * Why: whatever a Python server reaches is compared against what the kernel's
 * loopback plus a minimal C loop can do on the same cores with the same load.
 *
 * Usage: cecho [--host 127.0.0.1] [--port 0]
 * Prints {"port": N} on stdout once listening; exits on SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "mp.h"

#define MAX_FRAME (1u << 20)
#define READ_CHUNK 65536

typedef struct {
    uint8_t *in;  size_t inlen, incap;
    uint8_t *out; size_t outlen, outoff, outcap;
    int hello;        /* HELLO seen */
    int epollout;     /* EPOLLOUT currently registered */
} conn_t;

static conn_t **conns;
static int nconns_max;
static int epfd;
static uint32_t next_gen = 1;

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (!q) { perror("realloc"); exit(1); }
    return q;
}

static void reserve(uint8_t **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    *buf = xrealloc(*buf, c);
    *cap = c;
}

static void close_conn(int fd) {
    conn_t *c = conns[fd];
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);   /* unregister, then close */
    close(fd);
    if (c) { free(c->in); free(c->out); free(c); }
    conns[fd] = NULL;
}

/* Append one complete frame (length prefix + body) to the output buffer. */
static uint8_t *out_begin(conn_t *c, size_t maxbody) {
    if (c->outoff == c->outlen) c->outoff = c->outlen = 0;
    reserve(&c->out, &c->outcap, c->outlen + 4 + maxbody);
    return c->out + c->outlen + 4;
}
static void out_end(conn_t *c, uint8_t *end) {
    uint8_t *start = c->out + c->outlen;
    mp_be32(start, (uint32_t)(end - start - 4));
    c->outlen = (size_t)(end - c->out);
}

/* Handle one frame body; 0 means "close the connection". */
static int on_frame(int fd, conn_t *c, const uint8_t *body, size_t len) {
    mp_cur cur = {body, body + len};
    uint32_t n; uint64_t tag;
    if (!mp_get_array(&cur, &n) || n < 1 || !mp_get_uint(&cur, &tag)) return 0;
    if (!c->hello) {
        uint64_t version; const uint8_t *name; uint32_t namelen = 0;
        if (tag != TAG_HELLO || n < 2 || !mp_get_uint(&cur, &version)) return 0;
        if (n >= 3 && !mp_get_bytes(&cur, &name, &namelen)) return 0;
        if (namelen > 64) return 0;
        c->hello = 1;
        uint8_t *p = out_begin(c, 64 + namelen);
        p = mp_put_array(p, 6);
        p = mp_put_uint(p, TAG_WELCOME);
        p = mp_put_uint(p, 1);
        p = mp_put_uint(p, (uint64_t)fd);
        p = mp_put_uint(p, next_gen++);
        p = mp_put_str(p, namelen ? (const char *)name : "", namelen);
        p = mp_put_uint(p, MAX_FRAME);
        out_end(c, p);
        return 1;
    }
    uint64_t msgid, cpid, timeout; const uint8_t *data; uint32_t dlen;
    if (tag != TAG_REQUEST || n != 5 || !mp_get_uint(&cur, &msgid) || !mp_get_uint(&cur, &cpid)
        || !mp_get_uint(&cur, &timeout) || !mp_get_bytes(&cur, &data, &dlen))
        return 0;
    uint8_t *p = out_begin(c, 32 + dlen);
    p = mp_put_array(p, 4);
    p = mp_put_uint(p, TAG_REPLY);
    p = mp_put_uint(p, msgid);
    p = mp_put_uint(p, cpid);
    p = mp_put_bin_header(p, dlen);
    memcpy(p, data, dlen);
    out_end(c, p + dlen);
    return 1;
}

static int flush_out(int fd, conn_t *c) {
    while (c->outoff < c->outlen) {
        ssize_t w = send(fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
        if (w > 0) { c->outoff += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        return 0;
    }
    int want = c->outoff < c->outlen;
    if (want != c->epollout) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.fd = fd};
        epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
        c->epollout = want;
    }
    return 1;
}

static int on_readable(int fd, conn_t *c) {
    reserve(&c->in, &c->incap, c->inlen + READ_CHUNK);
    ssize_t r = recv(fd, c->in + c->inlen, READ_CHUNK, 0);
    if (r == 0) return 0;
    if (r < 0) return errno == EAGAIN || errno == EINTR;
    c->inlen += (size_t)r;
    size_t off = 0;
    while (c->inlen - off >= 4) {
        uint32_t flen = mp_rd32(c->in + off);
        if (flen > MAX_FRAME) return 0;
        if (c->inlen - off - 4 < flen) break;
        if (!on_frame(fd, c, c->in + off + 4, flen)) return 0;
        off += 4 + flen;
    }
    if (off) { memmove(c->in, c->in + off, c->inlen - off); c->inlen -= off; }
    return flush_out(fd, c);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    getrlimit(RLIMIT_NOFILE, &rl);
    nconns_max = rl.rlim_cur > 1000000 ? 1000000 : (int)rl.rlim_cur;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else { fprintf(stderr, "usage: cecho [--host H] [--port P]\n"); return 2; }
    }
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    conns = calloc((size_t)nconns_max, sizeof *conns);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) { fprintf(stderr, "bad host\n"); return 2; }
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 4096) < 0) { perror("bind/listen"); return 1; }
    socklen_t sl = sizeof sa;
    getsockname(ls, (struct sockaddr *)&sa, &sl);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(epfd, EPOLL_CTL_ADD, ls, &ev);
    printf("{\"port\": %d}\n", ntohs(sa.sin_port));
    fflush(stdout);

    struct epoll_event evs[512];
    for (;;) {
        int n = epoll_wait(epfd, evs, 512, -1);
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (int k = 0; k < 256; k++) {          /* bounded accepts per wake-up */
                    int cfd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) break;
                    if (cfd >= nconns_max) { close(cfd); continue; }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conns[cfd] = calloc(1, sizeof(conn_t));
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            conn_t *c = conns[fd];
            if (!c) continue;
            int ok = 1;
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) ok = on_readable(fd, c);
            if (ok && (evs[i].events & EPOLLOUT)) ok = flush_out(fd, c);
            if (!ok) close_conn(fd);
        }
    }
}
