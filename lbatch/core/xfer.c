/* One transfer: an easy handle built from a Lua spec table, the callbacks
 * that fill its buffers or download file, and its result for Lua.
 *
 * Two rules hold for every transfer:
 *  - libcurl never sends a body a second time on its own. It would, when a
 *    reused connection dies before any answer (it re-sends the request on a
 *    fresh one, rewinding the body). Request bodies and uploads are read
 *    through callbacks that cannot rewind once a byte has gone, so libcurl
 *    fails instead (CURLE_SEND_FAIL_REWIND) and lbatch decides what to do:
 *    `create` and `upload` look for what the first attempt made.
 *  - a download never replaces anything but a regular file: the target is
 *    checked and its temp file created before the request goes out, and
 *    the temp file is renamed over the target only when complete. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include "core.h"
#include "scan.h"

#define MAX_HEADERS (1024 * 1024)   /* a header block larger than this is refused */

void lb_xfer_fail(xfer *x, fail_id kind, const char *fmt, ...) {
  va_list ap;
  if (x->fail) return;              /* the first failure is the one to report */
  x->fail = kind;
  va_start(ap, fmt);
  vsnprintf(x->failmsg, sizeof x->failmsg, fmt, ap);
  va_end(ap);
}

/* ------------------------------------------------------------ callbacks */

static int is_2xx(xfer *x) {
  long status = 0;
  curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
  return status >= 200 && status < 300;
}

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return 0;
    }
    p += w;
    n -= (size_t)w;
  }
  return 1;
}

/* A 2xx answer to a download goes to the temp file; anything else stays in
 * memory (an error body, to be decoded), within max_body. */
/* The first byte of a 2xx answer to a resumed download: a 206 must start
 * where the temp file ends; a 200 is the whole file again, written over it. */
static int body_start(xfer *x) {
  long status = 0;
  x->body_started = 1;
  if (x->resume_from == 0) return 1;
  curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
  if (status == 206) {
    if (x->range_start == x->resume_from) return 1;
    lb_xfer_fail(x, FAIL_RANGE, "asked for the bytes from %ld, the server sent them from %ld",
              (long)x->resume_from, (long)x->range_start);
    return 0;
  }
  if (ftruncate(x->out, 0) != 0) {
    lb_xfer_fail(x, FAIL_IO, "cannot write %s: %s", x->tmp, strerror(errno));
    return 0;
  }
  x->resume_from = 0;
  x->range_total = -1;
  return 1;
}

static size_t on_write(char *p, size_t size, size_t n, void *ud) {
  xfer *x = ud;
  size_t len = size * n;
  x->last_io = lb_now_ms();
  if (x->out >= 0 && is_2xx(x)) {
    if (!x->body_started && !body_start(x)) return 0;
    if (!write_all(x->out, p, len)) {
      lb_xfer_fail(x, FAIL_IO, "cannot write %s: %s", x->tmp, strerror(errno));
      return 0;
    }
  } else {
    if (x->max_body && x->resp.len + len > x->max_body) {
      lb_xfer_fail(x, FAIL_TOO_LARGE, "the answer is larger than %lu bytes (max_response_bytes)",
                (unsigned long)x->max_body);
      return 0;
    }
    if (!lb_buf_add(&x->resp, p, len)) return 0;
  }
  x->written += (curl_off_t)len;
  return len;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
  xfer *x = ud;
  size_t len = size * n;
  x->last_io = lb_now_ms();
  if (len > 5 && memcmp(p, "HTTP/", 5) == 0) {   /* a new response */
    x->hdrs.len = 0;
    x->range_start = x->range_total = -1;
  } else if (x->resume_from > 0) {
    const char *v;
    size_t vl;
    if (lb_header_value(p, len, "content-range", &v, &vl)) {
      char tmp[96];
      long long a = -1, b = -1, total = -1;
      if (vl < sizeof tmp) {
        memcpy(tmp, v, vl);
        tmp[vl] = 0;
        if (sscanf(tmp, "bytes %lld-%lld/%lld", &a, &b, &total) == 3 && a >= 0 && b >= a && total > b) {
          x->range_start = (curl_off_t)a;
          x->range_total = (curl_off_t)total;
        }
      }
    }
  }
  if (x->hdrs.len + len > MAX_HEADERS) {
    lb_xfer_fail(x, FAIL_TOO_LARGE, "the answer's headers are larger than %d bytes", MAX_HEADERS);
    return 0;
  }
  /* a file's content is its bytes as stored: an encoding nobody asked for
   * (lbatch sends no Accept-Encoding for it) is refused, not saved */
  if (x->identity) {
    const char *v;
    size_t vl;
    if (lb_header_value(p, len, "content-encoding", &v, &vl) && !(vl == 8 && strncasecmp(v, "identity", 8) == 0)
        && is_2xx(x)) {
      lb_xfer_fail(x, FAIL_ENCODING, "the server sent the file with a Content-Encoding that was not asked for");
      return 0;
    }
  }
  return lb_buf_add(&x->hdrs, p, len) ? len : 0;
}

