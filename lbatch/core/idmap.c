/* idmap: custom_id -> number, in C memory (an open-addressing hash map).
 *
 * The JSONL writer keeps up to 50,000 custom_ids per file and the results
 * reader indexes every result line. Held in a Lua table, that many live
 * strings make LuaJIT's collector run rarely while request-sized strings
 * pile up in its string table, where LuaJIT's sampled hash puts lines that
 * differ only in the middle into the same chains: interning goes quadratic
 * (measured: 10x slower writes). Here they cost the collector nothing.
 *
 *   local m = core.idmap()
 *   m:put(key, value) -> true if new, false if the key was there (kept)
 *   m:get(key) -> value | nil;  m:take(key) -> value | nil (and removes it)
 *   m:count();  m:keys() -> list of the keys left;  m:clear()
 *   m:has(key) -> boolean;  m:reserve(n)  room for n more keys, made at once
 *   m:answer(line, handles)  the join's step for one input line (rec.c)
 *   m:scan(...)  fills the map from a JSONL file (index.c) */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#ifdef __linux__
#include <sys/random.h>
#endif
#include "core.h"

#define TOMB ((ent *)1)

/* a key and its value, in the map's blocks (no malloc per key); `line`:
 * the length of the line m:scan found the key in (0: not known) */
typedef struct ent {
  lua_Number value;
  size_t len;
  uint32_t line;
  char key[];
} ent;

/* 16 bytes: the hash to compare, the entry only when the hashes agree. A
 * join's index of 1,000,000 ids is 32 MB of slots, each zeroed by the
 * kernel before first use: half of what a slot holding key, length and
 * value took (and half the cache misses' worth of memory) */
typedef struct slot {
  uint64_t hash;
  ent *e;             /* NULL: empty; TOMB: removed */
} slot;

/* the entries live in blocks freed together by clear */
typedef struct block {
  struct block *next;
  size_t used, cap;
  char data[];
} block;

#define BLOCK_SIZE 65536
#define ENT_SIZE(len) ((offsetof(ent, key) + (len) + 7) & ~(size_t)7)   /* (aligned for the next one) */

struct idmap {
  slot *slots;
  size_t cap, n, used;  /* used counts tombstones too */
  block *keys;          /* the newest block first */
  uint64_t seed;        /* the hash's, this map's own (lb_idmap_hash) */
};

static ent *ent_new(idmap *m, const char *k, size_t len, lua_Number v, uint32_t line) {
  block *b = m->keys;
  size_t size = ENT_SIZE(len);
  ent *e;
  if (!b || b->cap - b->used < size) {
    size_t cap = size > BLOCK_SIZE / 4 ? size : BLOCK_SIZE;
    if (!(b = malloc(sizeof *b + cap))) return NULL;
    b->used = 0;
    b->cap = cap;
    if (size > BLOCK_SIZE / 4 && m->keys) {   /* a big key: its own block, behind the current one */
      b->next = m->keys->next;
      m->keys->next = b;
    } else {
      b->next = m->keys;
      m->keys = b;
    }
  }
  e = (ent *)(void *)(b->data + b->used);
  e->value = v;
  e->len = len;
  e->line = line;
  memcpy(e->key, k, len);
  b->used += size;
  return e;
}

/* FNV-1a from the map's own random seed, then mixed (murmur3's fmix64)
 * so that every bit of the state reaches the slot's: ids that a hostile
 * file chose to collide under plain FNV-1a (which is easy: the low bits of
 * its state depend on the low bits alone) would make each put walk the
 * same run of slots, and an index of n of them take n^2 / 2 probes */
