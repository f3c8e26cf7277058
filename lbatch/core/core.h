/* lbatch.core: one libcurl multi handle (the controller, multi.c) and the
 * transfers it runs (xfer.c). libcurl callbacks only fill C buffers and
 * files; finished transfers wait in a queue until Lua collects them with
 * ctl:done(). Beside them: a hash map outside the Lua heap (idmap.c), the
 * JSONL indexer on it (index.c), byte scanners (scan.c, scan.h), the
 * request line encoder (enc.c), the result line scanner and core.line_at
 * (rec.c), the join's fetch in file order (fetch.c), HMAC-SHA256 and base64 (hmac.c), growable buffers (buf.c),
 * system calls (sys.c) and our own failure kinds (fail.c). core.c builds
 * the module and registers every metatable. Every non-static name starts
 * with lb_. */
#ifndef LBATCH_CORE_H
#define LBATCH_CORE_H

#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include <curl/curl.h>
#include "compat.h"

/* Every symbol of the core is hidden but luaopen_lbatch_core: here for any
 * build (the rockspec's too), and -fvisibility=hidden in the Makefile. */
#define LB_EXPORT __attribute__((visibility("default")))
LB_EXPORT int luaopen_lbatch_core(lua_State *L);
#pragma GCC visibility push(hidden)

#define LBATCH_CTL "lbatch.core.ctl"
#define LBATCH_IDMAP "lbatch.core.idmap"

/* ------------------------------------------------------------ buf.c */

typedef struct buf {
  char *p;
  size_t len, cap;
} buf;

int lb_buf_reserve(buf *b, size_t n);
int lb_buf_add(buf *b, const char *p, size_t n);
void lb_buf_free(buf *b);
/* a large block, mapped on its own (p NULL, old 0: a new one), its contents
 * kept; NULL when out of memory (p left as it was). Freed with its size. */
void *lb_big_realloc(void *p, size_t old, size_t size);
void lb_big_free(void *p, size_t size);

/* ------------------------------------------------------------ fail.c */

/* Our own failures: a transfer that libcurl would call fine (or would
 * call by a vaguer name) but lbatch does not. A result's `fail` is the
 * name; core.FAIL maps each name to the error lbatch makes of it. */
typedef enum fail_id {
  FAIL_NONE = 0,
  FAIL_IO,          /* a local file: cannot read, write, rename, not a regular file */
  FAIL_TRUNCATED,   /* a download shorter than its Content-Length */
  FAIL_TOO_LARGE,   /* an answer (body or headers) over its cap */
  FAIL_STALLED,     /* no byte moved for the stall time */
  FAIL_RESEND,      /* libcurl would send a request (and part of its body) a second time */
  FAIL_ENCODING,    /* a file sent with a Content-Encoding nobody asked for */
  FAIL_RANGE,       /* a resumed download answered with another range than the one asked */
  FAIL_COUNT
} fail_id;

typedef struct fail_info {
  const char *name;   /* the result's `fail` */
  const char *kind;   /* the error's kind */
  const char *code;   /* the error's code; NULL: none */
  int retryable;
} fail_info;

extern const fail_info lb_fail[FAIL_COUNT];
void lb_push_fail(lua_State *L);   /* core.FAIL */

/* ------------------------------------------------------------ xfer.c */

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
  lua_Integer id;
  struct xfer *prev, *next;   /* in one of the controller's lists: queued, active, done */
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
  int identity;               /* a file's bytes: an unasked Content-Encoding is refused */
  mode_t mode;                /* mode the download gets */
  curl_off_t written;         /* body bytes downloaded (to file or buffer) in this answer */
  curl_off_t resume_from;     /* a resumed download: bytes already in the temp file; 0: none */
  curl_off_t range_start, range_total;  /* the answer's Content-Range; -1: none */
  int keep_partial;           /* a cut 2xx download keeps its temp file, for a resume */
  int body_started;           /* the first byte of a 2xx body was handled */
  char *partial;              /* the temp file kept after a cut (reported, never removed here) */
  double last_io, stall_ms;   /* monotonic ms; stall_ms 0: no check */
  int requests;               /* times libcurl began sending this request */
  CURLcode result;
  fail_id fail;               /* our own failure (the first one); FAIL_NONE: none */
  char failmsg[512];
  char errbuf[CURL_ERROR_SIZE];
} xfer;

xfer *lb_xfer_new(lua_State *L, int spec);
void lb_xfer_started(xfer *x);
void lb_xfer_fail(xfer *x, fail_id kind, const char *fmt, ...);
void lb_xfer_finish(xfer *x, CURLcode result);
void lb_xfer_push_result(lua_State *L, xfer *x);
void lb_xfer_push_progress(lua_State *L, xfer *x);
void lb_xfer_free(xfer *x);

/* ------------------------------------------------------------ multi.c */

int lb_ctl_new(lua_State *L);          /* core.new */
extern const luaL_Reg lb_ctl_methods[];
extern const luaL_Reg lb_ctl_meta[];   /* __gc, __close */

/* ------------------------------------------------------------ idmap.c */

