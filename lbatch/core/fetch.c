/* The join's fetch for a window of input lines, in file order.
 *
 *   local w = core.window()
 *   w:read(fh, pos, stop, max_lines, max_bytes, max_line) -> the window's
 *                input lines (below, at w_read)
 *   w:fill(found, from, to, handles, sizes) -> the last input handled
 *   w:records(from, to, lazy, out, asks[, want]) -> the records of inputs
 *                from..to, made whole in C, 256 a call (false for one the
 *                caller takes: below, at w_records)
 *   w:take(i) -> input i's answer line and core.result's values for it;
 *                the line alone when the caller must decode it to tell it
 *                is the request's answer; false (no answer: missing); or a
 *                number (its index value: an answer whose id the caller
 *                indexed, its length not known, for the caller to read)
 *   w:text(i) -> input line i
 *   w:file(i) -> the number of the result file input i's answer came from
 *   w:free()  its memory freed now (the collector sees only the userdata;
 *             a join of many groups frees each window as its group ends)
 *
 * fill takes each input line's custom_id (lines from..to of the window, in
 * input order, so that a duplicate request is missing as it is one line at
 * a time) from the index `found` (values fileno * 2^36 + offset, and each
 * line's length, as m:scan puts them), gives each answer its place in an
 * arena in input order (the records are made reading it front to back),
 * then reads the answers in file order (sorted by file and offset), with
 * one large pread for answers that lie close together, instead of one
 * pread each in a shuffled order (docs/benchmarks.md has the figures),
 * each into its place. The arena is reused window after window, and holds
 * at most OUT_BUDGET bytes: fill stops before the answer past it. Lua
 * values are made only when a record is made (many similar long strings
 * alive at once make LuaJIT's interning slow). An answer line is scanned
 * once after it is indexed, when its record is made: its custom_id is
 * checked in that pass (same_id); one that is not the request's any more
 * (the file changed since it was indexed) goes to the caller, which
 * decodes it and finds an error, never another request's record; an
 * answer that is not there (the file shrank: smaller than sizes[fileno],
 * its size when it was indexed) or not of its indexed length is fill's
 * error.
 *
 * fill returns the last input handled: `to`, or less when the arena is
 * full or the next text is not a string or has an id that needs decoding
 * (the caller joins that line its own way, then fills again from the one
 * after it). Or nil, the reason and the file number when an answer cannot
 * be read. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include "core.h"
#include "scan.h"

#define FILE_SPAN 68719476736.0    /* 2^36, as index.c */
#define READ_MAX (256u << 10)      /* one pread covers answers this close together */
#define GAP_MAX (4u << 10)         /* a gap worth reading through rather than a pread more */
#define TAIL_MIN 512               /* room for the last answer of a read: twice the mean */
#define TAIL_MAX 8192              /* answer's length so far, within these */
#define OUT_BUDGET (32u << 20)     /* answer bytes a window holds: the window ends before more */
#define PREFETCH 16

#define LBATCH_WINDOW "lbatch.core.window"
#define LBATCH_LINE "lbatch.core.line"       /* a record's kept answer line (core.answer_bytes reads only these) */

enum { E_MISSING, E_LINE, E_LATER };
typedef struct entry {
  int kind;
  int file;                        /* E_LINE: the result file's number */
  size_t at, len;                  /* E_LINE: the line in the arena */
  size_t id, idlen;                /* E_LINE: the request's custom_id in the window's input block */
  double v;                        /* E_LATER: the index value */
} entry;

/* the window: inputs from..to, their answers' lines in one arena, in input
 * order (reused window after window: Lua strings are made one at a time,
 * when taken) */
typedef struct window {
  int from, to;
  entry *e;
  size_t ecap;
  char *arena;
  size_t used, cap;
  struct want *w, *w2;             /* fill's list of answers to read, and the sort's room (one block) */
  size_t wcap;
  char *blk;                       /* fill's read block */
  size_t bcap;
  char *in;                        /* read's block of input lines */
  size_t icap;
  struct tline { size_t at, len; } *t;   /* the lines in it, from 1 */
  size_t tcap;
  int n;                           /* lines read */
} window;

