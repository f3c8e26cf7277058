/* Growable byte buffers, always NUL-terminated; and large blocks that go
 * back to the system when freed. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE          /* mremap (Linux), whoever builds this file */
#endif
#include <stdlib.h>
#include <string.h>
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LB_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define LB_ASAN 1
#endif
/* mapped blocks on Linux; malloc's under AddressSanitizer, which guards
 * those only (make asan checks the window's buffers) */
#if defined(__linux__) && !defined(LB_ASAN)
#define LB_MAPPED 1
#include <sys/mman.h>
#endif
#include "core.h"

/* room for n more bytes and a NUL */
int lb_buf_reserve(buf *b, size_t n) {
  size_t cap = b->cap ? b->cap : 1024;
  char *q;
  if (b->len + n + 1 <= b->cap) return 1;
  while (cap < b->len + n + 1) cap *= 2;
  if (!(q = realloc(b->p, cap))) return 0;
  b->p = q;
  b->cap = cap;
  return 1;
}

int lb_buf_add(buf *b, const char *p, size_t n) {
  if (!lb_buf_reserve(b, n)) return 0;
  memcpy(b->p + b->len, p, n);
  b->len += n;
  b->p[b->len] = '\0';
  return 1;
}

void lb_buf_free(buf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

/* A large block (a join window's buffers: up to 32 MB each) mapped on its
 * own, not malloc'd, so that it goes back to the system when freed: glibc
 * raises its mmap threshold to the size of the last mapped block freed,
 * after which a block of that size comes from its heap, which keeps it.
 * A second join in one process kept its window's 17 MB after its end
 * (results_join_spec, "gives it back"), and a join whose groups each made
 * and freed a window kept 20 MB more from half-way on (78 MB against 58
 * MB at 10,000,000 by shard: docs/benchmarks.md). lb_big_realloc keeps
 * the contents; sizes in bytes, as given when the block was made. */
#ifdef LB_MAPPED
void *lb_big_realloc(void *p, size_t old, size_t size) {
  void *q;
  if (size == 0) { lb_big_free(p, old); return NULL; }
  q = p ? mremap(p, old, size, MREMAP_MAYMOVE) : mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return q == MAP_FAILED ? NULL : q;
}

void lb_big_free(void *p, size_t size) {
  if (p) munmap(p, size);
}
#else
void *lb_big_realloc(void *p, size_t old, size_t size) {
  (void)old;
  if (size == 0) { free(p); return NULL; }
  return realloc(p, size);
}

void lb_big_free(void *p, size_t size) {
  (void)size;
  free(p);
}
#endif
