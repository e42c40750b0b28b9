/*
 * tcp_repair — freeze, dump, restore and resume live TCP sockets with Linux TCP_REPAIR.
 *
 * Lifecycle of one connection moving from an exporting to an importing device:
 *
 *   exporting:  tcpr_freeze(fd)  ->  tcpr_dump(fd, &st, &queues)  ->  tcpr_release(fd)
 *                                  (or tcpr_resume(fd) if the move fails before commit)
 *   importing:  tcpr_restore(&st, queues, &fd)  ->  tcpr_activate_ack(fd, &st, raw, unsent, len)
 *
 * The caller must isolate the flow (drop its packets or remove its address) before
 * tcpr_freeze: a socket in repair mode keeps ACKing arriving data, and data ACKed after the
 * dump is lost for good.
 *
 * No policy, no printing, no allocation other than the queue buffer of tcpr_dump (free()
 * it). Every failing step returns its own negative code; errno holds the kernel's reason.
 */
#ifndef SESSMOB_TCP_REPAIR_H
#define SESSMOB_TCP_REPAIR_H

#include <stddef.h>
#include <stdint.h>

#define TCPR_STATE_VERSION 1

/* Bits of tcpr_state.flags: which optional parts are present / switched on. */
#define TCPR_F_TIMESTAMP 0x0001u /* timestamps negotiated; ts_val valid */
#define TCPR_F_SACK 0x0002u      /* SACK permitted */
#define TCPR_F_WSCALE 0x0004u    /* window scaling negotiated; snd/rcv_wscale valid */
#define TCPR_F_WINDOW 0x0008u    /* snd_wl1 .. rcv_wup valid (TCP_REPAIR_WINDOW) */
#define TCPR_F_V4MAPPED 0x0010u  /* AF_INET6 socket talking IPv4 through mapped addresses */
#define TCPR_F_FIN_UNSENT 0x0020u /* our FIN is queued behind never-sent data */
#define TCPR_F_NODELAY 0x0100u
#define TCPR_F_CORK 0x0200u
#define TCPR_F_KEEPALIVE 0x0400u
#define TCPR_F_NONBLOCK 0x0800u /* O_NONBLOCK on the file */
#define TCPR_F_ALL 0x0f3fu

/* Everything a faithful restore needs except the queue bytes. Plain data: safe to copy. */
struct tcpr_state {
	uint32_t version; /* TCPR_STATE_VERSION of the writer */
	uint32_t size;    /* sizeof(struct tcpr_state) of the writer */
	uint32_t flags;   /* TCPR_F_* */
	int32_t family;   /* AF_INET or AF_INET6 (socket domain) */
	uint32_t tcp_state;   /* TCP_ESTABLISHED, ... (linux/tcp.h numbering) */
	uint8_t src_addr[16]; /* network order; IPv4 in the first 4 bytes for AF_INET */
	uint8_t dst_addr[16];
	uint16_t src_port; /* host order */
	uint16_t dst_port;
	/* Sequence numbers and lengths count bytes only: a FIN (half-closed states) takes a
	 * sequence number but is kept out of them; tcp_state says which FINs exist. */
	uint32_t snd_seq;    /* sequence number after the last byte in the send queue */
	uint32_t rcv_seq;    /* sequence number after the last byte in the receive queue */
	uint32_t inq_len;    /* bytes in the receive queue */
	uint32_t outq_len;   /* bytes in the send queue: sent-but-unacked plus never sent */
	uint32_t unsent_len; /* never-sent tail of the send queue (SIOCOUTQNSD) */
	uint32_t mss_clamp;
	uint8_t snd_wscale;
	uint8_t rcv_wscale;
	uint8_t pad_[2];
	uint32_t ts_val; /* TCP_TIMESTAMP: current timestamp clock incl. per-flow offset */
	uint32_t snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup;
	int32_t keepidle, keepintvl, keepcnt;
	uint32_t user_timeout;
	int32_t sndbuf, rcvbuf; /* as getsockopt reports them (the kernel's doubled values) */
	int32_t buf_lock;       /* SO_BUF_LOCK: whether the user pinned the buffer sizes */
	uint32_t mark;
	int32_t tos; /* IP_TOS, or IPV6_TCLASS for native IPv6 */
	int32_t ttl; /* IP_TTL, or IPV6_UNICAST_HOPS for native IPv6 */
	char congestion[16];
};