typedef struct want {
  uint64_t key;                    /* the index value (file and offset), as an integer: the sort's */
  uint64_t h;                      /* the id's hash */
  off_t off;
  int file;
  int i;                           /* the input's place in texts */
  const char *id;                  /* the request's custom_id (in the window's input block) */
  size_t idlen;
  size_t len, at;                  /* the answer's length (as indexed) and its place in the arena */
} want;

/* a read block: the bytes of one file from `start` (its memory the
 * window's, reused) */
typedef struct blk {
  window *win;
  int fd, eof;
  size_t len, tail;                /* tail: what a read takes past its last answer */
  off_t start;
} blk;

/* the wants w[0..k) in file order (file, then offset: the index value),
 * through tmp (room for k): a radix sort, eleven bits a pass, skipping
 * the passes whose digit every value shares (the file number, the
 * offsets' high bits), and no allocation a window (qsort made one) */
static void sort_wants(want *w, want *tmp, size_t k) {
  size_t count[2048], j, shift;
  uint64_t differ = 0;                   /* the bits where some value differs from the first */
  want *src = w, *dst = tmp, *t;
  for (j = 1; j < k; j++) differ |= w[j].key ^ w[0].key;
  for (shift = 0; shift < 64; shift += 11) {
    size_t sum = 0;
    if (((differ >> shift) & 2047) == 0) continue;
    memset(count, 0, sizeof count);
    for (j = 0; j < k; j++) count[(src[j].key >> shift) & 2047]++;
    for (j = 0; j < 2048; j++) { size_t c = count[j]; count[j] = sum; sum += c; }
    for (j = 0; j < k; j++) dst[count[(src[j].key >> shift) & 2047]++] = src[j];
    t = src; src = dst; dst = t;
  }
  if (src != w) memcpy(w, src, k * sizeof *w);
}

/* read up to size bytes of the file at off into the block; -1 (errno),
 * -2 out of memory */
static int fill(blk *b, off_t off, size_t size) {
  size_t got = 0;
  window *win = b->win;
  if (size > win->bcap) {
    char *q = lb_big_realloc(win->blk, win->bcap, size);
    if (!q) return -2;
    win->blk = q;
    win->bcap = size;
  }
  b->start = off; b->len = 0; b->eof = 0;
  while (got < size) {
    ssize_t r = pread(b->fd, win->blk + got, size - got, off + (off_t)got);
    if (r < 0) { if (errno == EINTR) continue; return -1; }
    if (r == 0) { b->eof = 1; break; }
    got += (size_t)r;
  }
  b->len = got;
  return 0;
}

/* how much to read from w[j]: through the wants after it that lie within
 * GAP_MAX of each other, up to READ_MAX, and `tail` for the last one */
static size_t span_of(const want *w, size_t j, size_t k, size_t tail) {
  size_t last = j;
  while (last + 1 < k && w[last + 1].file == w[j].file && w[last + 1].off - w[last].off < GAP_MAX
         && (size_t)(w[last + 1].off - w[j].off) + tail <= READ_MAX)
    last++;
  return (size_t)(w[last].off - w[j].off) + tail;
}

/* the line at w[j].off (without its newline and a final \r) in *p, *len;
 * 1 found, 0 nothing there (the file shrank), -1 (errno), -2 out of memory */
static int line_of(blk *b, const want *w, size_t j, size_t k, const char **p, size_t *len) {
  off_t off = w[j].off;
  size_t size = 0;
  int rc;
  for (;;) {
    if (b->len && off >= b->start && off <= b->start + (off_t)b->len) {
      const char *s = b->win->blk + (off - b->start), *nl;
      size_t avail = b->len - (size_t)(off - b->start);
      nl = memchr(s, '\n', avail);
      if (nl || b->eof) {
        *p = s;
        *len = nl ? (size_t)(nl - s) : avail;
        if (*len && s[*len - 1] == '\r') --*len;
        return nl || avail;
      }
      if (off == b->start) size = b->len * 2;     /* a line longer than the read: twice as much */
    } else if (b->eof && off >= b->start + (off_t)b->len && b->start <= off) {
      return 0;
    }
    if (!size) size = span_of(w, j, k, b->tail);
    if ((rc = fill(b, off, size)) < 0) return rc;
    if (b->len == 0) return 0;
    size = 0;
  }
}

