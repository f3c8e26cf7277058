/* Byte scanners (scan.c), also built alone by the fuzz harness. */
#ifndef LBATCH_SCAN_H
#define LBATCH_SCAN_H

#include <stddef.h>

enum { LB_FOUND = 0, LB_ABSENT = -1, LB_COMPLEX = -2 };

long lb_utf8_invalid(const unsigned char *s, size_t n);
int lb_json_string(const char *s, size_t n, const char *key, size_t klen, size_t *off, size_t *len);
int lb_header_value(const char *p, size_t n, const char *name, const char **v, size_t *vlen);

#endif
