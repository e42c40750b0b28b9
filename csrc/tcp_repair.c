/*
 * tcp_repair.c — see tcp_repair.h. The kernel facts this relies on (order of steps, what
 * needs repair mode, buffer sizing) are in docs/tcp_repair.md.
 */
#define _GNU_SOURCE
#include "tcp_repair.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sock_diag.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip6.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef SO_BUF_LOCK
#define SO_BUF_LOCK 72
#endif
#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif

/* Kernel defaults: options holding them are not set again on restore (each setsockopt is
 * a syscall inside the freeze window). */
#define DEF_KEEPIDLE 7200
#define DEF_KEEPINTVL 75
#define DEF_KEEPCNT 9
#define DEF_TTL 64
#define SOCK_BUF_LOCK_MASK 3

const char *tcpr_strerror(int code)
{
	switch (code) {
	case TCPR_OK: return "ok";
	case TCPR_E_NOT_SOCKET: return "not a socket";
	case TCPR_E_NOT_TCP: return "not a TCP stream socket";
	case TCPR_E_FAMILY: return "address family: not AF_INET or AF_INET6, or not the state's";
	case TCPR_E_MPTCP: return "MPTCP sockets (protocol 262) cannot be repaired";
	case TCPR_E_STATE: return "TCP state cannot be repaired";
	case TCPR_E_REPAIR_ON: return "setsockopt(TCP_REPAIR, on)";
	case TCPR_E_REPAIR_OFF: return "setsockopt(TCP_REPAIR, off)";
	case TCPR_E_INFO: return "getsockopt(TCP_INFO)";
	case TCPR_E_NAME: return "getsockname/getpeername";
	case TCPR_E_QUEUE_SEL: return "setsockopt(TCP_REPAIR_QUEUE) (socket not frozen?)";
	case TCPR_E_QUEUE_SEQ: return "TCP_QUEUE_SEQ";
	case TCPR_E_QUEUE_LEN: return "queue length ioctl (SIOCINQ/SIOCOUTQ/SIOCOUTQNSD)";
	case TCPR_E_PEEK: return "reading queue bytes";
	case TCPR_E_MSS: return "TCP_MAXSEG";
	case TCPR_E_TIMESTAMP: return "TCP_TIMESTAMP";
	case TCPR_E_WINDOW: return "TCP_REPAIR_WINDOW";
	case TCPR_E_SOCKOPT: return "socket option";
	case TCPR_E_NOMEM: return "out of memory for the queue buffer";
	case TCPR_E_VERSION: return "state struct of unknown version or size";
	case TCPR_E_INVALID: return "inconsistent state";
	case TCPR_E_SOCKET: return "socket()";
	case TCPR_E_BIND: return "bind() of the restored socket";
	case TCPR_E_CONNECT: return "connect() in repair mode";
	case TCPR_E_OPTIONS: return "TCP_REPAIR_OPTIONS";
	case TCPR_E_BUF: return "buffer size (SO_SNDBUFFORCE/SO_RCVBUFFORCE/SO_BUF_LOCK)";
	case TCPR_E_RECVQ: return "replaying the receive queue";
	case TCPR_E_SENDQ: return "replaying the sent-but-unacknowledged data";
	case TCPR_E_UNSENT: return "sending the never-sent data";
	case TCPR_E_CLOSE: return "close()";
	case TCPR_E_ACK: return "sending the window-announcing ACK";
	case TCPR_E_FIN: return "re-creating a FIN (shutdown or injected peer FIN)";
	default: return "unknown error";
	}
}

static int get_int(int fd, int level, int name, int *val)
{
	socklen_t len = sizeof(*val);
	return getsockopt(fd, level, name, val, &len);
}

static int set_int(int fd, int level, int name, int val)
{
	return setsockopt(fd, level, name, &val, sizeof(val));
}

#define TCPF(s) (1u << (s))
/* States in which we sent a FIN / received the peer's FIN. */
#define OUR_FIN (TCPF(TCP_FIN_WAIT1) | TCPF(TCP_FIN_WAIT2) | TCPF(TCP_LAST_ACK) | TCPF(TCP_CLOSING))
#define PEER_FIN (TCPF(TCP_CLOSE_WAIT) | TCPF(TCP_LAST_ACK) | TCPF(TCP_CLOSING))

static int in_states(uint32_t state, uint32_t set)
{
	return state < 32 && (TCPF(state) & set);
}

static int repairable_state(uint32_t state)
{
	return in_states(state, TCPF(TCP_ESTABLISHED) | OUR_FIN | PEER_FIN);
}

int tcpr_freeze(int fd)
{
	int type, proto;
	struct tcp_info ti;
	socklen_t len;

	if (get_int(fd, SOL_SOCKET, SO_TYPE, &type) < 0)
		return errno == ENOTSOCK || errno == EBADF ? TCPR_E_NOT_SOCKET : TCPR_E_SOCKOPT;
	if (get_int(fd, SOL_SOCKET, SO_PROTOCOL, &proto) < 0)
		return TCPR_E_SOCKOPT;
	if (proto == IPPROTO_MPTCP) {
		errno = ENOPROTOOPT;
		return TCPR_E_MPTCP;
	}
	if (type != SOCK_STREAM || proto != IPPROTO_TCP) {
		errno = EPROTONOSUPPORT;
		return TCPR_E_NOT_TCP;
	}
	len = sizeof(ti);
	memset(&ti, 0, sizeof(ti));
	if (getsockopt(fd, SOL_TCP, TCP_INFO, &ti, &len) < 0)
		return TCPR_E_INFO;
	if (!repairable_state(ti.tcpi_state)) {
		errno = EINVAL;
		return TCPR_E_STATE;
	}
	if (set_int(fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON) < 0)
		return TCPR_E_REPAIR_ON;
	return TCPR_OK;
}

