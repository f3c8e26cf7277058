/* One transfer: an easy handle built from a Lua spec table, the callbacks
 * that fill its buffers or download file, and its result for Lua. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include "core.h"

/* ------------------------------------------------------------ callbacks */

static int is_2xx(xfer *x) {
  long status = 0;
  curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
  return status >= 200 && status < 300;
}

/* A download goes to a temp file beside its path, but only for a 2xx
 * response: an error body is kept in memory to be decoded. */
static size_t on_write(char *p, size_t size, size_t n, void *ud) {
  xfer *x = ud;
  size_t len = size * n;
  if (x->path && (x->out || is_2xx(x))) {
    if (!x->out) {
      size_t pl = strlen(x->path);
      int fd;
      x->tmp = malloc(pl + 16);
      if (!x->tmp) return 0;
      memcpy(x->tmp, x->path, pl);
      memcpy(x->tmp + pl, ".part-XXXXXX", 13);
      fd = mkstemp(x->tmp);
      if (fd < 0 || !(x->out = fdopen(fd, "wb"))) {
        if (fd >= 0) { close(fd); unlink(x->tmp); }
        free(x->tmp);
        x->tmp = NULL;
        x->fail = "cannot create the download file";
        return 0;
      }
    }
    if (fwrite(p, 1, len, x->out) != len) {
      x->fail = "cannot write the download file";
      return 0;
    }
    x->written += (curl_off_t)len;
    return len;
  }
  return buf_add(&x->resp, p, len) ? len : 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
  xfer *x = ud;
  size_t len = size * n;
  if (len > 5 && memcmp(p, "HTTP/", 5) == 0) x->hdrs.len = 0; /* a new response */
  return buf_add(&x->hdrs, p, len) ? len : 0;
}

/* ------------------------------------------------------------ building */

static const char *opt_string(lua_State *L, int t, const char *k, size_t *len) {
  const char *s = NULL;
  lua_getfield(L, t, k);
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "spec.%s must be a string", k);
    s = lua_tolstring(L, -1, len);
  }
  lua_pop(L, 1); /* the spec table still holds the string */
  return s;
}

static long opt_long(lua_State *L, int t, const char *k, long def) {
  long v = def;
  lua_getfield(L, t, k);
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "spec.%s must be a number", k);
    v = (long)lua_tonumber(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

/* Check the spec's shape before anything is allocated: a Lua error here
 * leaks nothing. */
static void check_list(lua_State *L, int t, const char *k) {
  size_t i, n;
  lua_getfield(L, t, k);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return; }
  luaL_argcheck(L, lua_istable(L, -1), t, "spec list must be a table");
  n = lua_rawlen(L, -1);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, (int)i);
    if (strcmp(k, "headers") == 0) {
      if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "spec.headers[%d] must be a string", (int)i);
    } else {
      int part = lua_gettop(L);
      if (!lua_istable(L, -1)) luaL_error(L, "spec.form[%d] must be a table", (int)i);
      if (!opt_string(L, part, "name", NULL)) luaL_error(L, "spec.form[%d].name is required", (int)i);
      if (!opt_string(L, part, "value", NULL) && !opt_string(L, part, "file", NULL))
        luaL_error(L, "spec.form[%d] needs a value or a file", (int)i);
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
    int p;
    lua_rawgeti(L, -1, (int)i);
    p = lua_gettop(L);
    name = opt_string(L, p, "name", NULL);
    value = opt_string(L, p, "value", &vlen);
    file = opt_string(L, p, "file", NULL);
    filename = opt_string(L, p, "filename", NULL);
    type = opt_string(L, p, "type", NULL);
    if (!part || curl_mime_name(part, name) != CURLE_OK) { lua_pop(L, 2); return 0; }
    if (file) curl_mime_filedata(part, file);  /* streamed from disk while sending */
    else curl_mime_data(part, value, vlen);
    if (filename) curl_mime_filename(part, filename);
    if (type) curl_mime_type(part, type);
    lua_pop(L, 1);
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

/* spec = { url, method = "GET"|"POST"|"DELETE"|..., headers = {"K: V"},
 *          body = string, form = {{name, value | file, filename, type}},
 *          download = path, timeout, connect_timeout (ms),
 *          low_speed_limit (bytes/s), low_speed_time (s), cainfo,
 *          fresh = true: a new connection. libcurl silently sends a request
 *          again when a reused connection dies before any answer; for a
 *          request that must not run twice, a fresh connection rules that out } */
xfer *xfer_new(lua_State *L, ctl *c, int spec) {
  size_t body_len = 0;
  const char *url, *method, *body, *download, *cainfo;
  long timeout, connect_timeout, low_limit, low_time;
  int fresh;
  xfer *x;
  CURL *e;

  luaL_checktype(L, spec, LUA_TTABLE);
  url = opt_string(L, spec, "url", NULL);
  if (!url) luaL_error(L, "spec.url is required");
  method = opt_string(L, spec, "method", NULL);
  body = opt_string(L, spec, "body", &body_len);
  download = opt_string(L, spec, "download", NULL);
  cainfo = opt_string(L, spec, "cainfo", NULL);
  timeout = opt_long(L, spec, "timeout", 0);
  connect_timeout = opt_long(L, spec, "connect_timeout", 0);
  low_limit = opt_long(L, spec, "low_speed_limit", 0);
  low_time = opt_long(L, spec, "low_speed_time", 0);
  check_list(L, spec, "headers");
  check_list(L, spec, "form");
  lua_getfield(L, spec, "fresh");
  fresh = lua_toboolean(L, -1);
  lua_pop(L, 1);

  x = calloc(1, sizeof *x);
  if (!x) return NULL;
  x->ctl = c;
  x->easy = e = curl_easy_init();
  if (!e) { free(x); return NULL; }
  if (download && !(x->path = copy_str(download, strlen(download)))) goto fail;

  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_PRIVATE, x);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->errbuf);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
  curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
  curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
  curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
  curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
  curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 256L * 1024);