/* Reads a source; refuses to rewind once a byte has been read. */
static size_t on_read(char *p, size_t size, size_t n, void *ud) {
  source *s = ud;
  size_t want = size * n;
  curl_off_t left = s->size - s->pos;
  s->owner->last_io = lb_now_ms();
  if ((curl_off_t)want > left) want = (size_t)left;
  if (want == 0) return 0;
  if (s->fd < 0) {
    memcpy(p, s->mem + s->pos, want);
  } else {
    ssize_t r;
    do r = read(s->fd, p, want); while (r < 0 && errno == EINTR);
    if (r < 0) {
      lb_xfer_fail(s->owner, FAIL_IO, "cannot read the file being uploaded: %s", strerror(errno));
      return CURL_READFUNC_ABORT;
    }
    if (r == 0) {
      lb_xfer_fail(s->owner, FAIL_IO, "the file being uploaded changed: it is shorter than when the upload began");
      return CURL_READFUNC_ABORT;
    }
    want = (size_t)r;
  }
  s->pos += (curl_off_t)want;
  return want;
}

static int on_seek(void *ud, curl_off_t offset, int origin) {
  source *s = ud;
  /* libcurl rewinds every part before it sends a request: fine while
   * nothing has been read; afterwards it would be a second send */
  if (origin == SEEK_SET && offset == 0 && s->pos == 0) return CURL_SEEKFUNC_OK;
  return CURL_SEEKFUNC_CANTSEEK;
}

#if LIBCURL_VERSION_NUM >= 0x075000
/* Right before each request goes out (on a new or a reused connection).
 * The stall clock starts here: waiting for a connection (libcurl's own
 * queue, a handshake) is not a stall. A second request after body bytes
 * were read is libcurl re-sending on its own: when it did not rewind
 * (the bytes were read but never accepted by the socket), the body would
 * go out short; refuse it, and let lbatch decide. */
static int on_prereq(void *ud, char *conn_ip, char *local_ip, int conn_port, int local_port) {
  xfer *x = ud;
  (void)conn_ip; (void)local_ip; (void)conn_port; (void)local_port;
  x->last_io = lb_now_ms();
  if (++x->requests > 1 && (x->body_src.pos > 0 || x->file_src.pos > 0)) {
    lb_xfer_fail(x, FAIL_RESEND, "the connection was lost while the request was being sent; libcurl may not send it again");
    return CURL_PREREQFUNC_ABORT;
  }
  return CURL_PREREQFUNC_OK;
}
#endif

/* ------------------------------------------------------------ building */

static const char *opt_string(lua_State *L, int t, const char *k, size_t *len) {
  const char *s = NULL;
  lua_getfield(L, t, k);
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "lbatch.core: spec.%s must be a string", k);
    s = lua_tolstring(L, -1, len);
  }
  lua_pop(L, 1); /* the spec table still holds the string */
  return s;
}

static double opt_number(lua_State *L, int t, const char *k, double def) {
  double v = def;
  lua_getfield(L, t, k);
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "lbatch.core: spec.%s must be a number", k);
    v = lua_tonumber(L, -1);
    if (!(v >= 0)) luaL_error(L, "lbatch.core: spec.%s must be a number >= 0", k);
  }
  lua_pop(L, 1);
  return v;
}