/* Error codes: one per failing step. */
enum tcpr_error {
	TCPR_OK = 0,
	TCPR_E_NOT_SOCKET = -1,  /* fd is not a socket */
	TCPR_E_NOT_TCP = -2,     /* not a stream socket of IPPROTO_TCP */
	TCPR_E_FAMILY = -3,      /* neither AF_INET nor AF_INET6 (restore_into: not the state's) */
	TCPR_E_MPTCP = -4,       /* MPTCP (protocol 262) cannot be repaired */
	TCPR_E_STATE = -5,       /* TCP state cannot be repaired (LISTEN, TIME_WAIT, ...) */
	TCPR_E_REPAIR_ON = -6,   /* setsockopt(TCP_REPAIR, 1) */
	TCPR_E_REPAIR_OFF = -7,  /* setsockopt(TCP_REPAIR, 0) */
	TCPR_E_INFO = -8,        /* getsockopt(TCP_INFO) */
	TCPR_E_NAME = -9,        /* getsockname / getpeername */
	TCPR_E_QUEUE_SEL = -10,  /* setsockopt(TCP_REPAIR_QUEUE): EPERM means not frozen */
	TCPR_E_QUEUE_SEQ = -11,  /* get/set TCP_QUEUE_SEQ */
	TCPR_E_QUEUE_LEN = -12,  /* SIOCINQ / SIOCOUTQ / SIOCOUTQNSD */
	TCPR_E_PEEK = -13,       /* reading queue bytes changed size or failed */
	TCPR_E_MSS = -14,        /* TCP_MAXSEG */
	TCPR_E_TIMESTAMP = -15,  /* TCP_TIMESTAMP */
	TCPR_E_WINDOW = -16,     /* TCP_REPAIR_WINDOW */
	TCPR_E_SOCKOPT = -17,    /* an ordinary socket option (NODELAY, keepalive, buffers, ...) */
	TCPR_E_NOMEM = -18,      /* queue buffer allocation */
	TCPR_E_VERSION = -19,    /* state struct of an unknown version or size */
	TCPR_E_INVALID = -20,    /* inconsistent state struct */
	TCPR_E_SOCKET = -21,     /* socket() */
	TCPR_E_BIND = -22,       /* bind() of the restored socket */
	TCPR_E_CONNECT = -23,    /* connect() in repair mode */
	TCPR_E_OPTIONS = -24,    /* TCP_REPAIR_OPTIONS */
	TCPR_E_BUF = -25,        /* SO_SNDBUFFORCE / SO_RCVBUFFORCE / SO_BUF_LOCK */
	TCPR_E_RECVQ = -26,      /* replaying the receive queue */
	TCPR_E_SENDQ = -27,      /* replaying the sent-but-unacked data */
	TCPR_E_UNSENT = -28,     /* sending the never-sent data after repair off */
	TCPR_E_CLOSE = -29,      /* close() */
	TCPR_E_ACK = -30,        /* window-announcing ACK not sent (the socket IS active) */
	TCPR_E_FIN = -31,        /* re-creating a FIN: shutdown() or injecting the peer's FIN */
};

/* Name of the step an error code stands for ("freeze: not TCP", ...). Never NULL. */
const char *tcpr_strerror(int code);

/* Check that fd is a repairable TCP socket and switch repair mode on. Repairable states:
 * ESTABLISHED and the half-closed FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING. On
 * refusal the socket is left untouched. */
int tcpr_freeze(int fd);

/* Dump a frozen socket. st->size must hold the caller's sizeof(struct tcpr_state). On
 * success *queues is a malloc'ed buffer with inq_len receive-queue bytes followed by
 * outq_len send-queue bytes (NULL when both are empty); the caller frees it. */
int tcpr_dump(int fd, struct tcpr_state *st, uint8_t **queues);

/* Build a new socket in the calling thread's network namespace from st and the queue bytes
 * laid out as tcpr_dump returns them. The socket is left in repair mode; the never-sent
 * tail is NOT queued (pass it to tcpr_activate). On success *fd_out holds the new fd. */
