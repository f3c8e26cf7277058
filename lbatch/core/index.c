/* The JSONL indexer: which line of which file holds each custom_id, read
 * straight from the file into an idmap, with no Lua string per line.
 * lbatch/results.lua joins result files to their inputs with it.
 *
 *   m:scan(path, fileno [, start, max_lines, filter, drop])
 *     reads the JSONL file at path from byte `start` (0) for at most
 *     `max_lines` lines and, for each line's top-level "custom_id" string,
 *     puts custom_id -> fileno * 2^36 + the line's byte offset (the first
 *     one wins) or, with `drop`, removes it; with `filter` (another idmap)
 *     only the ids in filter count. Returns lines read, the offset after
 *     them (nil at the end of the file), and the offsets of the lines whose
 *     id it could not read cheaply (escapes, no id, over LINE_MAX bytes):
 *     the caller decodes those. Or nil and the OS's reason. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "core.h"
#include "scan.h"

#define SCAN_CHUNK (1 << 20)
#define SCAN_LINE_MAX (8u << 20)   /* past the service's 6 MB line limit */
#define FILE_SPAN 68719476736.0    /* 2^36: offsets up to 64 GB per file */

/* The puts of a plain scan go through a ring: each id's slot is fetched
 * into the cache (lb_idmap_prefetch) RING lines before it is put, so that
 * the misses of a large index overlap instead of coming one after another
 * (the index pass of a 1,000,000-line join spent most of its time waiting
 * on them). Puts keep their order: the first one of an id still wins. The
 * keys point into the read chunk: the ring is emptied before it is read
 * again, and before a line that spans chunks is put. */
#define RING 16
typedef struct pending { const char *k; size_t len, line; uint64_t h; double v; } pending;
typedef struct ring { pending p[RING]; int n, head; } ring;

/* put every pending id, oldest first; 0: out of memory */
static int ring_flush(idmap *m, ring *q) {
  int i, ok = 1;
  for (i = 0; i < q->n; i++) {
    pending *e = &q->p[(q->head + i) % RING];
    if (lb_idmap_put_line(m, e->k, e->len, e->h, e->v, e->line) < 0) ok = 0;
  }
  q->n = q->head = 0;
  return ok;
}

/* id k -> v (its line `line` bytes long), through the ring (q NULL: put now) */
static int ring_put(idmap *m, ring *q, const char *k, size_t len, uint64_t h, double v, size_t line) {
  pending *e;
  if (!q) return lb_idmap_put_line(m, k, len, h, v, line) >= 0;
  lb_idmap_prefetch(m, h);
  if (q->n == RING) {                        /* the oldest goes in, the new one takes its place */
    e = &q->p[q->head];
    if (lb_idmap_put_line(m, e->k, e->len, e->h, e->v, e->line) < 0) return 0;
    q->head = (q->head + 1) % RING;
    q->n--;
  }
  e = &q->p[(q->head + q->n) % RING];
  e->k = k; e->len = len; e->h = h; e->v = v; e->line = line;
  q->n++;
  return 1;
}

/* one line of a scan: its id counted in m (or its offset listed for Lua);
 * 0: out of memory */
static int scan_line(lua_State *L, idmap *m, idmap *filter, int drop, double base, ring *q,
                     const char *line, size_t n, int over, size_t off, int *bad) {
  size_t io = 0, il = 0;
  uint64_t h;
  if (n && line[n - 1] == '\r') n--;
  if (over || lb_json_string(line, n, "custom_id", 9, &io, &il) != LB_FOUND) {
    if (n == 0 && !over) return 1;                 /* an empty line */
    lua_pushinteger(L, (lua_Integer)off);
    lua_rawseti(L, -2, ++*bad);
    return 1;
  }
  if (filter && !lb_idmap_has(filter, line + io, il, lb_idmap_hash(filter, line + io, il))) return 1;
  h = lb_idmap_hash(m, line + io, il);
  if (drop) {
    lb_idmap_remove(m, line + io, il, h);
    return 1;
  }
  return ring_put(m, q, line + io, il, h, base + (double)off, n);   /* the first one wins; n: for the fetch */
}

/* the size of a scan's chunk: SCAN_CHUNK, or no larger than what is left
 * of a regular file from start: a join in small chunks scans small files
 * thousands of times, and a fresh 1 MB each time is page faults (and, under
 * AddressSanitizer, an mmap) for nothing */
static size_t chunk_size(FILE *f, size_t start) {
  struct stat st;
  if (fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode) && st.st_size >= 0 && (uint64_t)st.st_size >= start
      && (uint64_t)st.st_size - start < SCAN_CHUNK)
    return (size_t)((uint64_t)st.st_size - start) + 1;
  return SCAN_CHUNK;
}

/* room made in m at once for the ids of f after byte `at`, as many as the
 * first chunk's `ids` (put in m) in its `bytes` tell, up to max_lines in
 * all and RESERVE_MAX: one rebuild of the index, not one at each doubling
 * (each of them memory the kernel zeroes). Counted by ids, not lines, and
 * bounded, so that a file that is dense at first and sparse after (a
 * server's, untrusted) costs at most RESERVE_MAX's slots, whatever its
 * size; past that the index grows as it fills. 0: out of memory */