/* is the answer line s (n bytes, scanned into r) input e's? Its custom_id
 * as the scan read it, against the request's: 1 yes; 0 when it is not, or
 * when only a decode can tell (an escaped id, which the index decoded too,
 * a line the scanner leaves to lua-cjson): the caller decodes it then (the
 * line changed since it was indexed: an error, never another request's
 * record). The same pass as the record's fields: an answer is scanned once
 * after it is indexed. */
static int same_id(const window *win, const entry *e, const char *s, const lb_result *r) {
  return r->custom_id.kind == LB_J_STR && !r->custom_id.esc && r->custom_id.len == e->idlen
         && memcmp(s + r->custom_id.off, win->in + e->id, e->idlen) == 0;
}

/* entry e's answer line, scanned into r, when it is the request's
 * (same_id); NULL for any other (the caller decodes it, or has none) */
static const char *answer_of(const window *win, const entry *e, lb_result *r) {
  const char *s;
  if (e->kind != E_LINE) return NULL;
  s = win->arena + e->at;
  return lb_result_scan(s, e->len, r) && same_id(win, e, s, r) ? s : NULL;
}

/* take each input's id from the index, in input order (each slot fetched
 * into the cache PREFETCH ids ahead, its entry half as far: the misses
 * overlap), and give each answer its place in the arena, in input order:
 * the records are made reading the arena front to back. The window ends
 * before the answer that would take the arena past OUT_BUDGET (the first
 * one always fits): its ids stay in the index for the next fill. The
 * count of wants made; *last the last input handled, *used the arena's
 * bytes */
static size_t take_ids(window *win, idmap *m, int from, int to, want *w, int *last, size_t *used) {
  size_t k = 0, c = 0, j, at = 0;
  int i;
  for (i = from; i <= to; i++, c++) {                /* the ids, hashed */
    size_t n = win->t[i].len, io = 0, il = 0;
    const char *s = win->in + win->t[i].at;
    if (lb_json_string(s, n, "custom_id", 9, &io, &il) != LB_FOUND) break;
    w[c].i = i; w[c].id = s + io; w[c].idlen = il;
    w[c].h = lb_idmap_hash(m, s + io, il);
    if (c < PREFETCH) lb_idmap_prefetch(m, w[c].h);
  }
  *last = i - 1;
  for (j = 0; j < c; j++) {
    want x = w[j];
    lua_Number v;
    size_t len;
    if (j + PREFETCH < c) lb_idmap_prefetch(m, w[j + PREFETCH].h);
    if (j + PREFETCH / 2 < c) lb_idmap_prefetch_entry(m, w[j + PREFETCH / 2].h);
    if (!lb_idmap_get_line(m, x.id, x.idlen, x.h, &v, &len)) {
      win->e[x.i - from].kind = E_MISSING;
      continue;
    }
    if (len && at > 0 && at + len > OUT_BUDGET) { *last = x.i - 1; break; }   /* the next fill's */
    lb_idmap_remove(m, x.id, x.idlen, x.h);
    if (!len) {                                   /* (an id the caller put: its line's length not known) */
      win->e[x.i - from].kind = E_LATER;
      win->e[x.i - from].v = v;
      continue;
    }
    {
      double f = floor(v / FILE_SPAN);
      x.key = (uint64_t)v; x.file = (int)f; x.off = (off_t)(v - f * FILE_SPAN);
      x.len = len; x.at = at;
      at += len;
      w[k++] = x;
    }
  }
  *used = at;
  return k;
}