static int is_v4mapped(const struct in6_addr *a)
{
	return IN6_IS_ADDR_V4MAPPED(a);
}

static int dump_names(int fd, struct tcpr_state *st)
{
	struct sockaddr_storage src, dst;
	socklen_t slen = sizeof(src), dlen = sizeof(dst);

	if (getsockname(fd, (struct sockaddr *)&src, &slen) < 0 ||
	    getpeername(fd, (struct sockaddr *)&dst, &dlen) < 0)
		return TCPR_E_NAME;
	st->family = src.ss_family;
	if (src.ss_family == AF_INET) {
		const struct sockaddr_in *s = (void *)&src, *d = (void *)&dst;
		memcpy(st->src_addr, &s->sin_addr, 4);
		memcpy(st->dst_addr, &d->sin_addr, 4);
		st->src_port = ntohs(s->sin_port);
		st->dst_port = ntohs(d->sin_port);
	} else if (src.ss_family == AF_INET6) {
		const struct sockaddr_in6 *s = (void *)&src, *d = (void *)&dst;
		memcpy(st->src_addr, &s->sin6_addr, 16);
		memcpy(st->dst_addr, &d->sin6_addr, 16);
		st->src_port = ntohs(s->sin6_port);
		st->dst_port = ntohs(d->sin6_port);
		if (is_v4mapped(&s->sin6_addr))
			st->flags |= TCPR_F_V4MAPPED;
	} else {
		errno = EAFNOSUPPORT;
		return TCPR_E_FAMILY;
	}
	return TCPR_OK;
}

/* Select a repair queue, read its sequence number and peek its len bytes into buf. */
static int dump_queue(int fd, int queue, uint32_t *seq, uint8_t *buf, uint32_t len)
{
	int val;
	ssize_t got;

	if (set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, queue) < 0)
		return TCPR_E_QUEUE_SEL;
	if (get_int(fd, SOL_TCP, TCP_QUEUE_SEQ, &val) < 0)
		return TCPR_E_QUEUE_SEQ;
	*seq = (uint32_t)val;
	if (len == 0)
		return TCPR_OK;
	/* Ask for one byte more: a queue that changed since the ioctl is an error, not a
	 * silently truncated dump. */
	got = recv(fd, buf, (size_t)len + 1, MSG_PEEK | MSG_DONTWAIT);
	if (got < 0)
		return TCPR_E_PEEK;
	if ((size_t)got != len) {
		errno = EAGAIN;
		return TCPR_E_PEEK;
	}
	return TCPR_OK;
}

static int dump_options(int fd, struct tcpr_state *st)
{
	int v, mapped_or_v4 = st->family == AF_INET || (st->flags & TCPR_F_V4MAPPED);
	uint32_t meminfo[SK_MEMINFO_VARS];
	socklen_t len;

	if (get_int(fd, SOL_TCP, TCP_NODELAY, &v) < 0)
		return TCPR_E_SOCKOPT;
	if (v)
		st->flags |= TCPR_F_NODELAY;
	if (get_int(fd, SOL_TCP, TCP_CORK, &v) < 0)
		return TCPR_E_SOCKOPT;
	if (v)
		st->flags |= TCPR_F_CORK;
	if (get_int(fd, SOL_SOCKET, SO_KEEPALIVE, &v) < 0)
		return TCPR_E_SOCKOPT;
	if (v)
		st->flags |= TCPR_F_KEEPALIVE;
	if (get_int(fd, SOL_TCP, TCP_KEEPIDLE, &st->keepidle) < 0 ||
	    get_int(fd, SOL_TCP, TCP_KEEPINTVL, &st->keepintvl) < 0 ||
	    get_int(fd, SOL_TCP, TCP_KEEPCNT, &st->keepcnt) < 0 ||
	    get_int(fd, SOL_TCP, TCP_USER_TIMEOUT, &v) < 0)
		return TCPR_E_SOCKOPT;
	st->user_timeout = (uint32_t)v;
	/* Both buffer sizes in one call (what SO_SNDBUF/SO_RCVBUF would report). */
	len = sizeof(meminfo);
	if (getsockopt(fd, SOL_SOCKET, SO_MEMINFO, meminfo, &len) < 0 ||
	    len < sizeof(meminfo))
		return TCPR_E_SOCKOPT;
	st->sndbuf = (int32_t)meminfo[SK_MEMINFO_SNDBUF];
	st->rcvbuf = (int32_t)meminfo[SK_MEMINFO_RCVBUF];
	if (get_int(fd, SOL_SOCKET, SO_BUF_LOCK, &st->buf_lock) < 0 ||
	    get_int(fd, SOL_SOCKET, SO_MARK, &v) < 0)
		return TCPR_E_SOCKOPT;
	st->mark = (uint32_t)v;
	len = sizeof(st->congestion);
	if (getsockopt(fd, SOL_TCP, TCP_CONGESTION, st->congestion, &len) < 0)
		return TCPR_E_SOCKOPT;
	st->congestion[sizeof(st->congestion) - 1] = '\0';
	if (mapped_or_v4) {
		if (get_int(fd, SOL_IP, IP_TOS, &st->tos) < 0 ||
		    get_int(fd, SOL_IP, IP_TTL, &st->ttl) < 0)
			return TCPR_E_SOCKOPT;
	} else {
		if (get_int(fd, SOL_IPV6, IPV6_TCLASS, &st->tos) < 0 ||
		    get_int(fd, SOL_IPV6, IPV6_UNICAST_HOPS, &st->ttl) < 0)
			return TCPR_E_SOCKOPT;
	}
	v = fcntl(fd, F_GETFL);
	if (v < 0)
		return TCPR_E_SOCKOPT;
	if (v & O_NONBLOCK)
		st->flags |= TCPR_F_NONBLOCK;
	return TCPR_OK;
}