uint64_t lb_idmap_hash(const idmap *m, const char *s, size_t n) {
  uint64_t h = 1469598103934665603ULL ^ m->seed;
  size_t i;
  for (i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 1099511628211ULL; }
  h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

/* a seed for a new map: the kernel's random bytes, else the clock, the
 * map's address and a count mixed */
static uint64_t seed_new(const void *m) {
  uint64_t x = 0;
#ifdef __linux__
  if (getrandom(&x, sizeof x, GRND_NONBLOCK) == (ssize_t)sizeof x) return x;
#endif
  {
    static unsigned long count;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    x = (uint64_t)t.tv_nsec ^ ((uint64_t)t.tv_sec << 30) ^ (uint64_t)(uintptr_t)m ^ ((uint64_t)++count << 48);
  }
  return x;
}

static slot *find(const idmap *m, const char *k, size_t len, uint64_t h, int for_insert) {
  size_t i = (size_t)h & (m->cap - 1);
  slot *tomb = NULL;
  for (;;) {
    slot *s = &m->slots[i];
    if (s->e == NULL) return for_insert ? (tomb ? tomb : s) : NULL;
    if (s->e == TOMB) { if (!tomb) tomb = s; }
    else if (s->hash == h && s->e->len == len && memcmp(s->e->key, k, len) == 0) return s;
    i = (i + 1) & (m->cap - 1);
  }
}

static slot *lookup(const idmap *m, const char *k, size_t len, uint64_t h) {
  return m->cap ? find(m, k, len, h, 0) : NULL;
}

#define HUGE_PAGE (2u << 20)

/* the slots of a map of cap slots, zeroed. A large one on huge pages where
 * the system gives them (a join's index is 32 MB at 1,000,000 ids, read
 * at random: with 4 KB pages nearly every lookup is a TLB miss as well) */
static slot *slots_new(size_t cap) {
  size_t size = cap * sizeof(slot);
  void *p = NULL;
  if (size < 2 * HUGE_PAGE) return calloc(cap, sizeof(slot));
  if (posix_memalign(&p, HUGE_PAGE, size) != 0) return NULL;
#ifdef MADV_HUGEPAGE
  madvise(p, size, MADV_HUGEPAGE);   /* a hint: without it, the same on 4 KB pages */
#endif
  memset(p, 0, size);
  return p;
}

/* the slots rebuilt at cap (a power of two, above the count), without
 * the tombstones */
static int resize(idmap *m, size_t cap) {
  size_t i, oldcap = m->cap;
  slot *old = m->slots, *ns = slots_new(cap);
  if (!ns) return 0;
  m->slots = ns; m->cap = cap; m->used = m->n;
  for (i = 0; i < oldcap; i++) {
    if (old[i].e && old[i].e != TOMB) {
      size_t j = (size_t)old[i].hash & (cap - 1);
      while (ns[j].e) j = (j + 1) & (cap - 1);
      ns[j] = old[i];
    }
  }
  free(old);
  return 1;
}

/* is there room for k more puts within the load limit (7 in 10)? */
static int room(const idmap *m, size_t k) { return (m->used + k) * 10 < m->cap * 7; }

static int grow(idmap *m) { return resize(m, m->cap ? m->cap * 2 : 64); }

/* room made at once for k more keys (m:scan's estimate of a file's ids,
 * a chunk's count of them): one rebuild, not one at each doubling on the
 * way there */
int lb_idmap_reserve(idmap *m, size_t k) {
  size_t cap = m->cap ? m->cap : 64;
  if (k > SIZE_MAX / sizeof(slot) / 4 - m->n) return 0;   /* more than memory holds (and no size to wrap) */
  if (room(m, k)) return 1;
  while ((m->n + k) * 10 >= cap * 7) cap *= 2;
  return resize(m, cap);
}

size_t lb_idmap_count(const idmap *m) { return m->n; }

static void clear(idmap *m) {
  while (m->keys) {
    block *next = m->keys->next;
    free(m->keys);
    m->keys = next;
  }
  free(m->slots);
  m->slots = NULL;
  m->cap = m->n = m->used = 0;
}

/* bring the slot a key of hash h starts at into the cache (a put to come) */
void lb_idmap_prefetch(const idmap *m, uint64_t h) {
#if defined(__GNUC__)
  if (m->cap) __builtin_prefetch(&m->slots[(size_t)h & (m->cap - 1)], 1);
#else
  (void)m; (void)h;
#endif
}

/* the entry of the key of hash h into the cache, its slot found by the
 * hash alone (the slot fetched before: lb_idmap_prefetch some keys ago):
 * a lookup's second miss overlaps too */
void lb_idmap_prefetch_entry(const idmap *m, uint64_t h) {
#if defined(__GNUC__)
  size_t i, k;
  if (!m->cap) return;
  for (i = (size_t)h & (m->cap - 1), k = 0; k < 4 && m->slots[i].e; k++, i = (i + 1) & (m->cap - 1))
    if (m->slots[i].hash == h && m->slots[i].e != TOMB) { __builtin_prefetch(m->slots[i].e, 0); return; }
#else
  (void)m; (void)h;
#endif
}

int lb_idmap_has(const idmap *m, const char *k, size_t len, uint64_t h) {
  return lookup(m, k, len, h) != NULL;
}

int lb_idmap_put(idmap *m, const char *k, size_t len, uint64_t h, lua_Number v) {
  return lb_idmap_put_line(m, k, len, h, v, 0);
}

int lb_idmap_put_line(idmap *m, const char *k, size_t len, uint64_t h, lua_Number v, size_t line) {
  slot *s;
  ent *e;
  if (!room(m, 1) && !grow(m)) return -1;
  s = find(m, k, len, h, 1);
  if (s->e && s->e != TOMB) return 0;            /* the first one stays */
  if (!(e = ent_new(m, k, len, v, line <= UINT32_MAX ? (uint32_t)line : 0))) return -1;
  if (!s->e) m->used++;
  s->e = e; s->hash = h;
  m->n++;
  return 1;
}

static void drop(idmap *m, slot *s) {   /* its entry stays in its block until clear */
  s->e = TOMB;
  m->n--;
}

int lb_idmap_remove(idmap *m, const char *k, size_t len, uint64_t h) {
  slot *s = lookup(m, k, len, h);
  if (s) drop(m, s);
  return s != NULL;
}

int lb_idmap_take(idmap *m, const char *k, size_t len, lua_Number *v) {
  slot *s = lookup(m, k, len, lb_idmap_hash(m, k, len));
  if (!s) return 0;
  *v = s->e->value;
  drop(m, s);
  return 1;
}

int lb_idmap_get_line(const idmap *m, const char *k, size_t len, uint64_t h, lua_Number *v, size_t *line) {
  slot *s = lookup(m, k, len, h);
  if (!s) return 0;
  *v = s->e->value;
  *line = s->e->line;
  return 1;
}

/* ------------------------------------------------------------ Lua */

idmap *lb_idmap_check(lua_State *L, int arg) { return luaL_checkudata(L, arg, LBATCH_IDMAP); }

static int m_put(lua_State *L) {
  idmap *m = lb_idmap_check(L, 1);
  size_t len;
  const char *k = luaL_checklstring(L, 2, &len);
  lua_Number v = lua_isnoneornil(L, 3) ? 1 : luaL_checknumber(L, 3);
  int r = lb_idmap_put(m, k, len, lb_idmap_hash(m, k, len), v);
  if (r < 0) return luaL_error(L, "idmap: out of memory");
  lua_pushboolean(L, r);
  return 1;
}

static int get(lua_State *L, int take) {
  idmap *m = lb_idmap_check(L, 1);
  size_t len;
  const char *k = luaL_checklstring(L, 2, &len);
  slot *s = lookup(m, k, len, lb_idmap_hash(m, k, len));
  if (!s) return 0;
  lua_pushnumber(L, s->e->value);
  if (take) drop(m, s);
  return 1;
}
static int m_get(lua_State *L) { return get(L, 0); }
static int m_take(lua_State *L) { return get(L, 1); }

static int m_count(lua_State *L) { lua_pushinteger(L, (lua_Integer)lb_idmap_check(L, 1)->n); return 1; }

static int m_keys(lua_State *L) {
  idmap *m = lb_idmap_check(L, 1);
  size_t i;
  int n = 0;
  lua_createtable(L, (int)m->n, 0);
  for (i = 0; i < m->cap; i++) {
    if (m->slots[i].e && m->slots[i].e != TOMB) {
      lua_pushlstring(L, m->slots[i].e->key, m->slots[i].e->len);
      lua_rawseti(L, -2, ++n);
    }
  }
  return 1;
}

static int m_reserve(lua_State *L) {
  idmap *m = lb_idmap_check(L, 1);
  lua_Integer k = luaL_checkinteger(L, 2);
  luaL_argcheck(L, k >= 0, 2, "not a count");
  if (!lb_idmap_reserve(m, (size_t)k)) return luaL_error(L, "idmap: out of memory");
  return 0;
}

static int m_clear(lua_State *L) { clear(lb_idmap_check(L, 1)); return 0; }

static int m_has(lua_State *L) {
  idmap *m = lb_idmap_check(L, 1);
  size_t len;
  const char *k = luaL_checklstring(L, 2, &len);
  lua_pushboolean(L, lb_idmap_has(m, k, len, lb_idmap_hash(m, k, len)));
  return 1;
}

int lb_idmap_new(lua_State *L) {
  idmap *m = lua_newuserdata(L, sizeof *m);
  memset(m, 0, sizeof *m);
  m->seed = seed_new(m);
  luaL_getmetatable(L, LBATCH_IDMAP);
  lua_setmetatable(L, -2);
  return 1;
}

const luaL_Reg lb_idmap_methods[] = {
  {"put", m_put}, {"get", m_get}, {"take", m_take}, {"count", m_count},
  {"keys", m_keys}, {"clear", m_clear}, {"has", m_has}, {"reserve", m_reserve}, {NULL, NULL}
};

const luaL_Reg lb_idmap_meta[] = { {"__gc", m_clear}, {NULL, NULL} };
