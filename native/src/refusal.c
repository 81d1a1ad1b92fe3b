/*
 * refusal.c: refusing a worker's connections for load, outside the interpreter.
 *
 * While a worker is overloaded, its listening socket's new connections and
 * the kept-alive connections its event loop has just refused come here. A
 * small epoll loop reads each request and answers a whole plain PKIOperation
 * POST (http_head.c) with the canned 503 it is given; the connection stays
 * open for its next request. Anything else (another request, one that is not
 * all there within the read timeout, any request once the worker serves
 * again) is handed back to the caller with the bytes read so far. A
 * connection idle for the keep-alive timeout is closed.
 *
 * The caller is one thread that calls scep_refusal_poll in a loop; cffi
 * releases the GIL for the call, so a refusal costs the interpreter nothing.
 * A loop is used by one thread only: others reach it through the wake-up
 * descriptor it watches.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "scep_native.h"

#define MAX_EVENTS 256
#define MAX_RECV 65536
#define ACCEPTS_PER_ROUND 64            /* what is waiting now, then back to the others */
#define RESOURCE_BACKOFF_NS 10000000L   /* out of descriptors: as the event loop's accept */
/* An idle connection keeps no larger buffer than this (a client that sent one
   big request must not hold that memory for as long as it stays connected). */
#define IDLE_BUFFER_MAX 16384

typedef struct {
    int fd;
    int idle;                  /* waiting for its next request, not the rest of one */
    unsigned long generation;  /* new whenever it starts to wait for something else */
    unsigned char *data;
    size_t len, cap;
} held_conn;

/* When each connection waiting for one kind of thing is due. Each kind waits a
   fixed time, so its queue stays in deadline order and expiry reads the head;
   an entry whose connection has moved on since (another generation) is skipped. */
typedef struct {
    double deadline;
    int fd;
    unsigned long generation;
} due_entry;

typedef struct {
    due_entry *entries;
    size_t head, count, cap;
} due_queue;

typedef struct {
    held_conn **items;
    size_t count, cap;
} conn_list;

struct scep_refusal {
    int epoll_fd;
    int wake_fd;
    int listen_fd;             /* the listener while registered, else -1 */
    int refusing;
    size_t max_body;
    double keep_alive_seconds, read_seconds;
    size_t max_connections;
    held_conn **by_fd;         /* the held connections, by descriptor */
    size_t by_fd_cap;
    size_t held;
    unsigned long generation;
    due_queue due[2];          /* [0]: reading a request, [1]: idle between two */
    conn_list giving;          /* to hand back; not in by_fd any more, still open */
    conn_list given;           /* handed back by the last call: their bytes live until the next */
    unsigned char scratch[MAX_RECV];
};

static double now_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void conn_free(held_conn *c)
{
    if (c != NULL) {
        free(c->data);
        free(c);
    }
}

static int list_push(conn_list *list, held_conn *c)
{
    if (list->count == list->cap) {
        size_t cap = list->cap > 0 ? list->cap * 2 : 64;
        held_conn **grown = realloc(list->items, cap * sizeof(*grown));
        if (grown == NULL)
            return 0;
        list->items = grown;
        list->cap = cap;
    }
    list->items[list->count++] = c;
    return 1;
}

static int due_push(due_queue *q, double deadline, int fd, unsigned long generation)
{
    if (q->count == q->cap) {
        /* Grow, laying the ring out flat from its head. */
        size_t cap = q->cap > 0 ? q->cap * 2 : 64, i;
        due_entry *grown = malloc(cap * sizeof(*grown));
        if (grown == NULL)
            return 0;
        for (i = 0; i < q->count; i++)
            grown[i] = q->entries[(q->head + i) % q->cap];
        free(q->entries);
        q->entries = grown;
        q->cap = cap;
        q->head = 0;
    }
    q->entries[(q->head + q->count) % q->cap] = (due_entry){deadline, fd, generation};
    q->count++;
    return 1;
}

scep_refusal *scep_refusal_new(int wake_fd, size_t max_body, double keep_alive_seconds,
                               double read_seconds, size_t max_connections)
{
    scep_refusal *r = calloc(1, sizeof(*r));
    struct epoll_event event = {.events = EPOLLIN, .data.fd = wake_fd};

    if (r == NULL)
        return NULL;
    r->wake_fd = wake_fd;
    r->listen_fd = -1;
    r->max_body = max_body;
    r->keep_alive_seconds = keep_alive_seconds;
    r->read_seconds = read_seconds;
    r->max_connections = max_connections;
    r->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (r->epoll_fd < 0) {
        free(r);
        return NULL;
    }
    if (epoll_ctl(r->epoll_fd, EPOLL_CTL_ADD, wake_fd, &event) != 0) {
        close(r->epoll_fd);
        free(r);
        return NULL;
    }
    return r;
}

static void free_given(scep_refusal *r)
{
    size_t i;

    for (i = 0; i < r->given.count; i++)
        conn_free(r->given.items[i]);
    r->given.count = 0;
}