/* Queue lengths, sequence numbers and bytes, consistent with each other. */
static int dump_queues(int fd, struct tcpr_state *st, uint8_t **bufp)
{
	int inq, outq, unsent, rc;
	uint8_t *buf = NULL;

	*bufp = NULL;
	st->flags &= ~TCPR_F_FIN_UNSENT;
	if (ioctl(fd, SIOCINQ, &inq) < 0 || ioctl(fd, SIOCOUTQ, &outq) < 0 ||
	    ioctl(fd, SIOCOUTQNSD, &unsent) < 0)
		return TCPR_E_QUEUE_LEN;
	if (inq < 0 || outq < 0 || unsent < 0 || unsent > outq) {
		errno = EINVAL;
		return TCPR_E_QUEUE_LEN;
	}
	/* A FIN takes a sequence number but carries no byte: the kernel counts an unacked FIN of
	 * ours in SIOCOUTQ (and, if not transmitted, in SIOCOUTQNSD). Keep it out. */
	if (in_states(st->tcp_state, OUR_FIN)) {
		if (st->tcp_state != TCP_FIN_WAIT2)
			outq--;
		if (unsent > 0) {
			unsent--;
			st->flags |= TCPR_F_FIN_UNSENT;
		}
	}
	if (outq < 0 || unsent > outq) {
		errno = EINVAL;
		return TCPR_E_QUEUE_LEN;
	}
	st->inq_len = (uint32_t)inq;
	st->outq_len = (uint32_t)outq;
	st->unsent_len = (uint32_t)unsent;
	if (inq + (size_t)outq > 0) {
		/* One extra byte so each peek can detect a queue that grew. */
		buf = malloc((size_t)inq + (size_t)outq + 1);
		if (!buf) {
			errno = ENOMEM;
			return TCPR_E_NOMEM;
		}
	}
	rc = dump_queue(fd, TCP_RECV_QUEUE, &st->rcv_seq, buf, st->inq_len);
	if (!rc)
		rc = dump_queue(fd, TCP_SEND_QUEUE, &st->snd_seq, buf ? buf + inq : NULL,
				st->outq_len);
	if (rc) {
		int saved = errno;
		free(buf);
		errno = saved;
		return rc;
	}
	*bufp = buf;
	return TCPR_OK;
}

int tcpr_dump(int fd, struct tcpr_state *st, uint8_t **queues)
{
	struct tcp_info ti;
	struct tcp_repair_window win;
	socklen_t len;
	int v, rc, attempt;
	uint8_t *buf = NULL;

	*queues = NULL;
	if (st->size < sizeof(*st)) {
		errno = EINVAL;
		return TCPR_E_VERSION;
	}
	memset(st, 0, sizeof(*st));
	st->version = TCPR_STATE_VERSION;
	st->size = sizeof(*st);

	len = sizeof(ti);
	memset(&ti, 0, sizeof(ti));
	if (getsockopt(fd, SOL_TCP, TCP_INFO, &ti, &len) < 0)
		return errno == ENOTSOCK ? TCPR_E_NOT_SOCKET : TCPR_E_INFO;
	st->tcp_state = ti.tcpi_state;
	if (!repairable_state(ti.tcpi_state)) {
		errno = EINVAL;
		return TCPR_E_STATE;
	}
	if (ti.tcpi_options & TCPI_OPT_TIMESTAMPS)
		st->flags |= TCPR_F_TIMESTAMP;
	if (ti.tcpi_options & TCPI_OPT_SACK)
		st->flags |= TCPR_F_SACK;
	if (ti.tcpi_options & TCPI_OPT_WSCALE) {
		st->flags |= TCPR_F_WSCALE;
		st->snd_wscale = ti.tcpi_snd_wscale;
		st->rcv_wscale = ti.tcpi_rcv_wscale;
	}
	rc = dump_names(fd, st);
	if (rc)
		return rc;

	/* Segments that reached the socket before the isolation may still sit in its backlog
	 * and be processed when one of our calls releases the socket lock, changing a queue
	 * between its length and its bytes. Nothing new arrives once isolated: read again. */
	for (attempt = 0;; attempt++) {
		rc = dump_queues(fd, st, &buf);
		if (rc != TCPR_E_PEEK || errno != EAGAIN || attempt == 3)
			break;
	}
	if (rc)
		goto fail;
	if (in_states(st->tcp_state, OUR_FIN))
		st->snd_seq--; /* write_seq counts our FIN */
	if (in_states(st->tcp_state, PEER_FIN))
		st->rcv_seq--; /* rcv_nxt counts the peer's FIN */

	rc = TCPR_E_MSS;
	if (get_int(fd, SOL_TCP, TCP_MAXSEG, &v) < 0)
		goto fail;
	st->mss_clamp = (uint32_t)v;
	if (st->flags & TCPR_F_TIMESTAMP) {
		rc = TCPR_E_TIMESTAMP;
		if (get_int(fd, SOL_TCP, TCP_TIMESTAMP, &v) < 0)
			goto fail;
		st->ts_val = (uint32_t)v;
	}
	rc = TCPR_E_WINDOW;
	len = sizeof(win);
	if (getsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, &win, &len) < 0)
		goto fail;
	st->flags |= TCPR_F_WINDOW;
	st->snd_wl1 = win.snd_wl1;
	st->snd_wnd = win.snd_wnd;
	st->max_window = win.max_window;
	st->rcv_wnd = win.rcv_wnd;
	st->rcv_wup = win.rcv_wup;
	if (in_states(st->tcp_state, PEER_FIN)) {
		/* Restore rebuilds rcv_nxt without the peer's FIN (re-injected later): the window
		 * fields must not point past it. */
		if ((int32_t)(st->rcv_wup - st->rcv_seq) > 0)
			st->rcv_wup = st->rcv_seq;
		if ((int32_t)(st->snd_wl1 - st->rcv_seq) > 0)
			st->snd_wl1 = st->rcv_seq;
	}

	rc = dump_options(fd, st);
	if (rc)
		goto fail;
	*queues = buf;
	return TCPR_OK;