/* push nil, why, file number: what w:fill returns on a failure */
static int failed(lua_State *L, const char *why, int file) {
  lua_pushnil(L);
  lua_pushstring(L, why);
  lua_pushinteger(L, file);
  return 3;
}

/* is file number `file` (fd) shorter than sizes[file] (stack slot 5)? */
static int shorter(lua_State *L, int fd, int file) {
  struct stat st;
  lua_Number size;
  lua_rawgeti(L, 5, file);
  size = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return fstat(fd, &st) == 0 && (lua_Number)st.st_size < size;
}

/* read the sorted wants' lines into their places in the arena; 0, or
 * what failed pushed: an answer not there any more (the file shrank) or
 * of another length than when it was indexed (the file changed) */
static int read_all(lua_State *L, window *win, want *w, size_t k) {
  blk b = { win, -1, 0, 0, TAIL_MIN * 2, 0 };
  size_t lines = 0, bytes = 0;
  size_t j;
  int file = -1;
  for (j = 0; j < k; j++) {
    const char *p;
    size_t len;
    int rc;
    entry *e = &win->e[w[j].i - win->from];
    if (w[j].file != file) {
      FILE *f;
      file = w[j].file;
      lua_rawgeti(L, 4, file);
      f = lua_isnil(L, -1) ? NULL : lb_file_of(L, -1);
      lua_pop(L, 1);
      if (!f || (b.fd = fileno(f)) < 0) return luaL_error(L, "window: the file is closed");
      b.len = 0; b.eof = 0;
      if (shorter(L, b.fd, file)) return failed(L, "the file is shorter than when it was indexed", file);
    }
    rc = line_of(&b, w, j, k, &p, &len);
    if (rc == -2) return luaL_error(L, "window: out of memory");
    if (rc < 0) return failed(L, strerror(errno), file);
    if (rc == 0) return failed(L, "the file is shorter than when it was indexed", file);
    if (len != w[j].len) return failed(L, "the file changed since it was indexed", file);
    memcpy(win->arena + w[j].at, p, len);
    e->kind = E_LINE; e->at = w[j].at; e->len = len;
    e->file = file;
    e->id = (size_t)(w[j].id - win->in);
    e->idlen = w[j].idlen;
    lines++;
    bytes += len;
    b.tail = 2 * (bytes / lines) + 2;
    b.tail = b.tail < TAIL_MIN ? TAIL_MIN : b.tail > TAIL_MAX ? TAIL_MAX : b.tail;
  }
  return 0;
}

/* pread up to size bytes at off into p; the count, or -1 (errno) */
static long read_at(int fd, char *p, size_t size, off_t off) {
  size_t got = 0;
  while (got < size) {
    ssize_t r = pread(fd, p + got, size - got, off + (off_t)got);
    if (r < 0) { if (errno == EINTR) continue; return -1; }
    if (r == 0) break;
    got += (size_t)r;
  }
  return (long)got;
}

/* the lines of in[0..got) into win->t (empty ones skipped), up to max
 * lines; the bytes they take, *n the count. `end`: what follows got is the
 * end of the input (a last line without a newline counts) */
static size_t split(window *win, size_t got, int end, int max, int *n) {
  size_t i = 0;
  *n = 0;
  while (*n < max && i < got) {
    const char *nl = memchr(win->in + i, '\n', got - i);
    size_t len;
    if (!nl && !end) break;
    len = nl ? (size_t)(nl - (win->in + i)) : got - i;
    if (len && win->in[i + len - 1] == '\r') len--;
    if (len) { ++*n; win->t[*n].at = i; win->t[*n].len = len; }
    i = nl ? (size_t)(nl - win->in) + 1 : got;
  }
  return i;
}

/* w:read's answer for a line over max_line bytes at byte at */
static int too_long(lua_State *L, size_t max_line, off_t at) {
  lua_pushnil(L);
  lua_pushfstring(L, "a line of more than %d bytes at byte %f", (int)max_line, (lua_Number)at);
  return 2;
}