void scep_refusal_free(scep_refusal *r)
{
    size_t i;

    if (r == NULL)
        return;
    free_given(r);
    for (i = 0; i < r->giving.count; i++) {
        close(r->giving.items[i]->fd);
        conn_free(r->giving.items[i]);
    }
    for (i = 0; i < r->by_fd_cap; i++) {
        if (r->by_fd[i] != NULL) {
            close(r->by_fd[i]->fd);
            conn_free(r->by_fd[i]);
        }
    }
    close(r->epoll_fd);
    free(r->by_fd);
    free(r->due[0].entries);
    free(r->due[1].entries);
    free(r->giving.items);
    free(r->given.items);
    free(r);
}

size_t scep_refusal_held(const scep_refusal *r)
{
    return r->held;
}

/* Forgets the connection; its descriptor stays open. */
static held_conn *unhold(scep_refusal *r, held_conn *c)
{
    epoll_ctl(r->epoll_fd, EPOLL_CTL_DEL, c->fd, NULL);
    r->by_fd[c->fd] = NULL;
    r->held--;
    return c;
}

static void drop(scep_refusal *r, held_conn *c)
{
    int fd = c->fd;

    conn_free(unhold(r, c));
    close(fd);
}

/* Back to the caller, with the bytes read, in this call's output or the next one's. */
static void give(scep_refusal *r, held_conn *c)
{
    unhold(r, c);
    if (!list_push(&r->giving, c)) {
        close(c->fd);  /* out of memory: the client will connect again */
        conn_free(c);
    }
}

/* Sets what the connection waits for: its next request (idle) or the rest of one. */
static int wait_for(scep_refusal *r, held_conn *c, int idle, double now)
{
    c->idle = idle;
    c->generation = ++r->generation;
    return due_push(&r->due[idle ? 1 : 0],
                    now + (idle ? r->keep_alive_seconds : r->read_seconds), c->fd,
                    c->generation);
}

static int hold(scep_refusal *r, int fd, int idle)
{
    struct epoll_event event = {.events = EPOLLIN, .data.fd = fd};
    held_conn *c;

    if (fd < 0 || fd == r->wake_fd || fd == r->epoll_fd)
        return 0;
    if ((size_t)fd >= r->by_fd_cap) {
        size_t cap = r->by_fd_cap > 0 ? r->by_fd_cap : 1024;
        held_conn **grown;
        while (cap <= (size_t)fd)
            cap *= 2;
        grown = realloc(r->by_fd, cap * sizeof(*grown));
        if (grown == NULL)
            return 0;
        memset(grown + r->by_fd_cap, 0, (cap - r->by_fd_cap) * sizeof(*grown));
        r->by_fd = grown;
        r->by_fd_cap = cap;
    }
    if (r->by_fd[fd] != NULL)
        return 0;
    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return 0;
    c->fd = fd;
    if (epoll_ctl(r->epoll_fd, EPOLL_CTL_ADD, fd, &event) != 0) {
        free(c);
        return 0;
    }
    r->by_fd[fd] = c;
    r->held++;
    if (!wait_for(r, c, idle, now_seconds())) {
        conn_free(unhold(r, c));
        return 0;
    }
    return 1;
}

int scep_refusal_hold(scep_refusal *r, int fd)
{
    return hold(r, fd, 1);
}

static void accept_new(scep_refusal *r)
{
    int i;

    for (i = 0; i < ACCEPTS_PER_ROUND; i++) {
        int fd = accept4(r->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                struct timespec pause = {0, RESOURCE_BACKOFF_NS};
                nanosleep(&pause, NULL);
            }
            return;
        }
        if (!hold(r, fd, 0))
            close(fd);
    }
}

static int append(held_conn *c, const unsigned char *bytes, size_t n)
{
    if (c->len + n > c->cap) {
        size_t cap = c->cap > 0 ? c->cap : 4096;
        unsigned char *grown;
        while (cap < c->len + n)
            cap *= 2;
        grown = realloc(c->data, cap);
        if (grown == NULL)
            return 0;
        c->data = grown;
        c->cap = cap;
    }
    memcpy(c->data + c->len, bytes, n);
    c->len += n;
    return 1;
}

static void read_request(scep_refusal *r, held_conn *c, scep_buf answer, scep_buf answer_close,
                         size_t *refused)
{
    ssize_t n = recv(c->fd, r->scratch, sizeof(r->scratch), 0);
    long total;
    int closing, complete;

    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0 || !append(c, r->scratch, (size_t)n)) {
        drop(r, c);
        return;
    }
    if (!r->refusing) {
        give(r, c);
        return;
    }
    total = scep_pki_post_length(c->data, c->len, r->max_body);
    if (total == SCEP_HTTP_INCOMPLETE || (total > 0 && c->len < (size_t)total)) {
        if (c->idle && !wait_for(r, c, 0, now_seconds()))
            give(r, c);
        return;
    }
    if (total == SCEP_HTTP_OTHER || c->len > (size_t)total) {
        give(r, c);  /* something else, or more than one request: served */
        return;
    }
    closing = r->held > r->max_connections;
    if (closing)
        answer = answer_close;
    n = send(c->fd, answer.data, answer.len, MSG_NOSIGNAL);
    complete = n >= 0 && (size_t)n == answer.len;
    (*refused)++;
    if (closing || !complete) {
        drop(r, c);  /* a client that does not read its answers is let go */
        return;
    }
    c->len = 0;
    if (c->cap > IDLE_BUFFER_MAX) {
        free(c->data);
        c->data = NULL;
        c->cap = 0;
    }
    if (!wait_for(r, c, 1, now_seconds()))
        drop(r, c);
}

