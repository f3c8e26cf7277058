/* The controller (core.new): one libcurl multi handle driven through
 * curl_multi_socket_action. Its sockets sit in one epoll set, so a host
 * loop can wait on a single descriptor (ctl:pollfd()) plus ctl:timeout().
 *
 *   local ctl = core.new{ max_connections = 16 }
 *   local id = ctl:add{ url = ..., method = "POST", body = ..., ... }
 *   ctl:step(wait_ms, budget)  -- run I/O; waits at most wait_ms (0: never)
 *   for id, res in ctl:done do ... end
 *
 * Nothing here calls Lua from a libcurl callback, and nothing yields. */
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <math.h>
#include <unistd.h>
#include "core.h"

#if defined(__linux__)
#include <sys/epoll.h>
#define LBATCH_EPOLL 1
#endif

#define MAX_EVENTS 8   /* sockets handed to libcurl per step: the rest stay ready (level-triggered) */
#define ADMIT 2        /* transfers started per step with a budget: the rest wait */

typedef struct list {
  xfer *head, *tail;
  int n;
} list;

typedef struct ctl {
  CURLM *multi;
  int epfd;                   /* -1 without epoll: then curl_multi_poll */
  double deadline;            /* monotonic ms when curl wants a call; <0: none */
  int running;
  int max_active;             /* transfers in the multi handle at once; 0: no cap */
  int max_conns, max_streams; /* max_active is max_conns, and max_conns x max_streams
                               * once a connection has multiplexed (HTTP/2) */
  lua_Integer next_id;
  list queued;                /* added, not yet handed to libcurl */
  list active;                /* in the multi handle */
  list done;                  /* finished, waiting for ctl:done() */
  int closed;
} ctl;

static ctl *check_ctl(lua_State *L) {
  ctl *c = luaL_checkudata(L, 1, LBATCH_CTL);
  if (c->closed) luaL_error(L, "lbatch.core: controller is closed");
  return c;
}

/* ------------------------------------------------------------ libcurl hooks */

#ifdef LBATCH_EPOLL
static int on_socket(CURL *e, curl_socket_t s, int what, void *userp, void *socketp) {
  ctl *c = userp;
  struct epoll_event ev;
  (void)e;
  if (what == CURL_POLL_REMOVE) {
    epoll_ctl(c->epfd, EPOLL_CTL_DEL, s, NULL); /* may already be closed */
    curl_multi_assign(c->multi, s, NULL);
    return 0;
  }
  memset(&ev, 0, sizeof ev);
  ev.data.fd = s;
  if (what & CURL_POLL_IN) ev.events |= EPOLLIN;
  if (what & CURL_POLL_OUT) ev.events |= EPOLLOUT;
  if (socketp) {
    if (epoll_ctl(c->epfd, EPOLL_CTL_MOD, s, &ev) != 0 && errno == ENOENT)
      epoll_ctl(c->epfd, EPOLL_CTL_ADD, s, &ev);
  } else {
    if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, s, &ev) != 0 && errno == EEXIST)
      epoll_ctl(c->epfd, EPOLL_CTL_MOD, s, &ev);
    curl_multi_assign(c->multi, s, c);
  }
  return 0;
}
#endif

static int on_timer(CURLM *m, long timeout_ms, void *userp) {
  ctl *c = userp;
  (void)m;
  c->deadline = timeout_ms < 0 ? -1 : lb_now_ms() + (double)timeout_ms;
  return 0;
}

/* ------------------------------------------------------------ lists */

static void push(list *l, xfer *x) {
  x->next = NULL;
  x->prev = l->tail;
  if (l->tail) l->tail->next = x; else l->head = x;
  l->tail = x;
  l->n++;
}

static void unlink_from(list *l, xfer *x) {
  if (x->prev) x->prev->next = x->next; else l->head = x->next;
  if (x->next) x->next->prev = x->prev; else l->tail = x->prev;
  x->prev = x->next = NULL;
  l->n--;
}

static xfer *find(list *l, lua_Integer id) {
  xfer *x;
  for (x = l->head; x; x = x->next)
    if (x->id == id) return x;
  return NULL;
}

static int room(ctl *c) {
  return c->queued.head && (c->max_active == 0 || c->active.n < c->max_active);
}