/* w:read(fh, pos, stop, max_lines, max_bytes, max_line): the window's input
 * lines, read from byte pos of the open file fh up to byte stop (nil: its
 * end), at most max_lines lines and about max_bytes bytes (more for one
 * longer line): the lines read, where the next read starts, and true when
 * the input (to stop) is all read; or nil and the reason (a line over
 * max_line bytes, a read error). Empty lines are skipped, a final \r is
 * dropped. The lines stay in the window until the next read. */
static int w_read(lua_State *L) {
  window *win = luaL_checkudata(L, 1, LBATCH_WINDOW);
  FILE *f = lb_file_of(L, 2);
  off_t pos = (off_t)luaL_checknumber(L, 3);
  double stop = luaL_optnumber(L, 4, -1);
  int max = (int)luaL_checkinteger(L, 5), n = 0, fd, end = 0, i;
  long got = 0;
  size_t size = (size_t)luaL_checknumber(L, 6), max_line = (size_t)luaL_checknumber(L, 7), used = 0;
  if (!f || (fd = fileno(f)) < 0) return luaL_error(L, "window: the file is closed");
  win->n = 0; win->from = 1; win->to = 0;
  if ((size_t)max + 1 > win->tcap) {
    struct tline *t = lb_big_realloc(win->t, win->tcap * sizeof *t, ((size_t)max + 1) * sizeof *t);
    if (!t) return luaL_error(L, "window: out of memory");
    win->t = t;
    win->tcap = (size_t)max + 1;
  }
  for (;;) {
    if (stop >= 0 && (double)pos + (double)size >= stop) { size = (size_t)(stop - (double)pos); end = 1; }
    if (size == 0) break;
    if (size > win->icap) {
      char *q = lb_big_realloc(win->in, win->icap, size);
      if (!q) return luaL_error(L, "window: out of memory");
      win->in = q;
      win->icap = size;
    }
    if ((got = read_at(fd, win->in, size, pos)) < 0) { lua_pushnil(L); lua_pushstring(L, strerror(errno)); return 2; }
    if ((size_t)got < size) end = 1;
    used = split(win, (size_t)got, end, max, &n);
    if (n > 0 || end || used > 0) break;          /* (used > 0: empty lines only) */
    if (size > max_line) return too_long(L, max_line, pos);
    size *= 2;                                   /* one line longer than the read */
  }
  for (i = 1; i <= n; i++) if (win->t[i].len > max_line) return too_long(L, max_line, pos + (off_t)win->t[i].at);
  win->n = n;
  lua_pushinteger(L, n);
  lua_pushnumber(L, (double)(pos + (off_t)used));
  lua_pushboolean(L, end && used == (size_t)got);   /* the input read to its end (or stop) */
  return 3;
}

/* w:fill(found, from, to, handles, sizes) */
static int w_fill(lua_State *L) {
  window *win = luaL_checkudata(L, 1, LBATCH_WINDOW);
  idmap *m = lb_idmap_check(L, 2);
  int from = (int)luaL_checkinteger(L, 3), to = (int)luaL_checkinteger(L, 4), last, rc;
  size_t k, n, used;
  want *w;
  luaL_checktype(L, 5, LUA_TTABLE);
  luaL_checktype(L, 6, LUA_TTABLE);
  luaL_argcheck(L, from >= 1 && to <= win->n, 3, "not lines read");
  lua_settop(L, 6);
  lua_remove(L, 1);                      /* found 1, from 2, to 3, handles 4, sizes 5 */
  win->from = from; win->to = from - 1; win->used = 0;
  if (to < from) { lua_pushinteger(L, to); return 1; }
  n = (size_t)(to - from + 1);
  if (n > win->ecap) {
    entry *e = lb_big_realloc(win->e, win->ecap * sizeof *e, n * sizeof *e);
    if (!e) return luaL_error(L, "window: out of memory");
    win->e = e;
    win->ecap = n;
  }
  if (n > win->wcap) {
    want *nw = lb_big_realloc(win->w, 2 * win->wcap * sizeof *nw, 2 * n * sizeof *nw);   /* w, then w2 */
    if (!nw) return luaL_error(L, "window: out of memory");
    win->w = nw;
    win->w2 = nw + n;
    win->wcap = n;
  }
  w = win->w;
  k = take_ids(win, m, from, to, w, &last, &used);
  if (used > win->cap) {
    char *q = lb_big_realloc(win->arena, win->cap, used);
    if (!q) return luaL_error(L, "window: out of memory");
    win->arena = q;
    win->cap = used;
  }
  win->used = used;
  sort_wants(w, win->w2, k);
  win->to = last;
  if ((rc = read_all(L, win, w, k)) != 0) { win->to = from - 1; return rc; }
  lua_pushinteger(L, last);
  return 1;
}