/* Idle past the keep-alive timeout: closed; a request not all there in time: handed back. */
static void expire(scep_refusal *r, double now)
{
    int idle;

    for (idle = 0; idle <= 1; idle++) {
        due_queue *q = &r->due[idle];
        while (q->count > 0 && q->entries[q->head].deadline <= now) {
            due_entry entry = q->entries[q->head];
            held_conn *c;
            q->head = (q->head + 1) % q->cap;
            q->count--;
            c = (size_t)entry.fd < r->by_fd_cap ? r->by_fd[entry.fd] : NULL;
            if (c == NULL || c->generation != entry.generation)
                continue;  /* it has moved on since */
            if (idle)
                drop(r, c);
            else
                give(r, c);
        }
    }
}

/* Starts or stops taking new connections; when it stops, requests under way go back. */
static void set_refusing(scep_refusal *r, int listen_fd, int refusing)
{
    int wanted = refusing ? listen_fd : -1;
    size_t i;

    if (wanted != r->listen_fd) {
        if (r->listen_fd >= 0)
            epoll_ctl(r->epoll_fd, EPOLL_CTL_DEL, r->listen_fd, NULL);
        r->listen_fd = -1;
        if (wanted >= 0) {
            struct epoll_event event = {.events = EPOLLIN, .data.fd = wanted};
            /* A listener already closed means the worker is stopping: not listening. */
            if (epoll_ctl(r->epoll_fd, EPOLL_CTL_ADD, wanted, &event) == 0)
                r->listen_fd = wanted;
        }
    }
    if (r->refusing && !refusing) {
        for (i = 0; i < r->by_fd_cap; i++)
            if (r->by_fd[i] != NULL && !r->by_fd[i]->idle)
                give(r, r->by_fd[i]);  /* mid-request: the event loop serves it now */
    }
    r->refusing = refusing;
}

/* Moves what is to be handed back into out, as far as it fits. */
static size_t hand_back(scep_refusal *r, scep_handback *out, size_t max_out)
{
    size_t n = r->giving.count < max_out ? r->giving.count : max_out, i;

    for (i = 0; i < n; i++) {
        held_conn *c = r->giving.items[i];
        out[i].fd = c->fd;
        out[i].data = c->data;
        out[i].len = c->len;
        if (!list_push(&r->given, c)) {
            /* out of memory: its bytes cannot outlive this call; let it go */
            out[i].fd = -1;
            out[i].len = 0;
            close(c->fd);
            conn_free(c);
        }
    }
    if (n > 0 && n < r->giving.count)
        memmove(r->giving.items, r->giving.items + n,
                (r->giving.count - n) * sizeof(held_conn *));
    r->giving.count -= n;
    return n;
}

int scep_refusal_poll(scep_refusal *r, int listen_fd, int refusing, int timeout_ms,
                      scep_buf answer, scep_buf answer_close, scep_handback *out,
                      size_t max_out, scep_refusal_round *round)
{
    struct epoll_event events[MAX_EVENTS];
    int n, i;

    memset(round, 0, sizeof(*round));
    free_given(r);
    set_refusing(r, listen_fd, refusing);
    if (r->giving.count > 0)
        timeout_ms = 0;
    n = epoll_wait(r->epoll_fd, events, MAX_EVENTS, timeout_ms);
    if (n < 0) {
        if (errno != EINTR)
            return 0;
        n = 0;
    }
    for (i = 0; i < n; i++) {
        int fd = events[i].data.fd;
        if (fd == r->wake_fd) {
            uint64_t count;
            if (read(r->wake_fd, &count, sizeof(count)) < 0) {
                /* nothing to read: another round woke it already */
            }
            round->woken = 1;
        } else if (fd == r->listen_fd) {
            accept_new(r);
        } else if ((size_t)fd < r->by_fd_cap && r->by_fd[fd] != NULL) {
            read_request(r, r->by_fd[fd], answer, answer_close, &round->refused);
        }
    }
    expire(r, now_seconds());
    round->handed_back = hand_back(r, out, max_out);
    round->more = r->giving.count > 0;
    return 1;
}

size_t scep_refusal_finish(scep_refusal *r, scep_handback *out, size_t max_out)
{
    size_t i;

    free_given(r);
    if (r->listen_fd >= 0)
        epoll_ctl(r->epoll_fd, EPOLL_CTL_DEL, r->listen_fd, NULL);
    r->listen_fd = -1;
    r->refusing = 0;
    for (i = 0; i < r->by_fd_cap; i++) {
        held_conn *c = r->by_fd[i];
        if (c == NULL)
            continue;
        if (c->len > 0)
            give(r, c);  /* a request under way is served */
        else
            drop(r, c);  /* an idle connection is closed */
    }
    return hand_back(r, out, max_out);
}