static int opt_bool(lua_State *L, int t, const char *k) {
  int v;
  lua_getfield(L, t, k);
  v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* Check the spec's lists before anything is allocated: a Lua error here
 * leaks nothing. A header with CR or LF could smuggle another header in. */
static void check_list(lua_State *L, int t, const char *k) {
  size_t i, n, len;
  lua_getfield(L, t, k);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return; }
  if (!lua_istable(L, -1)) luaL_error(L, "lbatch.core: spec.%s must be a table", k);
  n = lua_rawlen(L, -1);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, (int)i);
    if (strcmp(k, "headers") == 0) {
      const char *h;
      if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "lbatch.core: spec.headers[%d] must be a string", (int)i);
      h = lua_tolstring(L, -1, &len);
      if (strlen(h) != len || strpbrk(h, "\r\n"))
        luaL_error(L, "lbatch.core: spec.headers[%d] holds a CR, LF or NUL", (int)i);
    } else {
      int part = lua_gettop(L);
      if (!lua_istable(L, -1)) luaL_error(L, "lbatch.core: spec.form[%d] must be a table", (int)i);
      if (!opt_string(L, part, "name", NULL)) luaL_error(L, "lbatch.core: spec.form[%d].name is required", (int)i);
      if (!opt_string(L, part, "value", NULL) && !opt_string(L, part, "file", NULL))
        luaL_error(L, "lbatch.core: spec.form[%d] needs a value or a file", (int)i);
      opt_string(L, part, "filename", NULL);
      opt_string(L, part, "type", NULL);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

static char *copy_str(const char *s, size_t n) {
  char *p = malloc(n + 1);
  if (p) { memcpy(p, s, n); p[n] = '\0'; }
  return p;
}

static const char *what_it_is(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISLNK(m)) return "a symbolic link";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m) || S_ISBLK(m)) return "a device";
  return "not a regular file";
}

/* An upload part from a file: regular files only, opened without
 * blocking (a FIFO would block the whole process) and checked with fstat
 * on the descriptor itself. */
static int open_upload(xfer *x, const char *path) {
  struct stat st;
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) { lb_xfer_fail(x, FAIL_IO, "cannot read %s: %s", path, strerror(errno)); return 0; }
  if (fstat(fd, &st) != 0) {
    lb_xfer_fail(x, FAIL_IO, "cannot read %s: %s", path, strerror(errno));
    close(fd);
    return 0;
  }
  if (!S_ISREG(st.st_mode)) {
    lb_xfer_fail(x, FAIL_IO, "cannot upload %s: it is %s", path, what_it_is(st.st_mode));
    close(fd);
    return 0;
  }
  x->file_src.fd = fd;
  x->file_src.size = (curl_off_t)st.st_size;
  return 1;
}

static int add_form(lua_State *L, int t, xfer *x) {
  size_t i, n;
  lua_getfield(L, t, "form");
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return 1; }
  x->mime = curl_mime_init(x->easy);
  if (!x->mime) { lua_pop(L, 1); return 0; }
  n = lua_rawlen(L, -1);
  for (i = 1; i <= n; i++) {
    curl_mimepart *part = curl_mime_addpart(x->mime);
    const char *value, *file, *name, *filename, *type;
    size_t vlen = 0;
    int p, ok = 1;
    lua_rawgeti(L, -1, (int)i);
    p = lua_gettop(L);
    name = opt_string(L, p, "name", NULL);
    value = opt_string(L, p, "value", &vlen);
    file = opt_string(L, p, "file", NULL);
    filename = opt_string(L, p, "filename", NULL);
    type = opt_string(L, p, "type", NULL);
    if (!part || curl_mime_name(part, name) != CURLE_OK) ok = 0;
    else if (file || opt_bool(L, p, "stream")) {
      /* the one streamed part: a file, or a value sent the same way */
      if (x->file_src.fd >= 0 || x->file_src.mem) ok = 0;
      else if (file) { if (!open_upload(x, file)) { lua_pop(L, 2); return 1; } }
      else {
        if (!(x->upload_mem = copy_str(value, vlen))) ok = 0;
        x->file_src.mem = x->upload_mem;
        x->file_src.size = (curl_off_t)vlen;
      }
      if (ok) ok = curl_mime_data_cb(part, x->file_src.size, on_read, on_seek, NULL, &x->file_src) == CURLE_OK;
    } else {
      ok = curl_mime_data(part, value, vlen) == CURLE_OK;
    }
    if (ok && filename) curl_mime_filename(part, filename);
    if (ok && type) curl_mime_type(part, type);
    lua_pop(L, 1);
    if (!ok) { lua_pop(L, 1); return 0; }
  }
  lua_pop(L, 1);
  return curl_easy_setopt(x->easy, CURLOPT_MIMEPOST, x->mime) == CURLE_OK;
}