/* Hand queued transfers to libcurl, no more than max_active at once, and
 * at most `most`. Starting a transfer (connecting, sending the request,
 * often reading a short answer) is the costliest thing a step does, and
 * libcurl starts every handle added since the last call in one go: a step
 * with a budget admits a few, so it stays short however many requests the
 * tasks queue at once. */
static void admit(ctl *c, int most) {
  int k;
  for (k = 0; k < most && room(c); k++) {
    xfer *x = c->queued.head;
    unlink_from(&c->queued, x);
    if (curl_multi_add_handle(c->multi, x->easy) != CURLM_OK) {
      lb_xfer_finish(x, CURLE_OUT_OF_MEMORY);
      push(&c->done, x);
    } else {
      lb_xfer_started(x);
      push(&c->active, x);
    }
  }
}

/* A transfer that moved no byte for its stall time fails (libcurl's own
 * low-speed check counts whole seconds only). With act = 0, only the
 * earliest time one is due (ms, monotonic; <0: none). */
static double stalls(ctl *c, int act) {
  double now = lb_now_ms(), next = -1;
  xfer *x, *nx;
  for (x = c->active.head; x; x = nx) {
    double due = x->last_io + x->stall_ms;
    nx = x->next;
#if LIBCURL_VERSION_NUM >= 0x075000
    if (x->stall_ms <= 0 || x->requests == 0) continue;   /* still waiting for a connection */
#else
    if (x->stall_ms <= 0) continue;
#endif
    if (act && now >= due) {
      curl_multi_remove_handle(c->multi, x->easy);
      unlink_from(&c->active, x);
      lb_xfer_fail(x, FAIL_STALLED, "no data moved for %.3g s (stall_timeout)", x->stall_ms / 1e3);
      lb_xfer_finish(x, CURLE_OPERATION_TIMEDOUT);
      push(&c->done, x);
    } else if (next < 0 || due < next) {
      next = due;
    }
  }
  return next;
}

/* ms, monotonic, when a step is next needed for timers; <0: never */
static double next_due(ctl *c) {
  double s = stalls(c, 0);
  if (c->deadline >= 0 && (s < 0 || c->deadline < s)) return c->deadline;
  return s;
}

static void collect(ctl *c) {
  CURLMsg *m;
  int left;
  while ((m = curl_multi_info_read(c->multi, &left))) {
    xfer *x = NULL;
    CURLcode result;
    if (m->msg != CURLMSG_DONE) continue;
    result = m->data.result;
    curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&x);
#if LIBCURL_VERSION_NUM >= 0x073200
    if (c->max_active && c->max_active == c->max_conns) {
      long v = 0;
      curl_easy_getinfo(m->easy_handle, CURLINFO_HTTP_VERSION, &v);
      if (v == CURL_HTTP_VERSION_2_0) c->max_active = c->max_conns * c->max_streams;  /* streams share */
    }
#endif
    curl_multi_remove_handle(c->multi, m->easy_handle);
    unlink_from(&c->active, x);
    lb_xfer_finish(x, result);
    push(&c->done, x);
  }
}

/* ------------------------------------------------------------ methods */

/* new{max_connections = 16, max_streams = 100}: at most max_connections
 * connections; on HTTP/2 each carries up to max_streams transfers */
int lb_ctl_new(lua_State *L) {
  long maxc = 16, maxs = 100;
  ctl *c;
  if (lua_istable(L, 1)) {
    lua_getfield(L, 1, "max_connections");
    if (!lua_isnil(L, -1)) maxc = (long)luaL_checknumber(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, 1, "max_streams");
    if (!lua_isnil(L, -1)) maxs = (long)luaL_checknumber(L, -1);
    lua_pop(L, 1);
  }
  if (maxs < 1) maxs = 1;
  c = lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  c->epfd = -1;
  c->deadline = -1;
  luaL_getmetatable(L, LBATCH_CTL);
  lua_setmetatable(L, -2);
  if (!(c->multi = curl_multi_init())) {
    c->closed = 1;
    return luaL_error(L, "lbatch.core: curl_multi_init failed");
  }
#ifdef LBATCH_EPOLL
  c->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (c->epfd < 0) {
    curl_multi_cleanup(c->multi);
    c->closed = 1;
    return luaL_error(L, "lbatch.core: epoll_create1: %s", strerror(errno));
  }
  curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
  curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
  curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, on_timer);
  curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
