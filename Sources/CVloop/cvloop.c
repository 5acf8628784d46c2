#define _GNU_SOURCE
#include "cvloop.h"
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <sys/resource.h>
#include <malloc.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <linux/magic.h>

int vl_ofd_lock(int fd, int64_t start, int64_t len, int exclusive, int unlock) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    fl.l_type = unlock ? F_UNLCK : (exclusive ? F_WRLCK : F_RDLCK);
    if (fcntl(fd, F_OFD_SETLK, &fl) == -1) return -errno;
    return 0;
}

int vl_ofd_test(int fd, int64_t start, int64_t len, int exclusive, int32_t *pid_out) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    fl.l_type = exclusive ? F_WRLCK : F_RDLCK;
    if (fcntl(fd, F_OFD_GETLK, &fl) == -1) return -errno;
    if (fl.l_type == F_UNLCK) return 0;
    if (pid_out) *pid_out = fl.l_pid;
    return 1;
}

int vl_punch_hole(int fd, int64_t off, int64_t len) {
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) == -1) return -errno;
    return 0;
}

int vl_zero_range(int fd, int64_t off, int64_t len, int keep_size) {
    if (fallocate(fd, FALLOC_FL_ZERO_RANGE | (keep_size ? FALLOC_FL_KEEP_SIZE : 0), off, len) == -1) return -errno;
    return 0;
}

int vl_fallocate(int fd, int64_t off, int64_t len) {
    if (fallocate(fd, 0, off, len) == -1) return -errno;
    return 0;
}

int64_t vl_seek_data(int fd, int64_t off) {
    off_t r = lseek(fd, off, SEEK_DATA);
    return r == -1 ? -errno : r;
}

int64_t vl_seek_hole(int fd, int64_t off) {
    off_t r = lseek(fd, off, SEEK_HOLE);
    return r == -1 ? -errno : r;
}

int vl_o_direct(void) { return O_DIRECT; }

long vl_inflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len) {
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (inflateInit2(&zs, -15) != Z_OK) return -1;
    zs.next_in = (Bytef *)src;
    zs.avail_in = (uInt)src_len;
    zs.next_out = (Bytef *)dst;
    zs.avail_out = (uInt)dst_len;
    int ret = inflate(&zs, Z_FINISH);
    long produced = (long)(dst_len - zs.avail_out);
    inflateEnd(&zs);
    /* Compressed clusters are padded to sector boundaries: Z_BUF_ERROR with a full
       output buffer, or Z_STREAM_END, both mean the cluster is complete. */
    if (ret == Z_STREAM_END || (ret == Z_BUF_ERROR && zs.avail_out == 0) || (ret == Z_OK && zs.avail_out == 0)) return produced;
    return -1;
}

long vl_deflate_raw(const void *src, size_t src_len, void *dst, size_t dst_cap, int level) {
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (deflateInit2(&zs, level, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) return 0;
    zs.next_in = (Bytef *)src;
    zs.avail_in = (uInt)src_len;
    zs.next_out = (Bytef *)dst;
    zs.avail_out = (uInt)dst_cap;
    int ret = deflate(&zs, Z_FINISH);
    long out = (long)(dst_cap - zs.avail_out);
    deflateEnd(&zs);
    if (ret != Z_STREAM_END) return 0;
    return out;
}

long vl_zstd_decompress_stream(const void *src, size_t src_len, void *dst, size_t dst_len) {
    /* qcow2 stores zstd clusters as one or more frames padded with junk to a sector
       boundary; decompress with the streaming API until the output is full. */
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    if (!dctx) return -1;
    ZSTD_inBuffer in = { src, src_len, 0 };
    ZSTD_outBuffer out = { dst, dst_len, 0 };
    long result = -1;
    while (out.pos < out.size) {
        size_t r = ZSTD_decompressStream(dctx, &out, &in);
        if (ZSTD_isError(r)) break;
        if (in.pos == in.size && out.pos < out.size && r != 0) break;
        if (in.pos == in.size && r == 0) break;
    }
    if (out.pos == out.size) result = (long)out.pos;
    ZSTD_freeDCtx(dctx);
    return result;
}

long vl_zstd_compress(const void *src, size_t src_len, void *dst, size_t dst_cap, int level) {
    size_t r = ZSTD_compress(dst, dst_cap, src, src_len, level);
    if (ZSTD_isError(r)) return 0;
    return (long)r;
}

long vl_thread_voluntary_switches(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) != 0) return 0;
    return ru.ru_nvcsw;
}

int vl_mutex_init_adaptive(pthread_mutex_t *mutex) {
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
    int r = pthread_mutex_init(mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    return r;
}

static __thread int vl_nowait_flag;
static __thread void *vl_lookup_lock;

void *vl_lookup_current(void) { return vl_lookup_lock; }
void vl_lookup_set_current(void *lock) { vl_lookup_lock = lock; }

int vl_nowait_get(void) { return vl_nowait_flag; }
void vl_nowait_set(int on) { vl_nowait_flag = on; }

long vl_pread_nowait(int fd, void *buf, size_t len, int64_t off) {
    struct iovec io = { buf, len };
    ssize_t n = preadv2(fd, &io, 1, (off_t)off, RWF_NOWAIT);
    return n < 0 ? -errno : (long)n;
}

int vl_fd_in_memory(int fd) {
    struct statfs sf;
    if (fstatfs(fd, &sf) != 0) return 0;
    return sf.f_type == TMPFS_MAGIC || sf.f_type == RAMFS_MAGIC;
}

int vl_malloc_arenas(int n) { return mallopt(M_ARENA_MAX, n); }

int vl_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

int vl_spawn_close_from(posix_spawn_file_actions_t *actions, int lowfd) {
    return posix_spawn_file_actions_addclosefrom_np(actions, lowfd);
}