int tcpr_restore(const struct tcpr_state *st, const uint8_t *queues, int *fd_out);
/* tcpr_restore into a socket the caller made — socket(st->family, SOCK_STREAM, 0), nothing
 * else done to it — so that its descriptor can be handed out (e.g. to the importing
 * application) before the state arrives. TCPR_E_FAMILY if the socket is of the other family.
 * On failure the socket may be half-built in repair mode: release it (silent). */
int tcpr_restore_into(int fd, const struct tcpr_state *st, const uint8_t *queues);

/* Leave repair mode on a restored socket, then send the never-sent tail of the send queue
 * with ordinary sends (len may be 0). Without the state, a send buffer that restore enlarged
 * for the replay stays that size: tcpr_activate_ack gives it back. */
int tcpr_activate(int fd, const uint8_t *unsent, size_t len);

/* As tcpr_activate, and between leaving repair mode and sending the never-sent bytes, send
 * one pure ACK as the restored socket would (seq = its snd_nxt, ack = its rcv_nxt, the
 * receive window it believes it advertised, a current timestamp) through raw_fd, a
 * socket(AF_INET or AF_INET6, SOCK_RAW, IPPROTO_RAW) of the flow's IP version in the same
 * network namespace. Leaving repair mode only sends a window probe with an old sequence
 * number, which the peer answers with a duplicate ACK without updating its view of our
 * window: if that view was stale (an ACK lost in the freeze, a zero window), the peer would
 * wait for its own zero-window probe timer. st is the state the socket was restored from.
 * TCPR_E_ACK means the socket is active and its bytes are sent; only the ACK failed.
 *
 * Half-closed states are finished here: a FIN the peer had sent is injected into the
 * socket's own stack as a segment from the peer through raw_fd (so the session address must
 * already receive on this device), an ACK of our FIN likewise for FIN_WAIT2, and our own
 * FIN, if it had not been transmitted or the state is LAST_ACK, is sent with shutdown()
 * after the never-sent bytes. Last, a send buffer that restore enlarged for the send queue's
 * replay gets the size it had (st->sndbuf), autotuned again unless it had been pinned. */
int tcpr_activate_ack(int fd, const struct tcpr_state *st, int raw_fd, const uint8_t *unsent,
		      size_t len);

/* Batches: the same operations over n sockets in one call, so a session's connections cost
 * no per-socket crossing into C. Each socket gets its own code in rcs[i] and, where it failed,
 * its errno in errs[i]; a failure does not stop the others. Return the number that failed. */
size_t tcpr_freeze_many(const int *fds, size_t n, int *rcs, int *errs);
/* states is an array of the caller's struct (sizes are set here); queues[i] as for tcpr_dump. */
size_t tcpr_dump_many(const int *fds, size_t n, struct tcpr_state *states, uint8_t **queues,
		      int *rcs, int *errs);
/* fds[i] is -1 where restore failed. */
size_t tcpr_restore_many(const struct tcpr_state *const *states, const uint8_t *const *queues,
			 size_t n, int *fds, int *rcs, int *errs);
/* tcpr_restore_into for each fds[i]; fresh-socket defaults are read once per batch. */
size_t tcpr_restore_into_many(const int *fds, const struct tcpr_state *const *states,
			      const uint8_t *const *queues, size_t n, int *rcs, int *errs);
size_t tcpr_release_many(const int *fds, size_t n, int *rcs, int *errs);
/* tcpr_activate_ack for each socket; raw4/raw6 are the IPPROTO_RAW sockets per IP version.
 * A window ACK that could not be sent does not count as a failure (the socket is active). */
size_t tcpr_activate_many(const int *fds, const struct tcpr_state *const *states, int raw4,
			  int raw6, const uint8_t *const *unsent, const size_t *lens, size_t n,
			  int *rcs, int *errs);

/* Undo tcpr_freeze on the exporting side after a failed move: repair mode off. */
int tcpr_resume(int fd);

/* Close a frozen socket silently (repair mode: no FIN, no RST). If repair mode cannot be
 * switched on, the fd is left open (closing it would send FIN or RST). */
int tcpr_release(int fd);

#endif