#endif
  curl_multi_setopt(c->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
  c->max_active = c->max_conns = maxc > 0 ? (int)maxc : 0;
  c->max_streams = (int)maxs;
  if (maxc > 0) {
    curl_multi_setopt(c->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, maxc);
    curl_multi_setopt(c->multi, CURLMOPT_MAX_HOST_CONNECTIONS, maxc);
    curl_multi_setopt(c->multi, CURLMOPT_MAXCONNECTS, maxc);
  }
#if LIBCURL_VERSION_NUM >= 0x074300
  curl_multi_setopt(c->multi, CURLMOPT_MAX_CONCURRENT_STREAMS, maxs);
#endif
  return 1;
}

/* add(spec): the transfer's id, or nil, "io", message when a local file
 * (the upload or the download's target) is not usable. */
static int ctl_add(lua_State *L) {
  ctl *c = check_ctl(L);
  xfer *x = lb_xfer_new(L, 2);
  if (!x) return luaL_error(L, "lbatch.core: out of memory");
  if (x->fail) {              /* a local file failed: no request goes out */
    lua_pushnil(L);
    lua_pushstring(L, lb_fail[x->fail].name);
    lua_pushstring(L, x->failmsg);
    lb_xfer_free(x);
    return 3;
  }
  x->id = ++c->next_id;
  push(&c->queued, x);        /* libcurl gets it at the next step (admit) */
  lua_pushinteger(L, x->id);
  return 1;
}

/* step([wait_ms [, budget_ms]]): wait at most wait_ms for I/O (0: not at
 * all), run what is ready, queue finished transfers. With a budget, stop
 * handing sockets to libcurl once it is spent (one always runs): the rest
 * stay ready for the next step. Returns the number still running. */
static int ctl_step(lua_State *L) {
  ctl *c = check_ctl(L);
  double wait = luaL_optnumber(L, 2, 0), budget = luaL_optnumber(L, 3, -1);
  double start, due;
  int timeout;
  admit(c, budget >= 0 ? ADMIT : c->queued.n);
  start = lb_now_ms();
  if (c->done.head || room(c) || wait < 0) wait = 0;
  if ((due = next_due(c)) >= 0) {
    double d = due - start;
    if (d < wait) wait = d < 0 ? 0 : d;
  }
  timeout = (int)ceil(wait);
#ifdef LBATCH_EPOLL
  {
    struct epoll_event evs[MAX_EVENTS];
    int i, n = epoll_wait(c->epfd, evs, MAX_EVENTS, timeout);
    if (n > 0) start = lb_now_ms();     /* the budget counts from here */
    for (i = 0; i < n; i++) {
      int flags = 0;
      if (i > 0 && budget >= 0 && lb_now_ms() - start >= budget) break;
      if (evs[i].events & EPOLLIN) flags |= CURL_CSELECT_IN;
      if (evs[i].events & EPOLLOUT) flags |= CURL_CSELECT_OUT;
      if (evs[i].events & (EPOLLERR | EPOLLHUP)) flags |= CURL_CSELECT_ERR;
      curl_multi_socket_action(c->multi, evs[i].data.fd, flags, &c->running);
    }
    if (c->deadline >= 0 && lb_now_ms() >= c->deadline) {
      c->deadline = -1;
      curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &c->running);
    }
  }
#else
  (void)budget;
  if (timeout > 0) {
#if LIBCURL_VERSION_NUM >= 0x074200
    curl_multi_poll(c->multi, NULL, 0, timeout, NULL);
#else
    curl_multi_wait(c->multi, NULL, 0, timeout, NULL);
#endif
  }
  curl_multi_perform(c->multi, &c->running);
#endif
  collect(c);
  stalls(c, 1);
  lua_pushinteger(L, c->running);
  return 1;
}

/* done(): the next finished transfer as id, result; nil when none. */
static int ctl_done(lua_State *L) {
  ctl *c = check_ctl(L);
  xfer *x = c->done.head;
  if (!x) return 0;
  unlink_from(&c->done, x);
  lua_pushinteger(L, x->id);
  lb_xfer_push_result(L, x);
  lb_xfer_free(x);
  return 2;
}

