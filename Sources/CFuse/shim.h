#ifndef VLOOP_CFUSE_SHIM_H
#define VLOOP_CFUSE_SHIM_H
#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <linux/falloc.h>

static inline void vl_fi_set_direct_io(struct fuse_file_info *fi, int on) { fi->direct_io = on ? 1 : 0; }
static inline void vl_fi_set_keep_cache(struct fuse_file_info *fi, int on) { fi->keep_cache = on ? 1 : 0; }
static inline void vl_fi_set_parallel_direct_writes(struct fuse_file_info *fi, int on) { (void)fi; (void)on; }
static inline int vl_fi_flags(const struct fuse_file_info *fi) { return fi->flags; }
static inline void vl_conn_set_max_read(struct fuse_conn_info *c, unsigned v) { c->max_read = v; }
static inline void vl_conn_set_max_write(struct fuse_conn_info *c, unsigned v) { c->max_write = v; }
static inline void vl_conn_want(struct fuse_conn_info *c, unsigned flag) { if (c->capable & flag) c->want |= flag; }
static inline void vl_conn_unwant(struct fuse_conn_info *c, unsigned flag) { c->want &= ~flag; }
static inline unsigned vl_cap_splice_write(void) { return FUSE_CAP_SPLICE_WRITE; }
static inline unsigned vl_cap_splice_move(void) { return FUSE_CAP_SPLICE_MOVE; }
static inline unsigned vl_cap_async_read(void) { return FUSE_CAP_ASYNC_READ; }
static inline unsigned vl_cap_writeback_cache(void) { return FUSE_CAP_WRITEBACK_CACHE; }
static inline int vl_falloc_punch_hole(void) { return FALLOC_FL_PUNCH_HOLE; }
static inline int vl_falloc_keep_size(void) { return FALLOC_FL_KEEP_SIZE; }
static inline int vl_falloc_zero_range(void) { return FALLOC_FL_ZERO_RANGE; }
static inline int vl_seek_data_whence(void) { return 3; } /* SEEK_DATA */
static inline int vl_seek_hole_whence(void) { return 4; } /* SEEK_HOLE */
#endif