fail:
	v = errno;
	free(buf);
	errno = v;
	return rc;
}

static int check_state(const struct tcpr_state *st)
{
	if (st->version != TCPR_STATE_VERSION || st->size != sizeof(*st))
		return TCPR_E_VERSION;
	if ((st->family != AF_INET && st->family != AF_INET6) || (st->flags & ~TCPR_F_ALL) ||
	    !repairable_state(st->tcp_state) || st->unsent_len > st->outq_len ||
	    ((st->flags & TCPR_F_FIN_UNSENT) && !in_states(st->tcp_state, OUR_FIN)) ||
	    st->src_port == 0 || st->dst_port == 0 || st->mss_clamp == 0 ||
	    st->snd_wscale > 14 || st->rcv_wscale > 14 || st->outq_len > INT32_MAX / 2 ||
	    st->inq_len > INT32_MAX / 2 || memchr(st->congestion, 0, sizeof(st->congestion)) == NULL)
		return TCPR_E_INVALID;
	return TCPR_OK;
}

static socklen_t make_addr(const struct tcpr_state *st, const uint8_t *addr, uint16_t port,
			   struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (st->family == AF_INET) {
		struct sockaddr_in *s = (void *)ss;
		s->sin_family = AF_INET;
		s->sin_port = htons(port);
		memcpy(&s->sin_addr, addr, 4);
		return sizeof(*s);
	}
	struct sockaddr_in6 *s6 = (void *)ss;
	s6->sin6_family = AF_INET6;
	s6->sin6_port = htons(port);
	memcpy(&s6->sin6_addr, addr, 16);
	return sizeof(*s6);
}

/* Write a queue in repair mode. Non-blocking: a full buffer is an error, not a hang. */
static int replay(int fd, const uint8_t *data, uint32_t len)
{
	while (len > 0) {
		ssize_t n = send(fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0)
			return -1;
		if (n == 0) {
			errno = ENOBUFS;
			return -1;
		}
		data += n;
		len -= (uint32_t)n;
	}
	return 0;
}

/* Buffer large enough for the replayed queue: max(old, 1.5 x queue + 64 KiB), or the old
 * size when there is no queue. The kernel doubles what it is given, and getsockopt reports
 * the doubled value. */
static int buf_for(int32_t old, uint32_t queue)
{
	/* 1.25 x was seen to refuse the never-sent tail at activation about once in 300
	 * saturated moves (EAGAIN): per-skb overhead of the replayed queue. 1.5 x leaves room. */
	uint64_t need = queue ? (uint64_t)queue + queue / 2 + 65536 : 0;
	uint64_t have = old > 0 ? (uint64_t)old : 0;
	uint64_t want = need > have ? need : have;
	if (want > INT32_MAX)
		want = INT32_MAX;
	return (int)((want + 1) / 2);
}

/* Forcing a size pins it; give autotuning back unless the user had pinned the size too. */
static int unpin(int fd, uint32_t buf_lock)
{
	if ((buf_lock & SOCK_BUF_LOCK_MASK) == SOCK_BUF_LOCK_MASK)
		return 0;
	return set_int(fd, SOL_SOCKET, SO_BUF_LOCK, (int)(buf_lock & SOCK_BUF_LOCK_MASK));
}

/* Once the queue is in, the socket gets the size it had. Otherwise every move of a
 * connection whose queue stays full (a lagging reader, a writer ahead of its peer) would
 * grow the buffer by half again, until the queue outgrows what a snapshot may carry. */
static int give_back(int fd, int force_opt, int32_t old, uint32_t queue, uint32_t buf_lock)
{
	if (old <= 0 || buf_for(old, queue) <= (old + 1) / 2)
		return 0;
	if (set_int(fd, SOL_SOCKET, force_opt, (old + 1) / 2) < 0)
		return -1;
	return unpin(fd, buf_lock);
}

/* What a fresh socket of this namespace starts with, read once per batch: a batch of
 * small, autotuned connections then skips the buffer and congestion-control syscalls
 * whose values the new socket already has. */
struct fresh_defaults {
	int valid;
	uint32_t sndbuf, rcvbuf;
	char congestion[16];
};

static void read_defaults(int fd, struct fresh_defaults *d)
{
	uint32_t meminfo[SK_MEMINFO_VARS];
	socklen_t len = sizeof(meminfo);

	memset(d, 0, sizeof(*d));
	if (getsockopt(fd, SOL_SOCKET, SO_MEMINFO, meminfo, &len) < 0 || len < sizeof(meminfo))
		return;
	len = sizeof(d->congestion) - 1;
	if (getsockopt(fd, SOL_TCP, TCP_CONGESTION, d->congestion, &len) < 0)
		return;
	d->sndbuf = meminfo[SK_MEMINFO_SNDBUF];
	d->rcvbuf = meminfo[SK_MEMINFO_RCVBUF];
	d->valid = 1;
}

/* Whether the fresh socket's buffers can be kept: nothing to send (the never-sent tail
 * goes out with a non-blocking send at activation, and a send buffer that merely looks
 * large enough was seen to refuse it), a small receive queue, old sizes no larger, and the
 * user had not pinned them. */
static int defaults_fit(const struct tcpr_state *st, const struct fresh_defaults *d)
{
	return d && d->valid && !(st->buf_lock & SOCK_BUF_LOCK_MASK) && st->outq_len == 0 &&
	       (uint32_t)st->sndbuf <= d->sndbuf && (uint32_t)st->rcvbuf <= d->rcvbuf &&
	       (uint64_t)st->inq_len * 2 + 4096 <= d->rcvbuf;
}

