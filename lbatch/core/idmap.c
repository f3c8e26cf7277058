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
 *   m:has(key) -> boolean
 *   m:answer(line, handles)  the join's step for one input line (rec.c)
 *   m:scan(...)  fills the map from a JSONL file (index.c) */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "core.h"

#define TOMB ((char *)1)

typedef struct slot {
  uint64_t hash;
  char *key;          /* NULL: empty; TOMB: removed */
  size_t len;
  lua_Number value;
} slot;

/* the keys live in blocks freed together by clear (no malloc per key) */
typedef struct block {
  struct block *next;
  size_t used, cap;
  char data[];
} block;

#define BLOCK_SIZE 65536

struct idmap {
  slot *slots;
  size_t cap, n, used;  /* used counts tombstones too */
  block *keys;          /* the newest block first */
};

static char *key_copy(idmap *m, const char *k, size_t len) {
  block *b = m->keys;
  char *p;
  if (!b || b->cap - b->used < len) {
    size_t cap = len > BLOCK_SIZE / 4 ? len : BLOCK_SIZE;
    if (!(b = malloc(sizeof *b + cap))) return NULL;
    b->used = 0;
    b->cap = cap;
    if (len > BLOCK_SIZE / 4 && m->keys) {   /* a big key: its own block, behind the current one */
      b->next = m->keys->next;
      m->keys->next = b;
    } else {
      b->next = m->keys;
      m->keys = b;
    }
  }
  p = b->data + b->used;
  memcpy(p, k, len);
  b->used += len;
  return p;
}

uint64_t lb_idmap_hash(const char *s, size_t n) {   /* FNV-1a */
  uint64_t h = 1469598103934665603ULL;
  size_t i;
  for (i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 1099511628211ULL; }
  return h;
}

static slot *find(const idmap *m, const char *k, size_t len, uint64_t h, int for_insert) {
  size_t i = (size_t)h & (m->cap - 1);
  slot *tomb = NULL;
  for (;;) {
    slot *s = &m->slots[i];
    if (s->key == NULL) return for_insert ? (tomb ? tomb : s) : NULL;
    if (s->key == TOMB) { if (!tomb) tomb = s; }
    else if (s->hash == h && s->len == len && memcmp(s->key, k, len) == 0) return s;
    i = (i + 1) & (m->cap - 1);
  }
}

static slot *lookup(const idmap *m, const char *k, size_t len, uint64_t h) {
  return m->cap ? find(m, k, len, h, 0) : NULL;
}

#define HUGE_PAGE (2u << 20)

/* the slots of a map of cap slots, zeroed. A large one on huge pages where
 * the system gives them (a join's index is 80 MB at 1,000,000 ids, read
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

static int grow(idmap *m) {
  size_t i, cap = m->cap ? m->cap * 2 : 64;
  slot *old = m->slots, *ns = slots_new(cap);
  size_t oldcap = m->cap;
  if (!ns) return 0;
  m->slots = ns; m->cap = cap; m->used = m->n;
  for (i = 0; i < oldcap; i++)
    if (old[i].key && old[i].key != TOMB) *find(m, old[i].key, old[i].len, old[i].hash, 1) = old[i];
  free(old);
  return 1;
}

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

int lb_idmap_has(const idmap *m, const char *k, size_t len, uint64_t h) {
  return lookup(m, k, len, h) != NULL;
}

int lb_idmap_put(idmap *m, const char *k, size_t len, uint64_t h, lua_Number v) {
  slot *s;
  char *copy;
  if ((m->used + 1) * 10 >= m->cap * 7 && !grow(m)) return -1;
  s = find(m, k, len, h, 1);
  if (s->key && s->key != TOMB) return 0;        /* the first one stays */
  if (!(copy = key_copy(m, k, len))) return -1;
  if (!s->key) m->used++;
  s->key = copy; s->len = len; s->hash = h; s->value = v;
  m->n++;
  return 1;
}

static void drop(idmap *m, slot *s) {   /* its key's bytes stay in their block until clear */
  s->key = TOMB;
  m->n--;
}

int lb_idmap_remove(idmap *m, const char *k, size_t len, uint64_t h) {
  slot *s = lookup(m, k, len, h);
  if (s) drop(m, s);
  return s != NULL;
}

int lb_idmap_take(idmap *m, const char *k, size_t len, lua_Number *v) {
  return lb_idmap_take_h(m, k, len, lb_idmap_hash(k, len), v);
}

int lb_idmap_take_h(idmap *m, const char *k, size_t len, uint64_t h, lua_Number *v) {
  slot *s = lookup(m, k, len, h);
  if (!s) return 0;
  *v = s->value;
  drop(m, s);
  return 1;
}

/* ------------------------------------------------------------ Lua */

idmap *lb_idmap_check(lua_State *L, int arg) { return luaL_checkudata(L, arg, LBATCH_IDMAP); }

static int m_put(lua_State *L) {
  idmap *m = lb_idmap_check(L, 1);
  size_t len;
  const char *k = luaL_checklstring(L, 2, &len);
  lua_Number v = lua_isnoneornil(L, 3) ? 1 : luaL_checknumber(L, 3);
  int r = lb_idmap_put(m, k, len, lb_idmap_hash(k, len), v);
  if (r < 0) return luaL_error(L, "idmap: out of memory");
  lua_pushboolean(L, r);
  return 1;
}

static int get(lua_State *L, int take) {
  idmap *m = lb_idmap_check(L, 1);
  size_t len;
  const char *k = luaL_checklstring(L, 2, &len);
  slot *s = lookup(m, k, len, lb_idmap_hash(k, len));
  if (!s) return 0;
  lua_pushnumber(L, s->value);
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
    if (m->slots[i].key && m->slots[i].key != TOMB) {
      lua_pushlstring(L, m->slots[i].key, m->slots[i].len);
      lua_rawseti(L, -2, ++n);
    }
  }
  return 1;
}

static int m_clear(lua_State *L) { clear(lb_idmap_check(L, 1)); return 0; }

static int m_has(lua_State *L) {
  idmap *m = lb_idmap_check(L, 1);
  size_t len;
  const char *k = luaL_checklstring(L, 2, &len);
  lua_pushboolean(L, lb_idmap_has(m, k, len, lb_idmap_hash(k, len)));
  return 1;
}

int lb_idmap_new(lua_State *L) {
  idmap *m = lua_newuserdata(L, sizeof *m);
  memset(m, 0, sizeof *m);
  luaL_getmetatable(L, LBATCH_IDMAP);
  lua_setmetatable(L, -2);
  return 1;
}

const luaL_Reg lb_idmap_methods[] = {
  {"put", m_put}, {"get", m_get}, {"take", m_take}, {"count", m_count},
  {"keys", m_keys}, {"clear", m_clear}, {"has", m_has}, {NULL, NULL}
};

const luaL_Reg lb_idmap_meta[] = { {"__gc", m_clear}, {NULL, NULL} };