static int add_headers(lua_State *L, int t, xfer *x) {
  size_t i, n;
  lua_getfield(L, t, "headers");
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return 1; }
  n = lua_rawlen(L, -1);
  for (i = 1; i <= n; i++) {
    struct curl_slist *h;
    lua_rawgeti(L, -1, (int)i);
    h = curl_slist_append(x->headers, lua_tostring(L, -1));
    lua_pop(L, 1);
    if (!h) { lua_pop(L, 1); return 0; }
    x->headers = h;
  }
  lua_pop(L, 1);
  return curl_easy_setopt(x->easy, CURLOPT_HTTPHEADER, x->headers) == CURLE_OK;
}

/* The target must be a regular file or nothing; its temp file is made
 * now, beside it, so a directory that is missing or not writable fails
 * before any request goes out. */
/* A temp file an earlier attempt kept (`resume`), if it is one: named
 * path.part-XXXXXX, a regular file and not a link; opened to append. */
static int open_resume(xfer *x, const char *path, size_t pl, const char *resume) {
  struct stat st;
  int fd;
  if (strlen(resume) != pl + 12 || memcmp(resume, path, pl) != 0 || memcmp(resume + pl, ".part-", 6) != 0) return 0;
  fd = open(resume, O_WRONLY | O_APPEND | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return 0;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || !(x->tmp = copy_str(resume, pl + 12))) {
    close(fd);
    return 0;
  }
  x->out = fd;
  x->resume_from = (curl_off_t)st.st_size;
  return 1;
}

static int open_download(xfer *x, const char *path, const char *resume) {
  struct stat st;
  size_t pl = strlen(path);
  if (lstat(path, &st) == 0) {
    if (!S_ISREG(st.st_mode)) {
      lb_xfer_fail(x, FAIL_IO, "cannot download to %s: it is %s", path, what_it_is(st.st_mode));
      return 0;
    }
    x->mode = st.st_mode & 07777;
  } else if (errno != ENOENT) {
    lb_xfer_fail(x, FAIL_IO, "cannot download to %s: %s", path, strerror(errno));
    return 0;
  } else {
    mode_t um = umask(0);
    umask(um);
    x->mode = 0666 & ~um;
  }
  if (!(x->path = copy_str(path, pl))) {
    lb_xfer_fail(x, FAIL_IO, "out of memory");
    return 0;
  }
  if (resume && open_resume(x, path, pl, resume)) return 1;
  if (!(x->tmp = malloc(pl + 16))) {
    lb_xfer_fail(x, FAIL_IO, "out of memory");
    return 0;
  }
  memcpy(x->tmp, path, pl);
  memcpy(x->tmp + pl, ".part-XXXXXX", 13);
  x->out = mkostemp(x->tmp, O_CLOEXEC);
  if (x->out < 0) {
    lb_xfer_fail(x, FAIL_IO, "cannot create %s: %s", x->tmp, strerror(errno));
    free(x->tmp);
    x->tmp = NULL;
    return 0;
  }
  return 1;
}

/* a transfer's spec as read from its Lua table (the strings stay the
 * table's: valid while it is) */
typedef struct xspec {
  const char *url, *method, *body, *upload, *download, *resume, *cainfo, *capath, *proxy, *noproxy;
  size_t body_len;
  double timeout, connect_timeout, stall, max_body;
  int identity, keep_partial;
} xspec;

/* the spec table at index spec read into s; raises when a field has the
 * wrong type or url is missing (a programming error) */