static int restore_options(int fd, const struct tcpr_state *st, const struct fresh_defaults *d)
{
	int v4 = st->family == AF_INET || (st->flags & TCPR_F_V4MAPPED);

	if ((st->flags & TCPR_F_NODELAY) && set_int(fd, SOL_TCP, TCP_NODELAY, 1) < 0)
		return TCPR_E_SOCKOPT;
	if ((st->flags & TCPR_F_CORK) && set_int(fd, SOL_TCP, TCP_CORK, 1) < 0)
		return TCPR_E_SOCKOPT;
	if ((st->flags & TCPR_F_KEEPALIVE) && set_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1) < 0)
		return TCPR_E_SOCKOPT;
	if (st->keepidle != DEF_KEEPIDLE && set_int(fd, SOL_TCP, TCP_KEEPIDLE, st->keepidle) < 0)
		return TCPR_E_SOCKOPT;
	if (st->keepintvl != DEF_KEEPINTVL &&
	    set_int(fd, SOL_TCP, TCP_KEEPINTVL, st->keepintvl) < 0)
		return TCPR_E_SOCKOPT;
	if (st->keepcnt != DEF_KEEPCNT && set_int(fd, SOL_TCP, TCP_KEEPCNT, st->keepcnt) < 0)
		return TCPR_E_SOCKOPT;
	if (st->user_timeout &&
	    set_int(fd, SOL_TCP, TCP_USER_TIMEOUT, (int)st->user_timeout) < 0)
		return TCPR_E_SOCKOPT;
	if (st->mark && set_int(fd, SOL_SOCKET, SO_MARK, (int)st->mark) < 0)
		return TCPR_E_SOCKOPT;
	if (st->congestion[0] && !(d && d->valid && !strcmp(d->congestion, st->congestion)) &&
	    setsockopt(fd, SOL_TCP, TCP_CONGESTION, st->congestion, strlen(st->congestion)) < 0)
		return TCPR_E_SOCKOPT;
	if (st->tos && set_int(fd, v4 ? SOL_IP : SOL_IPV6, v4 ? IP_TOS : IPV6_TCLASS, st->tos) < 0)
		return TCPR_E_SOCKOPT;
	if (st->ttl > 0 && st->ttl != DEF_TTL &&
	    set_int(fd, v4 ? SOL_IP : SOL_IPV6, v4 ? IP_TTL : IPV6_UNICAST_HOPS, st->ttl) < 0)
		return TCPR_E_SOCKOPT;
	if ((st->flags & TCPR_F_NONBLOCK)) {
		int fl = fcntl(fd, F_GETFL);
		if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
			return TCPR_E_SOCKOPT;
	}
	return TCPR_OK;
}

static int restore_into(int fd, const struct tcpr_state *st, const uint8_t *queues,
			struct fresh_defaults *d)
{
	struct sockaddr_storage src, dst;
	socklen_t slen, dlen;
	struct tcp_repair_opt opts[4];
	unsigned nopts = 0;
	const uint8_t *inq = queues, *outq = queues ? queues + st->inq_len : NULL;
	uint32_t sent_len = st->outq_len - st->unsent_len;
	int rc;

	if (set_int(fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON) < 0)
		return TCPR_E_REPAIR_ON;
	/* Queue sequence numbers can only be set before connect(). */
	if (set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE) < 0)
		return TCPR_E_QUEUE_SEL;
	if (set_int(fd, SOL_TCP, TCP_QUEUE_SEQ, (int)(st->rcv_seq - st->inq_len)) < 0)
		return TCPR_E_QUEUE_SEQ;
	if (set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE) < 0)
		return TCPR_E_QUEUE_SEL;
	if (set_int(fd, SOL_TCP, TCP_QUEUE_SEQ, (int)(st->snd_seq - st->outq_len)) < 0)
		return TCPR_E_QUEUE_SEQ;

	/* The address may arrive on this device only after the socket is built. */
	if (set_int(fd, SOL_IP, IP_FREEBIND, 1) < 0)
		return TCPR_E_BIND;
	slen = make_addr(st, st->src_addr, st->src_port, &src);
	dlen = make_addr(st, st->dst_addr, st->dst_port, &dst);
	if (bind(fd, (struct sockaddr *)&src, slen) < 0)
		return TCPR_E_BIND;
	if (connect(fd, (struct sockaddr *)&dst, dlen) < 0)
		return TCPR_E_CONNECT;

	opts[nopts].opt_code = TCPOPT_MAXSEG;
	opts[nopts++].opt_val = st->mss_clamp;
	if (st->flags & TCPR_F_WSCALE) {
		opts[nopts].opt_code = TCPOPT_WINDOW;
		opts[nopts++].opt_val = st->snd_wscale + ((uint32_t)st->rcv_wscale << 16);
	}
	if (st->flags & TCPR_F_SACK) {
		opts[nopts].opt_code = TCPOPT_SACK_PERMITTED;
		opts[nopts++].opt_val = 0;
	}
	if (st->flags & TCPR_F_TIMESTAMP) {
		opts[nopts].opt_code = TCPOPT_TIMESTAMP;
		opts[nopts++].opt_val = 0;
	}
	if (setsockopt(fd, SOL_TCP, TCP_REPAIR_OPTIONS, opts, nopts * sizeof(opts[0])) < 0)
		return TCPR_E_OPTIONS;
	if ((st->flags & TCPR_F_TIMESTAMP) &&
	    set_int(fd, SOL_TCP, TCP_TIMESTAMP, (int)st->ts_val) < 0)
		return TCPR_E_TIMESTAMP;

	if (d && !d->valid)
		read_defaults(fd, d); /* first socket of a batch, before its buffers are forced */
	/* A repair-mode send into a too-small buffer would block forever. */
	if (!defaults_fit(st, d)) {
		if (set_int(fd, SOL_SOCKET, SO_SNDBUFFORCE, buf_for(st->sndbuf, st->outq_len)) < 0 ||
		    set_int(fd, SOL_SOCKET, SO_RCVBUFFORCE, buf_for(st->rcvbuf, st->inq_len)) < 0 ||
		    unpin(fd, st->buf_lock) < 0)
			return TCPR_E_BUF;
	}

	if (st->inq_len) {
		if (set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE) < 0)
			return TCPR_E_QUEUE_SEL;
		if (replay(fd, inq, st->inq_len) < 0)
			return TCPR_E_RECVQ;
		/* (The send buffer is given back at activation, after the never-sent tail.) */
		if (!defaults_fit(st, d) &&
		    give_back(fd, SO_RCVBUFFORCE, st->rcvbuf, st->inq_len, st->buf_lock) < 0)
			return TCPR_E_BUF;
	}
	/* The window can only be set once rcv_nxt is where the receive queue left it. */
	if (st->flags & TCPR_F_WINDOW) {
		struct tcp_repair_window win = {
			.snd_wl1 = st->snd_wl1,
			.snd_wnd = st->snd_wnd,
			.max_window = st->max_window,
			.rcv_wnd = st->rcv_wnd,
			.rcv_wup = st->rcv_wup,
		};
		if (setsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, &win, sizeof(win)) < 0)
			return TCPR_E_WINDOW;
	}
	if (sent_len) {
		if (set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE) < 0)
			return TCPR_E_QUEUE_SEL;
		if (replay(fd, outq, sent_len) < 0)
			return TCPR_E_SENDQ;
	}
	/* Our FIN, if it had been transmitted (LAST_ACK re-sends it at activation, after the
	 * peer's FIN): shutdown() in repair mode marks it sent, like the data before it. */
	if (in_states(st->tcp_state, TCPF(TCP_FIN_WAIT1) | TCPF(TCP_FIN_WAIT2) | TCPF(TCP_CLOSING)) &&
	    !(st->flags & TCPR_F_FIN_UNSENT)) {
		if (set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE) < 0)
			return TCPR_E_QUEUE_SEL;
		if (shutdown(fd, SHUT_WR) < 0)
			return TCPR_E_FIN;
	}
	rc = restore_options(fd, st, d);
	return rc;
}

