"""cffi builder for csrc/tcp_repair.c: `cffi_modules` in setup.py names this file."""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.relpath(os.path.join(HERE, "..", "..", "csrc"))

ffi = FFI()
# Mirrors csrc/tcp_repair.h; keep the two in step.
ffi.cdef(
    """
    #define TCPR_STATE_VERSION ...
    struct tcpr_state {
        uint32_t version; uint32_t size; uint32_t flags; int32_t family; uint32_t tcp_state;
        uint8_t src_addr[16]; uint8_t dst_addr[16]; uint16_t src_port; uint16_t dst_port;
        uint32_t snd_seq; uint32_t rcv_seq; uint32_t inq_len; uint32_t outq_len;
        uint32_t unsent_len; uint32_t mss_clamp; uint8_t snd_wscale; uint8_t rcv_wscale;
        uint32_t ts_val; uint32_t snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup;
        int32_t keepidle, keepintvl, keepcnt; uint32_t user_timeout;
        int32_t sndbuf, rcvbuf; int32_t buf_lock; uint32_t mark; int32_t tos; int32_t ttl;
        char congestion[16];
        ...;
    };
    const char *tcpr_strerror(int code);
    int tcpr_freeze(int fd);
    int tcpr_dump(int fd, struct tcpr_state *st, uint8_t **queues);
    int tcpr_restore(const struct tcpr_state *st, const uint8_t *queues, int *fd_out);
    int tcpr_restore_into(int fd, const struct tcpr_state *st, const uint8_t *queues);
    int tcpr_activate(int fd, const uint8_t *unsent, size_t len);
    int tcpr_activate_ack(int fd, const struct tcpr_state *st, int raw_fd,
                          const uint8_t *unsent, size_t len);
    int tcpr_resume(int fd);
    size_t tcpr_freeze_many(const int *fds, size_t n, int *rcs, int *errs);
    size_t tcpr_dump_many(const int *fds, size_t n, struct tcpr_state *states,
                          uint8_t **queues, int *rcs, int *errs);
    size_t tcpr_restore_many(const struct tcpr_state *const *states,
                             const uint8_t *const *queues, size_t n, int *fds, int *rcs, int *errs);
    size_t tcpr_restore_into_many(const int *fds, const struct tcpr_state *const *states,
                                  const uint8_t *const *queues, size_t n, int *rcs, int *errs);
    size_t tcpr_release_many(const int *fds, size_t n, int *rcs, int *errs);
    size_t tcpr_activate_many(const int *fds, const struct tcpr_state *const *states,
                              int raw4, int raw6, const uint8_t *const *unsent,
                              const size_t *lens, size_t n, int *rcs, int *errs);
    int tcpr_release(int fd);
    void free(void *);
    """
)
ffi.set_source(
    "sessmob._native._tcp_repair",
    '#include "tcp_repair.h"\n#include <stdlib.h>',
    sources=[os.path.join(CSRC, "tcp_repair.c")],
    include_dirs=[CSRC],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