/* w:take(i): input i's answer: its line and core.result's values for it
 * (the line alone when the caller must check whose it is: same_id); false
 * when it has none (missing); a number (the index value) when it is to be
 * read alone */
static int w_take(lua_State *L) {
  window *win = luaL_checkudata(L, 1, LBATCH_WINDOW);
  lua_Integer i = luaL_checkinteger(L, 2);
  entry *e;
  lb_result r;
  const char *s;
  int ok;
  luaL_argcheck(L, i >= win->from && i <= win->to, 2, "not in the window");
  e = &win->e[i - win->from];
  lua_pushlstring(L, win->in + win->t[i].at, win->t[i].len);
  if (e->kind == E_MISSING) { lua_pushboolean(L, 0); return 2; }
  if (e->kind == E_LATER) { lua_pushnumber(L, e->v); return 2; }
  lua_pushlstring(L, win->arena + e->at, e->len);
  if (!(s = answer_of(win, e, &r))) return 2;
  return 2 + lb_push_scanned(L, s, e->len, &r, &ok, LB_F_ALL, 0);
}

/* does the request line s (n bytes) hold `format"`: may it ask for a JSON
 * answer? Sixteen places at a time (SSE2): those with an f and a quote
 * six bytes on, each one then compared; the rest byte by byte. memmem
 * took as long as the rest of a lean record */
static int asks_format(const char *s, size_t n) {
  size_t i = 0;
#ifdef __SSE2__
  const __m128i f = _mm_set1_epi8('f'), q = _mm_set1_epi8('"');
  for (; i + 6 + 16 <= n; i += 16) {
    __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(s + i)),
            b = _mm_loadu_si128((const __m128i *)(const void *)(s + i + 6));
    unsigned m = (unsigned)_mm_movemask_epi8(_mm_and_si128(_mm_cmpeq_epi8(a, f), _mm_cmpeq_epi8(b, q)));
    for (; m; m &= m - 1)
      if (memcmp(s + i + (size_t)__builtin_ctz(m), "format\"", 7) == 0) return 1;
  }
#endif
  for (; i + 7 <= n; i++)
    if (s[i] == 'f' && memcmp(s + i, "format\"", 7) == 0) return 1;
  return 0;
}

/* what a record of w:records holds besides the fields of LB_F_ALL */
enum { F_LINE = LB_F_ALL + 1, F_LAZY = F_LINE << 1, F_ASKED = F_LINE << 2 };   /* F_ASKED: a want given */
#define F_EVERY (LB_F_ALL | F_LINE | F_LAZY)

/* input i's record, pushed, when it is the common case: an answer that is
 * the request's, ok, with chat's content or an embedding. Whole (`want`
 * F_EVERY), it is results.light's record: its fields, rec.line the request
 * line, and its own metatable {__index = lazy (stack slot `lazy`), line =
 * the answer line (a userdata with the metatable at slot `line_mt`; the
 * keys "__index" and "line" at the two slots after it)}.
 * Else only what `want` asks for, with custom_id and ok; a request that
 * may ask for a JSON answer is then left to the caller, which checks the
 * answer; and a record that keeps no line gets the shared metatable at
 * slot `lean`, {__index = lazy}. *format set when the request line may ask
 * for a JSON answer (it holds `format"`). 0 and nothing pushed for any
 * other. */