/* The state is consistent and its queue bytes are there (errno EINVAL if not). */
static int check_restorable(const struct tcpr_state *st, const uint8_t *queues)
{
	int rc = check_state(st);

	if (!rc && (st->inq_len || st->outq_len) && !queues)
		rc = TCPR_E_INVALID;
	if (rc)
		errno = EINVAL;
	return rc;
}

static int restore_one(const struct tcpr_state *st, const uint8_t *queues, int *fd_out,
		       struct fresh_defaults *d)
{
	int fd, rc, saved;

	*fd_out = -1;
	rc = check_restorable(st, queues);
	if (rc)
		return rc;
	fd = socket(st->family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
	if (fd < 0)
		return TCPR_E_SOCKET;
	rc = restore_into(fd, st, queues, d);
	if (rc) {
		/* Still in repair mode (or never connected): closing sends nothing. */
		saved = errno;
		close(fd);
		errno = saved;
		return rc;
	}
	*fd_out = fd;
	return TCPR_OK;
}

int tcpr_restore(const struct tcpr_state *st, const uint8_t *queues, int *fd_out)
{
	return restore_one(st, queues, fd_out, NULL);
}

static int restore_into_fd(int fd, const struct tcpr_state *st, const uint8_t *queues,
			   struct fresh_defaults *d)
{
	int domain, rc = check_restorable(st, queues);

