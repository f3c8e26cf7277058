/* The system calls a command and a host loop need, without a shell or
 * another module:
 *   core.now()            monotonic seconds
 *   core.sleep(s)         pace a loop (a frame)
 *   core.mkdir(path)      like mkdir -p
 *   core.fsync(path)      a file's (or a directory's) bytes on the disk
 *   core.disk_free(path)  bytes an unprivileged writer may still use
 *   core.lock(path)       one owner of a directory: an exclusive flock
 *   core.trap(), core.caught()  SIGINT and SIGTERM as a flag
 *   core.version()        libcurl's version, and whether it speaks HTTP/2 */
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/file.h>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>
#include "core.h"

double lb_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int lb_now(lua_State *L) {
  lua_pushnumber(L, lb_now_ms() / 1e3);
  return 1;
}

/* sleep(seconds): for hosts and examples that pace a loop (a frame) */
int lb_sleep(lua_State *L) {
  double s = luaL_checknumber(L, 1);
  struct timespec ts;
  if (s <= 0) return 0;
  ts.tv_sec = (time_t)s;
  ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
  return 0;
}

/* a system call's failure as these functions return it: nil, "what path:
 * the OS's reason" ("path: reason" when what is NULL) */
static int os_fail(lua_State *L, const char *what, const char *path, int e) {
  lua_pushnil(L);
  if (what) lua_pushfstring(L, "%s %s: %s", what, path, strerror(e));
  else lua_pushfstring(L, "%s: %s", path, strerror(e));
  return 2;
}

/* core.disk_free(path) -> bytes an unprivileged writer may still use on
 * path's file system; or nil and the OS's reason */
int lb_disk_free(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  struct statvfs v;
  if (statvfs(path, &v) != 0) return os_fail(L, NULL, path, errno);
  lua_pushnumber(L, (lua_Number)v.f_bavail * (lua_Number)v.f_frsize);
  return 1;
}

/* fsync(path): what was written to the file (or the names in the
 * directory) reaches the disk before the call returns. true, or nil, message */
int lb_fsync(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int fd = open(path, O_RDONLY), ok = fd >= 0 && fsync(fd) == 0;
  int e = errno;
  if (fd >= 0) close(fd);
  if (!ok) return os_fail(L, "fsync", path, e);
  lua_pushboolean(L, 1);
  return 1;
}

/* mkdir(path): like mkdir -p, without a shell. true, or nil, message */
int lb_mkdir(lua_State *L) {
  size_t n;
  const char *path = luaL_checklstring(L, 1, &n);
  char *p = malloc(n + 1), *q;
  int ok = 1;
  if (!p) return luaL_error(L, "out of memory");
  memcpy(p, path, n + 1);
  for (q = n ? p + 1 : p; ok; q++) {   /* "": no component to skip (and no p[1]) */
    if (*q == '/' || *q == '\0') {
      char c = *q;
      *q = '\0';
      if (mkdir(p, 0777) != 0 && errno != EEXIST) ok = 0;
      *q = c;
      if (c == '\0') break;
    }
  }
  free(p);
  if (!ok) return os_fail(L, "mkdir", path, errno);
  lua_pushboolean(L, 1);
  return 1;
}

/* trap(): SIGINT and SIGTERM only set a flag (and interrupt a wait in
 * step), so a command can stop cleanly: close its client (which removes
 * its temp files) and exit. caught(): the signal caught, or nil. */
static volatile sig_atomic_t caught_signal = 0;

static void on_signal(int sig) { caught_signal = sig; }

int lb_trap(lua_State *L) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;   /* no SA_RESTART: epoll_wait returns EINTR */
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  (void)L;
  return 0;
}

int lb_caught(lua_State *L) {
  if (!caught_signal) return 0;
  lua_pushinteger(L, caught_signal);
  return 1;
}

int lb_version(lua_State *L) {
  curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
  lua_pushstring(L, v->version);
  lua_pushboolean(L, (v->features & CURL_VERSION_HTTP2) != 0);
  return 2;
}

/* lock(path): an exclusive flock(2) on path (opened O_CLOEXEC|O_NOFOLLOW,
 * created 0644), without waiting. Held, the file holds its holder, one
 * JSON line {"pid", "host", "started"}, and the lock object is returned
 * (lock:release(...) frees it and returns its arguments; the kernel frees
 * it on any death, the collector when the object is dropped). Held by
 * another: nil, "busy", what the file says of its holder. Else nil, "io",
 * the OS's reason. */
#define LBATCH_LOCK "lbatch.core.lock"