#define RESERVE_MAX (2u << 20)      /* ids: 64 MB of slots */
static int reserve(idmap *m, FILE *f, size_t at, size_t bytes, double ids, double lines, double max_lines) {
  struct stat st;
  double est;
  if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode) || (double)st.st_size <= (double)at) return 1;
  est = ((double)st.st_size - (double)at) * ids / (double)bytes;
  if (est > max_lines - lines) est = max_lines - lines;
  if (est > RESERVE_MAX) est = RESERVE_MAX;
  return est < 1 || lb_idmap_reserve(m, (size_t)est);
}

/* what m:scan returns, the table of offsets on the stack's top: lines read,
 * the offset after them (nil at the end of the file), the table */
static int scan_done(lua_State *L, double lines, int at_end, size_t line_off) {
  lua_pushinteger(L, (lua_Integer)lines);
  lua_insert(L, -2);
  if (at_end) lua_pushnil(L); else lua_pushinteger(L, (lua_Integer)line_off);
  lua_insert(L, -2);
  return 3;
}

static int m_scan(lua_State *L) {
  idmap *m = lb_idmap_check(L, 1);
  const char *path = luaL_checkstring(L, 2);
  double fileno_ = luaL_checknumber(L, 3);
  size_t start = (size_t)luaL_optnumber(L, 4, 0);
  double max_lines = luaL_optnumber(L, 5, -1);
  idmap *filter = lua_isnoneornil(L, 6) ? NULL : lb_idmap_check(L, 6);
  int drop = lua_toboolean(L, 7);
  double base = fileno_ * FILE_SPAN, lines = 0;
  size_t off = start, line_off = start;  /* where the next read starts; where the line began */
  int bad = 0, ok = 1, over = 0, at_end = 0, plain = !filter && !drop, first = 1;
  size_t ids0 = lb_idmap_count(m);     /* (the ids in m before: the first chunk's are counted) */
  buf line = {0};
  ring q = { { { NULL, 0, 0, 0, 0 } }, 0, 0 };
  char *chunk;
  size_t size;
  FILE *f = fopen(path, "rb");
  if (!f) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, strerror(errno));
    return 2;
  }
  if (start && fseek(f, (long)start, SEEK_SET) != 0) { fclose(f); return luaL_error(L, "idmap: cannot seek"); }
  size = chunk_size(f, start);
  if (!(chunk = malloc(size))) { fclose(f); return luaL_error(L, "idmap: out of memory"); }
  lua_newtable(L);
  while (ok && (max_lines < 0 || lines < max_lines)) {
    size_t got = fread(chunk, 1, size, f), i = 0;
    if (got == 0) {
      if (ferror(f)) { ok = -1; break; }
      if (line.len || over) {                       /* a last line without \n */
        ok = ring_flush(m, &q) && scan_line(L, m, filter, drop, base, NULL, line.p, line.len, over, line_off, &bad);
        lines++;
      }
      at_end = 1;
      break;
    }
    while (i < got) {
      char *nl = memchr(chunk + i, '\n', got - i);
      size_t take = nl ? (size_t)(nl - (chunk + i)) : got - i;
      const char *p = chunk + i;
      if (!over && line.len + take > SCAN_LINE_MAX) { over = 1; line.len = 0; }
      if (!nl) {
        if (!over && !lb_buf_add(&line, p, take)) { ok = 0; break; }
        i = got;
        break;
      }
      if (line.len && !over) {
        if (!lb_buf_add(&line, p, take)) { ok = 0; break; }
        ok = ring_flush(m, &q) && scan_line(L, m, filter, drop, base, NULL, line.p, line.len, 0, line_off, &bad);
      } else {
        ok = scan_line(L, m, filter, drop, base, plain ? &q : NULL, p, take, over, line_off, &bad);
      }
      line.len = 0; over = 0;
      i += take + 1;
      line_off = off + i;
      lines++;
      if (!ok || (max_lines >= 0 && lines >= max_lines)) break;
    }
    if (ok && !ring_flush(m, &q)) ok = 0;            /* (the chunk is read over next) */
    if (ok && first && plain && max_lines >= 0 && i == got)
      ok = reserve(m, f, off + i, i, (double)(lb_idmap_count(m) - ids0), lines, max_lines);
    first = 0;
    off += i;
    if (ok && i < got) break;                        /* max_lines reached mid-chunk */
  }
  free(chunk);
  lb_buf_free(&line);
  if (ok == -1 || ferror(f)) {
    fclose(f);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: read error", path);
    return 2;
  }
  fclose(f);
  if (!ok) return luaL_error(L, "idmap: out of memory");
  return scan_done(L, lines, at_end, line_off);
}

const luaL_Reg lb_index_methods[] = { {"scan", m_scan}, {"answer", lb_idmap_answer}, {NULL, NULL} };