#if LIBCURL_VERSION_NUM >= 0x073e00
  curl_easy_setopt(e, CURLOPT_UPLOAD_BUFFERSIZE, 512L * 1024);
#endif
  /* downloads are checked against Content-Length: no transfer encoding */
  if (!download) curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
  if (cainfo) curl_easy_setopt(e, CURLOPT_CAINFO, cainfo);
  if (fresh) curl_easy_setopt(e, CURLOPT_FRESH_CONNECT, 1L);
  if (timeout > 0) curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout);
  if (connect_timeout > 0) curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, connect_timeout);
  if (low_limit > 0 && low_time > 0) {
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, low_limit);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, low_time);
  }
  if (body) {
    if (!(x->body = copy_str(body, body_len))) goto fail;
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, x->body);
  }
  if (!add_form(L, spec, x) || !add_headers(L, spec, x)) goto fail;
  if (method && strcmp(method, "GET") == 0) curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
  else if (method && strcmp(method, "POST") == 0 && !body && !x->mime) {
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, 0L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, "");
  } else if (method && strcmp(method, "POST") != 0) {
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
  }
  return x;
fail:
  xfer_free(x);
  return NULL;
}

/* ------------------------------------------------------------ results */

/* Close the download: renamed to its path only when complete. */
void xfer_finish(xfer *x, CURLcode result) {
  x->result = result;
  if (!x->path) return;
  if (result == CURLE_OK && !x->fail && is_2xx(x)) {
    curl_off_t cl = -1;
    curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
    if (!x->out) {  /* an empty body never reached on_write */
      FILE *f = fopen(x->path, "wb");
      if (!f || fclose(f) != 0) x->fail = "cannot create the download file";
      return;
    }
    if (cl >= 0 && cl != x->written) x->fail = "download is shorter than its Content-Length";
    else if (fclose(x->out) != 0) x->fail = "cannot write the download file";
    else if (rename(x->tmp, x->path) != 0) x->fail = "cannot rename the download file";
    x->out = NULL;
    if (!x->fail) { free(x->tmp); x->tmp = NULL; }
  }
  if (x->out) { fclose(x->out); x->out = NULL; }
  if (x->tmp) { unlink(x->tmp); free(x->tmp); x->tmp = NULL; }
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

/* { status, body, headers, code (curl), error, path, bytes, time } */
void xfer_push_result(lua_State *L, xfer *x) {
  long status = 0;
  double t = 0;
  curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(x->easy, CURLINFO_TOTAL_TIME, &t);
  lua_createtable(L, 0, 8);
  set_int(L, "status", (lua_Integer)status);
  set_num(L, "time", t);
  set_int(L, "code", (lua_Integer)x->result);
  if (x->resp.len || !x->path) set_str(L, "body", x->resp.p ? x->resp.p : "", x->resp.len);
  set_str(L, "headers", x->hdrs.p ? x->hdrs.p : "", x->hdrs.len);
  if (x->result != CURLE_OK) {
    const char *msg = x->errbuf[0] ? x->errbuf : curl_easy_strerror(x->result);
    set_str(L, "error", msg, strlen(msg));
  } else if (x->fail) {
    set_str(L, "error", x->fail, strlen(x->fail));
    set_str(L, "fail", "download", 8);
  }
  if (x->path && x->result == CURLE_OK && !x->fail && status >= 200 && status < 300) {
    set_str(L, "path", x->path, strlen(x->path));
    set_int(L, "bytes", (lua_Integer)x->written);
  }
}

void xfer_free(xfer *x) {
  if (x->out) fclose(x->out);
  if (x->tmp) { unlink(x->tmp); free(x->tmp); }
  if (x->easy) curl_easy_cleanup(x->easy);
  if (x->mime) curl_mime_free(x->mime);
  curl_slist_free_all(x->headers);
  free(x->body);
  free(x->path);
  buf_free(&x->resp);
  buf_free(&x->hdrs);
  free(x);
}