typedef struct idmap idmap;

int lb_idmap_new(lua_State *L);        /* core.idmap */
extern const luaL_Reg lb_idmap_methods[];
extern const luaL_Reg lb_idmap_meta[]; /* __gc */

idmap *lb_idmap_check(lua_State *L, int arg);
uint64_t lb_idmap_hash(const idmap *m, const char *k, size_t len);   /* m's own: each map has its seed */
/* h is lb_idmap_hash(m, k, len) */
int lb_idmap_has(const idmap *m, const char *k, size_t len, uint64_t h);
void lb_idmap_prefetch(const idmap *m, uint64_t h);
void lb_idmap_prefetch_entry(const idmap *m, uint64_t h);   /* once its slot is in the cache */
int lb_idmap_put(idmap *m, const char *k, size_t len, uint64_t h, lua_Number v);  /* 1 new, 0 kept, -1 no memory */
/* the same, with the length of the line the key is in (m:scan's; 0 not known) */
int lb_idmap_put_line(idmap *m, const char *k, size_t len, uint64_t h, lua_Number v, size_t line);
int lb_idmap_get_line(const idmap *m, const char *k, size_t len, uint64_t h, lua_Number *v, size_t *line);
int lb_idmap_remove(idmap *m, const char *k, size_t len, uint64_t h);             /* 1 when it was there */
int lb_idmap_take(idmap *m, const char *k, size_t len, lua_Number *v);           /* 1 (and *v) when it was there */
int lb_idmap_reserve(idmap *m, size_t k);   /* room for k more keys at once; 0 no memory */
size_t lb_idmap_count(const idmap *m);

/* ------------------------------------------------------------ index.c */

extern const luaL_Reg lb_index_methods[];  /* idmap:scan */

/* ------------------------------------------------------------ scan.c */

int lb_utf8_check(lua_State *L);
int lb_core_json_string(lua_State *L);

/* ------------------------------------------------------------ rec.c */

int lb_core_result(lua_State *L);     /* core.result */
int lb_line_at(lua_State *L);         /* core.line_at */
int lb_idmap_answer(lua_State *L);    /* idmap:answer, the join's step */
FILE *lb_file_of(lua_State *L, int idx);   /* a Lua file handle's FILE, NULL when closed */
/* the fields of result line s pushed as core.result returns them (3 values), or false (1) */
int lb_push_result(lua_State *L, const char *s, size_t n);
struct lb_result;
/* the fields a record may do without: bits of a `want` mask */
enum { LB_F_ID = 1, LB_F_STATUS = 2, LB_F_REQUEST_ID = 4, LB_F_MODEL = 8, LB_F_CREATED = 16, LB_F_USAGE = 32,
       LB_F_CONTENT = 64, LB_F_REASONING = 128, LB_F_EMBEDDING = 256, LB_F_ALL = 511 };
/* keys: the stack index of lb_push_keys's names (pushed once for many records), or 0 */
int lb_push_scanned(lua_State *L, const char *s, size_t n, const struct lb_result *r, int *ok, unsigned want, int keys);
int lb_push_keys(lua_State *L);   /* a record's field names pushed: the index of the first */
unsigned lb_fields_wanted(lua_State *L, int idx);   /* the mask of the names set in the table at idx */

/* ------------------------------------------------------------ fetch.c */

int lb_window_new(lua_State *L);      /* core.window, the join's fetch of a window */
int lb_answer_bytes(lua_State *L);    /* core.answer_bytes, a record's kept answer line */

/* ------------------------------------------------------------ enc.c */

enum { LB_ENC_OK = 0, LB_ENC_NO = 1, LB_ENC_NOMEM = 2 };
/* the value at idx appended to b as lua-cjson writes it; LB_ENC_NO when
 * the encoder leaves it to lua-cjson (enc.c says what) */
int lb_enc_value(lua_State *L, buf *b, int idx, int depth, const char *marker, size_t mlen);
int lb_encoder_new(lua_State *L);      /* core.encoder */
int lb_encode(lua_State *L);           /* core.encode */
void lb_encoder_register(lua_State *L);

/* ------------------------------------------------------------ sys.c */

double lb_now_ms(void);                    /* monotonic */
int lb_now(lua_State *L);
int lb_sleep(lua_State *L);
int lb_mkdir(lua_State *L);
int lb_fsync(lua_State *L);
int lb_disk_free(lua_State *L);
int lb_lock(lua_State *L);            /* core.lock */
void lb_lock_register(lua_State *L);
int lb_trap(lua_State *L);
int lb_caught(lua_State *L);
int lb_version(lua_State *L);
int lb_dumpable(lua_State *L);        /* core.dumpable */
int lb_remove_parts(lua_State *L);    /* core.remove_parts */

/* ------------------------------------------------------------ hmac.c */

int lb_hmac_sha256(lua_State *L);
int lb_equal(lua_State *L);
int lb_base64(lua_State *L);
int lb_unbase64(lua_State *L);
int lb_hex(lua_State *L);

#pragma GCC visibility pop

#endif