/* cancel(id): drop a transfer wherever it is. true, or false when unknown */
static int ctl_cancel(lua_State *L) {
  ctl *c = check_ctl(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  xfer *x;
  if ((x = find(&c->active, id))) {
    curl_multi_remove_handle(c->multi, x->easy);
    unlink_from(&c->active, x);
    lb_xfer_finish(x, CURLE_ABORTED_BY_CALLBACK);
  } else if ((x = find(&c->queued, id))) {
    unlink_from(&c->queued, x);
    lb_xfer_finish(x, CURLE_ABORTED_BY_CALLBACK);
  } else if ((x = find(&c->done, id))) {
    unlink_from(&c->done, x);
  }
  if (x) lb_xfer_free(x);
  lua_pushboolean(L, x != NULL);
  return 1;
}

/* timeout(): ms until step() is next needed; 0 when results wait, -1 when
 * only socket activity (see pollfd) can bring work. */
static int ctl_timeout(lua_State *L) {
  ctl *c = check_ctl(L);
  double d;
  if (c->done.head || room(c)) {
    lua_pushinteger(L, 0);    /* results to collect, or transfers to start */
    return 1;
  }
#ifndef LBATCH_EPOLL
  if (c->active.head) { lua_pushinteger(L, 10); return 1; }  /* no descriptor: poll */
#endif
  if ((d = next_due(c)) < 0) { lua_pushinteger(L, -1); return 1; }
  d -= lb_now_ms();
  lua_pushinteger(L, d <= 0 ? 0 : (lua_Integer)ceil(d));
  return 1;
}

/* progress(id): bytes sent, bytes to send, bytes received, bytes to
 * receive (-1: not known yet); nil when the id is unknown */
static int ctl_progress(lua_State *L) {
  ctl *c = check_ctl(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  xfer *x = find(&c->active, id);
  if (!x) x = find(&c->queued, id);
  if (!x) x = find(&c->done, id);
  if (!x) return 0;
  lb_xfer_push_progress(L, x);
  return 4;
}

static int ctl_pollfd(lua_State *L) {
  ctl *c = check_ctl(L);
  if (c->epfd < 0) return 0;
  lua_pushinteger(L, c->epfd);
  return 1;
}

/* pending(): transfers not yet collected, then how many of them wait to
 * start and how many libcurl runs */
static int ctl_pending(lua_State *L) {
  ctl *c = check_ctl(L);
  lua_pushinteger(L, c->queued.n + c->active.n + c->done.n);
  lua_pushinteger(L, c->queued.n);
  lua_pushinteger(L, c->active.n);
  return 3;
}

static int ctl_close(lua_State *L) {
  ctl *c = luaL_checkudata(L, 1, LBATCH_CTL);
  xfer *x;
  if (c->closed) return 0;
  c->closed = 1;
  while ((x = c->active.head)) {
    curl_multi_remove_handle(c->multi, x->easy);
    unlink_from(&c->active, x);
    lb_xfer_finish(x, CURLE_ABORTED_BY_CALLBACK);
    lb_xfer_free(x);
  }
  while ((x = c->queued.head)) {
    unlink_from(&c->queued, x);
    lb_xfer_finish(x, CURLE_ABORTED_BY_CALLBACK);
    lb_xfer_free(x);
  }
  while ((x = c->done.head)) {
    unlink_from(&c->done, x);
    lb_xfer_free(x);
  }
  curl_multi_cleanup(c->multi);
  if (c->epfd >= 0) close(c->epfd);
  return 0;
}

const luaL_Reg lb_ctl_methods[] = {
  {"add", ctl_add}, {"step", ctl_step}, {"done", ctl_done}, {"cancel", ctl_cancel},
  {"timeout", ctl_timeout}, {"pollfd", ctl_pollfd}, {"pending", ctl_pending},
  {"progress", ctl_progress}, {"close", ctl_close}, {NULL, NULL}
};

const luaL_Reg lb_ctl_meta[] = {
  {"__gc", ctl_close},
#if LUA_VERSION_NUM >= 504
  {"__close", ctl_close},
#endif
  {NULL, NULL}
};