	if (rc)
		return rc;
	/* One syscall: a socket of the other family would fail later, less clearly. A socket
	 * that is not fresh fails at TCP_REPAIR (not TCP), bind or connect. */
	if (get_int(fd, SOL_SOCKET, SO_DOMAIN, &domain) < 0)
		return errno == ENOTSOCK || errno == EBADF ? TCPR_E_NOT_SOCKET : TCPR_E_SOCKOPT;
	if (domain != (int)st->family) {
		errno = EAFNOSUPPORT;
		return TCPR_E_FAMILY;
	}
	return restore_into(fd, st, queues, d);
}

int tcpr_restore_into(int fd, const struct tcpr_state *st, const uint8_t *queues)
{
	return restore_into_fd(fd, st, queues, NULL);
}

static uint32_t csum_add(uint32_t sum, const void *data, size_t len)
{
	const uint8_t *p = data;
	for (; len > 1; p += 2, len -= 2)
		sum += (uint32_t)(p[0] << 8 | p[1]);
	if (len)
		sum += (uint32_t)(p[0] << 8);
	return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return htons((uint16_t)~sum);
}

/* A TCP segment without payload, built by hand and sent on an IPPROTO_RAW socket (header
 * included; such sockets receive nothing). Either from us to the peer (from_peer = 0) or as
 * if from the peer, into our own stack (from_peer = 1). ts >= 0 adds a timestamp option. */
static int send_segment(const struct tcpr_state *st, int raw_fd, int from_peer, uint8_t flags,
			uint32_t seq, uint32_t ack, uint32_t win, int64_t ts)
{
	uint8_t pkt[40 + 32];
	uint8_t *tcp;
	size_t iplen, tcplen = ts >= 0 ? 32 : 20;
	int v4 = st->family == AF_INET || (st->flags & TCPR_F_V4MAPPED);
	const uint8_t *src = from_peer ? st->dst_addr : st->src_addr;
	const uint8_t *dst = from_peer ? st->src_addr : st->dst_addr;
	uint16_t sport = from_peer ? st->dst_port : st->src_port;
	uint16_t dport = from_peer ? st->src_port : st->dst_port;
	uint32_t sum = 0, n;
	uint16_t c;
	struct sockaddr_storage to;
	socklen_t tolen;

	memset(pkt, 0, sizeof(pkt));
	memset(&to, 0, sizeof(to));
	if (v4) {
		struct iphdr *ip = (struct iphdr *)pkt;
		struct sockaddr_in *sin = (struct sockaddr_in *)&to;
		if (st->family == AF_INET6) { /* ::ffff:a.b.c.d */
			src += 12;
			dst += 12;
		}
		iplen = sizeof(*ip);
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = (uint8_t)st->tos;
		ip->tot_len = htons((uint16_t)(iplen + tcplen));
		ip->frag_off = htons(IP_DF);
		ip->ttl = st->ttl > 0 ? (uint8_t)st->ttl : DEF_TTL;
		ip->protocol = IPPROTO_TCP;
		memcpy(&ip->saddr, src, 4);
		memcpy(&ip->daddr, dst, 4);
		sum = csum_add(sum, src, 4);
		sum = csum_add(sum, dst, 4);
		sin->sin_family = AF_INET;
		memcpy(&sin->sin_addr, dst, 4);
		tolen = sizeof(*sin);
	} else {
		struct ip6_hdr *ip6 = (struct ip6_hdr *)pkt;
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&to;
		iplen = sizeof(*ip6);
		ip6->ip6_flow = htonl(6u << 28 | (uint32_t)(st->tos & 0xff) << 20);
		ip6->ip6_plen = htons((uint16_t)tcplen);
		ip6->ip6_nxt = IPPROTO_TCP;
		ip6->ip6_hlim = st->ttl > 0 ? (uint8_t)st->ttl : DEF_TTL;
		memcpy(&ip6->ip6_src, src, 16);
		memcpy(&ip6->ip6_dst, dst, 16);
		sum = csum_add(sum, src, 16);
		sum = csum_add(sum, dst, 16);
		sin6->sin6_family = AF_INET6;
		memcpy(&sin6->sin6_addr, dst, 16);
		tolen = sizeof(*sin6);
	}
	sum += IPPROTO_TCP + (uint32_t)tcplen;

	tcp = pkt + iplen;
	tcp[0] = (uint8_t)(sport >> 8);
	tcp[1] = (uint8_t)sport;
	tcp[2] = (uint8_t)(dport >> 8);
	tcp[3] = (uint8_t)dport;
	n = htonl(seq);
	memcpy(tcp + 4, &n, 4);
	n = htonl(ack);
	memcpy(tcp + 8, &n, 4);
	tcp[12] = (uint8_t)((tcplen / 4) << 4);
	tcp[13] = flags;
	tcp[14] = (uint8_t)(win >> 8);
	tcp[15] = (uint8_t)win;
	if (ts >= 0) {
		tcp[20] = 1; /* NOP, NOP, TS (kind 8, len 10), TSval, TSecr unknown: 0 */
		tcp[21] = 1;
		tcp[22] = 8;
		tcp[23] = 10;
		n = htonl((uint32_t)ts);
		memcpy(tcp + 24, &n, 4);
	}
	sum = csum_add(sum, tcp, tcplen);
	c = csum_fold(sum);
	memcpy(tcp + 16, &c, 2);
	if (sendto(raw_fd, pkt, iplen + tcplen, MSG_DONTWAIT, (struct sockaddr *)&to, tolen) < 0)
		return -1;
	return 0;
}

static uint32_t scaled_window(uint32_t win, const struct tcpr_state *st, uint8_t wscale)
{
	if ((int32_t)win < 0)
		win = 0;
	win >>= (st->flags & TCPR_F_WSCALE) ? wscale : 0;
	return win > 0xffff ? 0xffff : win;
}

/* The pure ACK telling the peer the window the restored socket believes it advertised.
 * Not after the peer's FIN: the peer sends no more data, so our window no longer matters. */
static int send_window_ack(int fd, const struct tcpr_state *st, int raw_fd)
{
	int ts = -1;
	uint32_t win = scaled_window(st->rcv_wup + st->rcv_wnd - st->rcv_seq, st, st->rcv_wscale);
	uint32_t snd_nxt = st->snd_seq - st->unsent_len; /* the unsent tail is not out yet */

	if (in_states(st->tcp_state, PEER_FIN))
		return TCPR_OK;
	if (in_states(st->tcp_state, OUR_FIN) && !(st->flags & TCPR_F_FIN_UNSENT))
		snd_nxt++; /* our FIN is out too */
	if ((st->flags & TCPR_F_TIMESTAMP) && get_int(fd, SOL_TCP, TCP_TIMESTAMP, &ts) < 0)
		return TCPR_E_TIMESTAMP;
	if (send_segment(st, raw_fd, 0, 0x10 /* ACK */, snd_nxt, st->rcv_seq, win,
			 (st->flags & TCPR_F_TIMESTAMP) ? (int64_t)(uint32_t)ts : -1) < 0)
		return TCPR_E_ACK;
	return TCPR_OK;
}

/* Deliver what the peer had sent of the connection's end into our own stack: its FIN
 * (CLOSE_WAIT, LAST_ACK, CLOSING) or its ACK of our FIN (FIN_WAIT2). Without a timestamp
 * option, so the socket's ts_recent stays unset and the peer's real segments pass PAWS. */
static int inject_from_peer(const struct tcpr_state *st, int raw_fd)
{
	uint32_t snd_una = st->snd_seq - st->outq_len;
	uint32_t win = scaled_window(st->snd_wnd, st, st->snd_wscale);

	if (in_states(st->tcp_state, PEER_FIN))
		return send_segment(st, raw_fd, 1, 0x11 /* FIN|ACK */, st->rcv_seq, snd_una, win, -1);
	if (st->tcp_state == TCP_FIN_WAIT2)
		return send_segment(st, raw_fd, 1, 0x10 /* ACK */, st->rcv_seq, st->snd_seq + 1, win, -1);
	return 0;
}

static int send_unsent(int fd, const uint8_t *unsent, size_t len)
{
	while (len > 0) {
		ssize_t n = send(fd, unsent, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n <= 0) {
			if (n == 0)
				errno = ENOBUFS;
			return TCPR_E_UNSENT;
		}
		unsent += n;
		len -= (size_t)n;
	}
	return TCPR_OK;
}

int tcpr_activate(int fd, const uint8_t *unsent, size_t len)
{
	if (set_int(fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF) < 0)
		return TCPR_E_REPAIR_OFF;
	return send_unsent(fd, unsent, len);
}

int tcpr_activate_ack(int fd, const struct tcpr_state *st, int raw_fd, const uint8_t *unsent,
		      size_t len)
{
	int rc = check_state(st), saved;

	if (rc) {
		errno = EINVAL;
		return rc;
	}
	/* No kernel window probe (an old-sequence segment the peer only dup-ACKs): the ACK
	 * below tells the peer more, and the peer's window is restored already. */
	if (set_int(fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP) < 0)
		return TCPR_E_REPAIR_OFF;
	/* The socket is live from here on: a lost ACK costs the peer a probe, not the flow. */
	rc = send_window_ack(fd, st, raw_fd);
	saved = errno;
	if (inject_from_peer(st, raw_fd) < 0)
		return TCPR_E_FIN;
	if (send_unsent(fd, unsent, len))
		return TCPR_E_UNSENT;
	if ((st->tcp_state == TCP_LAST_ACK || (st->flags & TCPR_F_FIN_UNSENT)) &&
	    shutdown(fd, SHUT_WR) < 0)
		return TCPR_E_FIN;
	/* A send queue made restore force a larger buffer (see restore_into). The connection
	 * is live and its bytes are out: a size that could not be given back (these calls fail
	 * only without CAP_NET_ADMIN, which repair needed too) is no reason to fail the move. */
	if (st->outq_len)
		(void)give_back(fd, SO_SNDBUFFORCE, st->sndbuf, st->outq_len, st->buf_lock);
	errno = saved;
	return rc;
}

int tcpr_resume(int fd)
{
	if (set_int(fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF) < 0)
		return TCPR_E_REPAIR_OFF;
	return TCPR_OK;
}

int tcpr_release(int fd)
{
	/* Repair mode makes close() silent; a socket that is not frozen would send FIN/RST,
	 * so one that cannot be frozen is left open for the caller to decide. */
	if (set_int(fd, SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON) < 0)
		return TCPR_E_REPAIR_ON;
	if (close(fd) < 0 && errno != EINTR)
		return TCPR_E_CLOSE;
	return TCPR_OK;
}

/* Record one socket's outcome of a batch: its code, and errno where it failed. */
static size_t note(int rc, int *rcs, int *errs, size_t i)
{
	rcs[i] = rc;
	errs[i] = rc ? errno : 0;
	return rc != TCPR_OK;
}

size_t tcpr_freeze_many(const int *fds, size_t n, int *rcs, int *errs)
{
	size_t failed = 0;
	for (size_t i = 0; i < n; i++)
		failed += note(tcpr_freeze(fds[i]), rcs, errs, i);
	return failed;
}

size_t tcpr_dump_many(const int *fds, size_t n, struct tcpr_state *states, uint8_t **queues,
		      int *rcs, int *errs)
{
	size_t failed = 0;
	for (size_t i = 0; i < n; i++) {
		states[i].size = sizeof(states[i]);
		failed += note(tcpr_dump(fds[i], &states[i], &queues[i]), rcs, errs, i);
	}
	return failed;
}

size_t tcpr_restore_many(const struct tcpr_state *const *states, const uint8_t *const *queues,
			 size_t n, int *fds, int *rcs, int *errs)
{
	size_t failed = 0;
	struct fresh_defaults d = {0};
	for (size_t i = 0; i < n; i++)
		failed += note(restore_one(states[i], queues[i], &fds[i], &d), rcs, errs, i);
	return failed;
}

size_t tcpr_restore_into_many(const int *fds, const struct tcpr_state *const *states,
			      const uint8_t *const *queues, size_t n, int *rcs, int *errs)
{
	size_t failed = 0;
	struct fresh_defaults d = {0};
	for (size_t i = 0; i < n; i++)
		failed += note(restore_into_fd(fds[i], states[i], queues[i], &d), rcs, errs, i);
	return failed;
}

size_t tcpr_release_many(const int *fds, size_t n, int *rcs, int *errs)
{
	size_t failed = 0;
	for (size_t i = 0; i < n; i++)
		failed += note(tcpr_release(fds[i]), rcs, errs, i);
	return failed;
}

size_t tcpr_activate_many(const int *fds, const struct tcpr_state *const *states, int raw4,
			  int raw6, const uint8_t *const *unsent, const size_t *lens, size_t n,
			  int *rcs, int *errs)
{
	size_t failed = 0;
	for (size_t i = 0; i < n; i++) {
		const struct tcpr_state *st = states[i];
		int v4 = st->family == AF_INET || (st->flags & TCPR_F_V4MAPPED);
		int rc = tcpr_activate_ack(fds[i], st, v4 ? raw4 : raw6, unsent[i], lens[i]);
		/* A missing courtesy ACK leaves the socket active: not a failure of the batch. */
		failed += note(rc == TCPR_E_ACK ? TCPR_OK : rc, rcs, errs, i);
	}
	return failed;
}
