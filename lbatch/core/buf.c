/* Growable byte buffers, always NUL-terminated. */
#include <stdlib.h>
#include <string.h>
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