static int lock_fail(lua_State *L, const char *path, const char *what) {
  lua_pushnil(L);
  lua_pushliteral(L, "io");
  lua_pushfstring(L, "%s %s: %s", what, path, strerror(errno));
  return 3;
}

static void lock_holder(char *out, size_t n) {
  char host[256] = "", date[32] = "";
  time_t t = time(NULL);
  struct tm tm;
  size_t i, j = 0;
  if (gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
  for (i = 0; host[i] && j < sizeof host; i++)   /* only what needs no JSON escape */
    if (host[i] != '"' && host[i] != '\\' && (unsigned char)host[i] >= 0x20) host[j++] = host[i];
  host[j] = '\0';
  if (gmtime_r(&t, &tm)) strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tm);
  snprintf(out, n, "{\"pid\":%ld,\"host\":\"%s\",\"started\":\"%s\"}\n", (long)getpid(), host, date);
}

int lb_lock(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  char text[512];
  int *ud, fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) return lock_fail(L, path, "cannot open");
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    ssize_t got;
    if (e != EWOULDBLOCK) { close(fd); errno = e; return lock_fail(L, path, "cannot lock"); }
    got = pread(fd, text, sizeof text - 1, 0);
    close(fd);
    text[got > 0 ? got : 0] = '\0';
    lua_pushnil(L);
    lua_pushliteral(L, "busy");
    lua_pushstring(L, text);
    return 3;
  }
  lock_holder(text, sizeof text);
  if (ftruncate(fd, 0) != 0 || pwrite(fd, text, strlen(text), 0) != (ssize_t)strlen(text)) {
    int e = errno;
    close(fd);
    errno = e;
    return lock_fail(L, path, "cannot write");
  }
  ud = (int *)lua_newuserdata(L, sizeof(int));
  *ud = fd;
  luaL_getmetatable(L, LBATCH_LOCK);
  lua_setmetatable(L, -2);
  return 1;
}

/* lock:release(...): the lock freed (its file emptied: nobody holds it);
 * returns its arguments. Again: nothing. */
static int lock_release(lua_State *L) {
  int *ud = (int *)luaL_checkudata(L, 1, LBATCH_LOCK);
  if (*ud >= 0) {
    if (ftruncate(*ud, 0) != 0) { /* the holder stays written: harmless */ }
    close(*ud);
    *ud = -1;
  }
  return lua_gettop(L) - 1;
}

static int lock_gc(lua_State *L) {
  int *ud = (int *)luaL_checkudata(L, 1, LBATCH_LOCK);
  if (*ud >= 0) { close(*ud); *ud = -1; }
  return 0;
}

void lb_lock_register(lua_State *L) {
  static const luaL_Reg methods[] = { {"release", lock_release}, {NULL, NULL} };
  luaL_newmetatable(L, LBATCH_LOCK);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, lock_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
}

/* dumpable([on]): with a boolean, sets whether the process may leave a
 * core dump (and be traced, its /proc/PID/mem read) by PR_SET_DUMPABLE:
 * false for a process that holds an API key. Returns whether it is
 * dumpable now, or nil and the OS's reason (not on Linux: "unsupported"). */
#ifdef __linux__
#include <sys/prctl.h>
#endif
int lb_dumpable(lua_State *L) {
#ifdef __linux__
  int now;
  if (!lua_isnoneornil(L, 1) && prctl(PR_SET_DUMPABLE, lua_toboolean(L, 1) ? 1 : 0, 0, 0, 0) != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "prctl(PR_SET_DUMPABLE): %s", strerror(errno));
    return 2;
  }
  now = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
  lua_pushboolean(L, now == 1);
  return 1;
#else
  lua_pushnil(L);
  lua_pushliteral(L, "dumpable: unsupported on this system");
  return 2;
#endif
}

/* remove_parts(dir): removes the files of dir named NAME.part-XXXXXX, the
 * temp files of downloads (xfer.c) that a killed process left; returns how
 * many. Run under the directory's lock, so no live download is among them.
 * A readdir, not a shell: it runs inside step(), where a fork would cost
 * the host its frame. */
int lb_remove_parts(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  DIR *d = opendir(path);
  struct dirent *e;
  lua_Integer n = 0;
  if (d) {
    while ((e = readdir(d)) != NULL) {
      size_t len = strlen(e->d_name);
      if (len > 12 && memcmp(e->d_name + len - 12, ".part-", 6) == 0 && unlinkat(dirfd(d), e->d_name, 0) == 0) n++;
    }
    closedir(d);
  }
  lua_pushinteger(L, n);
  return 1;
}
