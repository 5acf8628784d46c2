#ifndef CVLOOP_H
#define CVLOOP_H
#include <stdint.h>
#include <sys/types.h>
#include <pthread.h>
#include <spawn.h>
#include <zlib.h>
#include <zstd.h>

/* Open file description (OFD) byte-range locks, as QEMU uses them. */
/* Returns 0 on success, -errno on failure. */
int vl_ofd_lock(int fd, int64_t start, int64_t len, int exclusive, int unlock);
/* Returns 1 if a conflicting lock exists (held by another open file description),
   0 if none, -errno on error. On conflict *pid_out is the holder's pid or -1. */
int vl_ofd_test(int fd, int64_t start, int64_t len, int exclusive, int32_t *pid_out);

int vl_punch_hole(int fd, int64_t off, int64_t len);
int vl_zero_range(int fd, int64_t off, int64_t len, int keep_size);
int vl_fallocate(int fd, int64_t off, int64_t len);
/* SEEK_DATA / SEEK_HOLE: returns offset, or -errno (-ENXIO past the last data). */
int64_t vl_seek_data(int fd, int64_t off);
int64_t vl_seek_hole(int fd, int64_t off);
/// pipe2(O_CLOEXEC): both ends closed on exec. 0, or -1 with errno.
int vl_pipe_cloexec(int fds[2]);
/// posix_spawn_file_actions_addclosefrom_np: the child closes every descriptor from lowfd on.
int vl_spawn_close_from(posix_spawn_file_actions_t *actions, int lowfd);
int vl_o_direct(void);

/* Raw deflate (no zlib header), as qcow/qcow2 store compressed clusters. */
/* Returns bytes produced into dst, or -1 on error. dst_len must be the full cluster. */
long vl_inflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len);
/* Returns compressed length, or 0 if it does not fit in dst_cap. */
long vl_deflate_raw(const void *src, size_t src_len, void *dst, size_t dst_cap, int level);
long vl_zstd_decompress_stream(const void *src, size_t src_len, void *dst, size_t dst_len);
long vl_zstd_compress(const void *src, size_t src_len, void *dst, size_t dst_cap, int level);

/* A mutex that spins briefly before sleeping (PTHREAD_MUTEX_ADAPTIVE_NP): for locks
   held for a few instructions by many threads. */
int vl_mutex_init_adaptive(pthread_mutex_t *mutex);

/* Voluntary context switches of the calling thread so far (it blocked: I/O, a lock). */
long vl_thread_voluntary_switches(void);

/* The calling thread's "do not wait" mode (see NonBlocking.swift). */
int vl_nowait_get(void);
void vl_nowait_set(int on);
/* preadv2(RWF_NOWAIT): bytes read, or -errno (-EAGAIN: not in the page cache,
   -EOPNOTSUPP: the file system cannot tell). */
long vl_pread_nowait(int fd, void *buf, size_t len, int64_t off);
/* The metadata lock whose lookup section the calling thread is in (MetadataLock.swift),
   or NULL. */
void *vl_lookup_current(void);
void vl_lookup_set_current(void *lock);
/* mallopt(M_ARENA_MAX, n): at most n malloc arenas for all threads. */
int vl_malloc_arenas(int n);
/* 1 if the file lives in memory (tmpfs, ramfs): reading it never waits for a device. */
int vl_fd_in_memory(int fd);
#endif