static int push_record(lua_State *L, window *win, lua_Integer i, int lazy, int line_mt, int lean, int keys,
                       unsigned want, int *format) {
  entry *e = &win->e[i - win->from];
  const char *s, *text = win->in + win->t[i].at;
  size_t tlen = win->t[i].len;
  lb_result r;
  int top = lua_gettop(L), ok;
  if (!(s = answer_of(win, e, &r))
      || !((r.message.kind == LB_J_OBJ && r.content.kind == LB_J_STR)
           || (r.datum0.kind == LB_J_OBJ && r.embedding.kind == LB_J_ARR)))
    return 0;
  *format = asks_format(text, tlen);
  if (*format && want != F_EVERY) return 0;
  if (lb_push_scanned(L, s, e->len, &r, &ok, want & LB_F_ALL, keys) == 1 || !ok) {
    lua_settop(L, top);
    return 0;
  }
  lua_pop(L, 2);                         /* err and berr (nil: it is ok) */
  if (!(want & F_LAZY)) {
    if (lean) { lua_pushvalue(L, lean); lua_setmetatable(L, -2); }
  } else {
    lua_createtable(L, 0, 2);            /* (no array part: one allocation less on Lua 5.4) */
    lua_pushvalue(L, line_mt + 1);       /* "__index" */
    lua_pushvalue(L, lazy);
    lua_rawset(L, -3);
    lua_pushvalue(L, line_mt + 2);       /* "line" */
    memcpy(lua_newuserdata(L, e->len), s, e->len);   /* (not a string: LuaJIT would intern it) */
    lua_pushvalue(L, line_mt);
    lua_setmetatable(L, -2);
    lua_rawset(L, -3);
    lua_setmetatable(L, -2);
  }
  if (want & F_LINE) {
    lua_pushvalue(L, line_mt + 2);
    lua_pushlstring(L, text, tlen);
    lua_rawset(L, -3);
  }
  return 1;
}

/* w:records(from, to, lazy, out, asks[, want]): the records of inputs
 * from..to in out[1..], each made here (push_record) or false for one the
 * caller takes itself (w:take); in asks[1..], the places in out of those
 * whose request may ask for a JSON answer. `want` (a set of field names;
 * nil: every one) makes them hold only those fields: "line" keeps the
 * request line, "body", "input" and "prompt" the lines their lazy decode
 * reads; `lazy` is then the caller's guard of the fields left out, each
 * record's __index. Returns the count of each. One call a batch: a call
 * to C a record cost the join as much as the record's fields. */
static int w_records(lua_State *L) {
  window *win = luaL_checkudata(L, 1, LBATCH_WINDOW);
  lua_Integer from = luaL_checkinteger(L, 2), to = luaL_checkinteger(L, 3), i, m = 0;
  unsigned want = F_EVERY;
  int lean = 0, keys;
  luaL_argcheck(L, from >= win->from && to <= win->to, 2, "not in the window");
  luaL_checktype(L, 4, LUA_TFUNCTION);
  luaL_checktype(L, 5, LUA_TTABLE);
  luaL_checktype(L, 6, LUA_TTABLE);
  if (!lua_isnoneornil(L, 7)) {
    luaL_checktype(L, 7, LUA_TTABLE);
    want = lb_fields_wanted(L, 7) | F_ASKED;    /* (never F_EVERY, even with every field named) */
    lua_getfield(L, 7, "line");
    if (lua_toboolean(L, -1)) want |= F_LINE;
    lua_pop(L, 1);
    lua_getfield(L, 7, "body");
    lua_getfield(L, 7, "input");
    lua_getfield(L, 7, "prompt");
    if (lua_toboolean(L, -1) || lua_toboolean(L, -2) || lua_toboolean(L, -3)) want |= F_LAZY | F_LINE;
    lua_pop(L, 3);
  }
  lua_settop(L, 7);
  luaL_getmetatable(L, LBATCH_LINE);              /* 8, and the keys a record's metatable and line take: */
  lua_pushliteral(L, "__index");                  /* 9 */
  lua_pushliteral(L, "line");                     /* 10 (made strings once a batch, not once a record) */
  if (want != F_EVERY && !(want & F_LAZY)) {    /* lean records: {__index = lazy} for all of them */
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, 4);
    lua_setfield(L, -2, "__index");
    lean = lua_gettop(L);
  }
  keys = lb_push_keys(L);
  luaL_checkstack(L, 8, "window: records");      /* a record's pushes past the keys (push_record's, fields') */
  for (i = from; i <= to; i++) {
    int format = 0;
    if (!push_record(L, win, i, 4, 8, lean, keys, want, &format)) lua_pushboolean(L, 0);
    else if (format) { lua_pushinteger(L, i - from + 1); lua_rawseti(L, 6, (int)++m); }
    lua_rawseti(L, 5, (int)(i - from + 1));
  }
  lua_pushinteger(L, to >= from ? to - from + 1 : 0);
  lua_pushinteger(L, m);
  return 2;
}