static void read_spec(lua_State *L, int spec, xspec *s) {
  luaL_checktype(L, spec, LUA_TTABLE);
  s->body_len = 0;
  s->url = opt_string(L, spec, "url", NULL);
  if (!s->url) luaL_error(L, "lbatch.core: spec.url is required");
  s->method = opt_string(L, spec, "method", NULL);
  s->body = opt_string(L, spec, "body", &s->body_len);
  s->upload = opt_string(L, spec, "upload", NULL);
  s->download = opt_string(L, spec, "download", NULL);
  s->resume = opt_string(L, spec, "resume", NULL);
  s->cainfo = opt_string(L, spec, "cainfo", NULL);
  s->capath = opt_string(L, spec, "capath", NULL);
  s->proxy = opt_string(L, spec, "proxy", NULL);
  s->noproxy = opt_string(L, spec, "noproxy", NULL);
  s->timeout = opt_number(L, spec, "timeout", 0);
  s->connect_timeout = opt_number(L, spec, "connect_timeout", 0);
  s->stall = opt_number(L, spec, "stall", 0);
  s->max_body = opt_number(L, spec, "max_body", 0);
  s->identity = opt_bool(L, spec, "identity");
  s->keep_partial = opt_bool(L, spec, "keep_partial");
  check_list(L, spec, "headers");
  check_list(L, spec, "form");
}

/* the curl handle's url, callbacks, TLS, HTTP version, buffers, proxy and
 * timeouts */
static void configure(CURL *e, xfer *x, const xspec *s) {
  curl_easy_setopt(e, CURLOPT_URL, s->url);
  curl_easy_setopt(e, CURLOPT_PRIVATE, x);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->errbuf);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
  curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
#if LIBCURL_VERSION_NUM >= 0x075000
  curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, on_prereq);
  curl_easy_setopt(e, CURLOPT_PREREQDATA, x);
#endif
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
  curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
  /* wait for a connection that may multiplex only where one can (HTTP/2
   * over TLS): on cleartext HTTP/1.1 it would queue every transfer behind
   * a busy connection, however stalled */
  if (strncasecmp(s->url, "https://", 8) == 0) curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
  curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 256L * 1024);
#if LIBCURL_VERSION_NUM >= 0x073e00
  curl_easy_setopt(e, CURLOPT_UPLOAD_BUFFERSIZE, 512L * 1024);
#endif
  if (!s->identity) curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
  if (s->cainfo) curl_easy_setopt(e, CURLOPT_CAINFO, s->cainfo);
  if (s->capath) curl_easy_setopt(e, CURLOPT_CAPATH, s->capath);
  if (s->proxy) curl_easy_setopt(e, CURLOPT_PROXY, s->proxy);
  if (s->noproxy) curl_easy_setopt(e, CURLOPT_NOPROXY, s->noproxy);
  if (s->timeout > 0) curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)s->timeout);
  if (s->connect_timeout > 0) curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)s->connect_timeout);
}

/* the body from memory (spec.body, copied) or from a file (spec.upload: a
 * presigned URL's PUT, read as a form's file part is, through the callback
 * that never rewinds a byte sent): 1; 0 out of memory. A file that cannot
 * be opened sets x->fail. */
static int set_body(CURL *e, xfer *x, const xspec *s) {
  if (s->body && s->body_len > 0) {
    if (!(x->body = copy_str(s->body, s->body_len))) return 0;
    x->body_src.mem = x->body;
    x->body_src.size = (curl_off_t)s->body_len;
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)s->body_len);
    curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
    curl_easy_setopt(e, CURLOPT_READDATA, &x->body_src);
    curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, on_seek);   /* rewinds only what was never read */
    curl_easy_setopt(e, CURLOPT_SEEKDATA, &x->body_src);
  }
  if (s->upload) {
    if (!open_upload(x, s->upload)) return 1;
    curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, x->file_src.size);
    curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
    curl_easy_setopt(e, CURLOPT_READDATA, &x->file_src);
    curl_easy_setopt(e, CURLOPT_SEEKFUNCTION, on_seek);
    curl_easy_setopt(e, CURLOPT_SEEKDATA, &x->file_src);
  }
  return 1;
}

/* the request's method: GET, a POST with no body (an empty one), or any
 * other by name (POST with a body is libcurl's own choice) */
static void set_method(CURL *e, xfer *x, const char *method) {
  if (method && strcmp(method, "GET") == 0) curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
  else if (method && strcmp(method, "POST") == 0 && !x->body && !x->mime) {
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, 0L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, "");
  } else if (method && strcmp(method, "POST") != 0) {
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
  }
}

