/* lbatch.core: one libcurl multi handle (the controller) and the transfers
 * it runs. libcurl callbacks only fill C buffers and files; finished
 * transfers wait in a queue until Lua collects them with ctl:done(). */
#ifndef LBATCH_CORE_H
#define LBATCH_CORE_H

#include <stdio.h>
#include <sys/types.h>
#include <curl/curl.h>
#include "compat.h"

#define LBATCH_CTL "lbatch.core.ctl"

typedef struct buf {
  char *p;
  size_t len, cap;
} buf;

struct ctl;
struct xfer;

/* An upload source: a regular file read through our own callbacks (so
 * libcurl can never rewind it and send it a second time on its own), or
 * bytes in memory (a JSON body, an upload made in memory). */
typedef struct source {
  struct xfer *owner;
  int fd;                     /* -1: from memory */
  const char *mem;            /* memory source (owned by the xfer) */
  curl_off_t size, pos;
} source;

typedef struct xfer {
  CURL *easy;
  struct ctl *ctl;
  lua_Integer id;
  struct xfer *prev, *next;   /* in one of ctl's lists: queued, active, done */
  struct curl_slist *headers;
  curl_mime *mime;
  char *body;                 /* request body (copied) */
  source body_src, file_src;  /* the JSON body; a file or memory upload part */
  char *upload_mem;           /* an in-memory upload part (copied) */
  buf resp;                   /* response body when it is not downloaded */
  buf hdrs;                   /* header block of the last response */
  size_t max_body;            /* cap on resp (and hdrs); 0: none */
  char *path, *tmp;           /* download: final path and temp file beside it */
  int out;                    /* temp file descriptor, -1 when none */
  int had_target;             /* the path existed (a regular file) */
  int identity;               /* a file's bytes: an unasked Content-Encoding is refused */
  mode_t mode;                /* mode the download gets */
  curl_off_t written;         /* body bytes downloaded (to file or buffer) */
  double started, last_io, stall_ms;  /* monotonic ms; stall_ms 0: no check */
  int requests;               /* times libcurl began sending this request */
  CURLcode result;
  const char *fail;           /* our own failure: io, truncated, too_large, stalled, encoding */
  char failmsg[512];
  char errbuf[CURL_ERROR_SIZE];
} xfer;

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

/* util.c */
double lb_now_ms(void);
int buf_add(buf *b, const char *p, size_t n);
void buf_free(buf *b);

/* idmap.c */
int lbatch_idmap_new(lua_State *L);

/* scan.c */
int lbatch_utf8_check(lua_State *L);
int lbatch_json_string(lua_State *L);

/* xfer.c */
xfer *xfer_new(lua_State *L, ctl *c, int spec);
void xfer_started(xfer *x);
void xfer_fail(xfer *x, const char *kind, const char *fmt, ...);
void xfer_finish(xfer *x, CURLcode result);
void xfer_push_result(lua_State *L, xfer *x);
void xfer_push_progress(lua_State *L, xfer *x);
void xfer_free(xfer *x);

#endif