/* core.answer_bytes(ud): the answer line push_record keeps, as a string */
int lb_answer_bytes(lua_State *L) {
  void *p = luaL_checkudata(L, 1, LBATCH_LINE);
  lua_pushlstring(L, p, lua_rawlen(L, 1));
  return 1;
}

/* w:text(i): input line i */
static int w_text(lua_State *L) {
  window *win = luaL_checkudata(L, 1, LBATCH_WINDOW);
  lua_Integer i = luaL_checkinteger(L, 2);
  luaL_argcheck(L, i >= 1 && i <= win->n, 2, "not a line read");
  lua_pushlstring(L, win->in + win->t[i].at, win->t[i].len);
  return 1;
}

/* w:file(i): the number of the result file input i's answer came from */
static int w_file(lua_State *L) {
  window *win = luaL_checkudata(L, 1, LBATCH_WINDOW);
  lua_Integer i = luaL_checkinteger(L, 2);
  luaL_argcheck(L, i >= win->from && i <= win->to && win->e[i - win->from].kind == E_LINE, 2, "not an answer");
  lua_pushinteger(L, win->e[i - win->from].file);
  return 1;
}

static int w_gc(lua_State *L) {
  window *win = luaL_checkudata(L, 1, LBATCH_WINDOW);
  lb_big_free(win->arena, win->cap); lb_big_free(win->e, win->ecap * sizeof *win->e);
  lb_big_free(win->w, 2 * win->wcap * sizeof *win->w);
  lb_big_free(win->blk, win->bcap); lb_big_free(win->in, win->icap); lb_big_free(win->t, win->tcap * sizeof *win->t);
  win->arena = NULL; win->e = NULL; win->w = NULL; win->w2 = NULL; win->blk = NULL; win->in = NULL; win->t = NULL;
  win->cap = win->used = win->ecap = win->wcap = win->bcap = win->icap = win->tcap = 0;
  win->from = 1; win->to = 0; win->n = 0;
  return 0;
}

/* core.window() */
int lb_window_new(lua_State *L) {
  static const luaL_Reg methods[] = { {"read", w_read}, {"fill", w_fill}, {"take", w_take}, {"records", w_records},
                                      {"text", w_text},
                                      {"file", w_file}, {"free", w_gc}, {NULL, NULL} };
  window *win = lua_newuserdata(L, sizeof *win);
  memset(win, 0, sizeof *win);
  win->from = 1;
  if (luaL_newmetatable(L, LBATCH_WINDOW)) {
    lua_pushcfunction(L, w_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
  }
  lua_setmetatable(L, -2);
  if (luaL_newmetatable(L, LBATCH_LINE)) {
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");          /* (its bytes are for the lazy body alone) */
  }
  lua_pop(L, 1);
  return 1;
}