/* spec = { url, method = "GET"|"POST"|"DELETE"|..., headers = {"K: V"},
 *          body = string, form = {{name, value | file, filename, type, stream}},
 *          upload = path (the file is the whole body: a PUT, streamed),
 *          download = path, resume = the temp file a cut attempt kept
 *          (appended to; the caller sends its Range), keep_partial = true
 *          (a cut 2xx download keeps its temp file: result.partial),
 *          timeout, connect_timeout (ms), stall (ms: fail
 *          when no byte moves for that long), max_body (bytes kept in
 *          memory), identity = true (the file's bytes: no Accept-Encoding,
 *          and an encoding the server applies anyway is refused),
 *          cainfo, capath, proxy, noproxy }
 * Returns the transfer; when x->fail is set, it failed before any
 * request (a local file) and must be freed. NULL: out of memory. */
xfer *lb_xfer_new(lua_State *L, int spec) {
  xspec s;
  xfer *x;
  CURL *e;

  read_spec(L, spec, &s);
  x = calloc(1, sizeof *x);
  if (!x) return NULL;
  x->out = -1;
  x->range_start = x->range_total = -1;
  x->keep_partial = s.keep_partial;
  x->body_src.fd = x->file_src.fd = -1;
  x->body_src.owner = x->file_src.owner = x;
  x->stall_ms = s.stall;
  x->identity = s.identity;
  x->max_body = (size_t)s.max_body;
  x->easy = e = curl_easy_init();
  if (!e) { free(x); return NULL; }
  if (s.download && !open_download(x, s.download, s.resume)) return x;
  configure(e, x, &s);
  if (!set_body(e, x, &s)) goto fail;
  if (x->fail) return x;
  if (!s.upload && !add_form(L, spec, x)) goto fail;
  if (x->fail) return x;
  if (!add_headers(L, spec, x)) goto fail;
  set_method(e, x, s.method);
  return x;
fail:
  lb_xfer_free(x);
  return NULL;
}

/* handed to libcurl: the stall clock starts (again when the request
 * goes out, on libcurl 7.80 and later: on_prereq) */
void lb_xfer_started(xfer *x) {
  x->last_io = lb_now_ms();
}

/* ------------------------------------------------------------ results */

/* the bytes of the file in the temp file */
static curl_off_t file_bytes(const xfer *x) {
  return x->resume_from + (x->body_started ? x->written : 0);
}

/* Close the download: renamed over its path only when complete, and only
 * over a regular file (or nothing), keeping that file's mode. */
static void finish_download(xfer *x, CURLcode result) {
  struct stat st;
  curl_off_t cl = -1;
  int ok = result == CURLE_OK && !x->fail && is_2xx(x);
  if (ok) {
    curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
    if (cl >= 0 && cl != x->written) {
      lb_xfer_fail(x, FAIL_TRUNCATED, "the download is %ld bytes, shorter than its Content-Length %ld",
                (long)x->written, (long)cl);
    } else if (x->range_total >= 0 && x->resume_from + x->written != x->range_total) {
      lb_xfer_fail(x, FAIL_TRUNCATED, "the download is %ld bytes, not the %ld its Content-Range says",
                (long)(x->resume_from + x->written), (long)x->range_total);
    } else if (fchmod(x->out, x->mode) != 0 || close(x->out) != 0) {
      x->out = -1;
      lb_xfer_fail(x, FAIL_IO, "cannot write %s: %s", x->tmp, strerror(errno));
    } else {
      x->out = -1;
      if (lstat(x->path, &st) == 0 && !S_ISREG(st.st_mode))
        lb_xfer_fail(x, FAIL_IO, "cannot download to %s: it is %s", x->path, what_it_is(st.st_mode));
      else if (rename(x->tmp, x->path) != 0)
        lb_xfer_fail(x, FAIL_IO, "cannot rename %s to %s: %s", x->tmp, x->path, strerror(errno));
      else { free(x->tmp); x->tmp = NULL; }
    }
  }
  if (x->out >= 0) { close(x->out); x->out = -1; }
  /* cut with bytes of the file on disk: kept, when asked, for the next
   * attempt to resume (an answer that is not 2xx adds nothing to it) */
  if (x->tmp && x->keep_partial && file_bytes(x) > 0
      && (x->fail == FAIL_NONE || x->fail == FAIL_TRUNCATED || x->fail == FAIL_STALLED)) {
    x->partial = x->tmp;
    x->tmp = NULL;
  }
  if (x->tmp) { unlink(x->tmp); free(x->tmp); x->tmp = NULL; }
}

void lb_xfer_finish(xfer *x, CURLcode result) {
  x->result = result;
  if (x->path) finish_download(x, result);
}

static void set_str(lua_State *L, const char *k, const char *s, size_t n) {
  lua_pushlstring(L, s, n);
  lua_setfield(L, -2, k);
}

static void set_num(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

static void set_int(lua_State *L, const char *k, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, k);
}

/* { status, body, headers, code (curl), error, fail (our own failure's
 *   kind), path, bytes, sent (upload bytes), received (body bytes), time,
 *   version (HTTP: 1, 2), connect_code } */
void lb_xfer_push_result(lua_State *L, xfer *x) {
  long status = 0, version = 0, connect = 0;
  double t = 0;
  curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(x->easy, CURLINFO_TOTAL_TIME, &t);
  curl_easy_getinfo(x->easy, CURLINFO_HTTP_CONNECTCODE, &connect);
#if LIBCURL_VERSION_NUM >= 0x073200
  curl_easy_getinfo(x->easy, CURLINFO_HTTP_VERSION, &version);
#endif
  lua_createtable(L, 0, 12);
  set_int(L, "status", (lua_Integer)status);
  set_num(L, "time", t);
  set_int(L, "code", (lua_Integer)x->result);
  set_int(L, "sent", (lua_Integer)x->file_src.pos);
  set_int(L, "received", (lua_Integer)x->written);
  set_int(L, "version", version == CURL_HTTP_VERSION_2_0 ? 2 : version == CURL_HTTP_VERSION_1_0 ? 1 : version ? 1 : 0);
  if (connect) set_int(L, "connect_code", (lua_Integer)connect);
  if (x->resp.len || !x->path) set_str(L, "body", x->resp.p ? x->resp.p : "", x->resp.len);
  set_str(L, "headers", x->hdrs.p ? x->hdrs.p : "", x->hdrs.len);
  if (x->fail) {
    set_str(L, "fail", lb_fail[x->fail].name, strlen(lb_fail[x->fail].name));
    set_str(L, "error", x->failmsg, strlen(x->failmsg));
  } else if (x->result != CURLE_OK) {
    const char *msg = x->errbuf[0] ? x->errbuf : curl_easy_strerror(x->result);
    set_str(L, "error", msg, strlen(msg));
  }
  if (x->path && x->result == CURLE_OK && !x->fail && status >= 200 && status < 300) {
    set_str(L, "path", x->path, strlen(x->path));
    set_int(L, "bytes", (lua_Integer)file_bytes(x));
  }
  if (x->partial) {
    set_str(L, "partial", x->partial, strlen(x->partial));
    set_int(L, "partial_bytes", (lua_Integer)file_bytes(x));
  }
  if (x->resume_from > 0) set_int(L, "resumed_from", (lua_Integer)x->resume_from);
}

/* up_done, up_total, down_done, down_total (-1: not known yet) */
void lb_xfer_push_progress(lua_State *L, xfer *x) {
  curl_off_t cl = -1;
  if (x->easy) curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
  lua_pushinteger(L, (lua_Integer)x->file_src.pos);
  lua_pushinteger(L, (lua_Integer)(x->file_src.fd >= 0 || x->file_src.mem ? x->file_src.size : -1));
  lua_pushinteger(L, (lua_Integer)x->written);
  lua_pushinteger(L, (lua_Integer)cl);
}

void lb_xfer_free(xfer *x) {
  if (x->out >= 0) close(x->out);
  if (x->tmp) { unlink(x->tmp); free(x->tmp); }
  if (x->easy) curl_easy_cleanup(x->easy);
  if (x->mime) curl_mime_free(x->mime);
  if (x->file_src.fd >= 0) close(x->file_src.fd);
  curl_slist_free_all(x->headers);
  free(x->body);
  free(x->upload_mem);
  free(x->path);
  free(x->partial);
  lb_buf_free(&x->resp);
  lb_buf_free(&x->hdrs);
  free(x);
}
