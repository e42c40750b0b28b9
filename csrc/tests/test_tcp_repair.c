/*
 * test_tcp_repair.c — tests of the C API in csrc/tcp_repair.h against the real kernel.
 *
 * Every test runs in a child process of its own, and each kernel test in a network namespace
 * of its own (unshare(CLONE_NEWNET), loopback brought up with SIOCSIFFLAGS), using loopback
 * addresses only: nothing outside is touched, no counter or socket of one test reaches
 * another, and the namespaces vanish with the children. The tests run concurrently (most of
 * their time is a restored socket's 3 s retransmission timeout). Without root the kernel
 * tests are skipped and only the pure ones run.
 *
 * Data "in flight and lost" is made with a drop-everything classic BPF filter on the
 * receiving socket (SO_ATTACH_FILTER): TCP runs socket filters before it processes or ACKs a
 * segment, so the sender keeps the bytes as sent-but-unacknowledged. The same filters on both
 * ends isolate a flow while it is frozen, as the caller of the library must.
 *
 * Failures of individual kernel steps are injected by linking with -Wl,--wrap=<call>: the
 * __wrap_ functions below pass every call through unless a fault is armed for it, which lets
 * each distinct error code be reached and its error path (fd closed, buffer freed, errno kept)
 * be checked — under ASan/LSan in the sanitizer build.
 *
 * Output: one line per test, then "N passed, M failed"; exit status 1 on any failure.
 */
#define _GNU_SOURCE
#include "tcp_repair.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#ifndef SO_BUF_LOCK
#define SO_BUF_LOCK 72
#endif

#define TIMEOUT_MS 6000
#define FAULT_ERRNO ENOTRECOVERABLE /* an errno no real step of these tests produces */

/* ------------------------------------------------------------------------------------ */
/* Fault injection (-Wl,--wrap=...)                                                      */

enum fi_fn {
	FI_NONE,
	FI_SOCKET,
	FI_SETSOCKOPT,
	FI_GETSOCKOPT,
	FI_IOCTL,
	FI_GETSOCKNAME,
	FI_GETPEERNAME,
	FI_BIND,
	FI_CONNECT,
	FI_SEND,
	FI_RECV,
	FI_CLOSE,
	FI_MALLOC,
	FI_SENDTO,
};

#define ANY (-1L)

/* Fail the nth (0-based) call of fn whose first/second key (level/optname, ioctl request)
 * match: with errno err if err != 0, else by returning ret without calling the kernel. */
struct fault {
	enum fi_fn fn;
	long a, b;
	int nth;
	int err;
	long ret;
};

#define EVERY (-1) /* fault.nth: fire on every matching call */
static struct fault fi;
static int fi_seen, fi_fired;

static void fi_arm(struct fault f)
{
	fi = f;
	fi_seen = 0;
	fi_fired = 0;
}

static void fi_disarm(void)
{
	fi.fn = FI_NONE;
}

static int fi_hit(enum fi_fn fn, long a, long b)
{
	if (fi.fn != fn || (fi.a != ANY && fi.a != a) || (fi.b != ANY && fi.b != b))
		return 0;
	if (fi_seen++ != fi.nth && fi.nth != EVERY)
		return 0;
	fi_fired = 1;
	return 1;
}

static long fi_result(void)
{
	if (fi.err) {
		errno = fi.err;
		return -1;
	}
	return fi.ret;
}

int __real_socket(int, int, int);
int __real_setsockopt(int, int, int, const void *, socklen_t);
int __real_getsockopt(int, int, int, void *, socklen_t *);
int __real_ioctl(int, unsigned long, ...);
int __real_getsockname(int, struct sockaddr *, socklen_t *);
int __real_getpeername(int, struct sockaddr *, socklen_t *);
int __real_bind(int, const struct sockaddr *, socklen_t);
int __real_connect(int, const struct sockaddr *, socklen_t);
ssize_t __real_send(int, const void *, size_t, int);
ssize_t __real_recv(int, void *, size_t, int);
int __real_close(int);
void *__real_malloc(size_t);
ssize_t __real_sendto(int, const void *, size_t, int, const struct sockaddr *, socklen_t);

int __wrap_socket(int d, int t, int p);
int __wrap_setsockopt(int fd, int level, int name, const void *v, socklen_t l);
int __wrap_getsockopt(int fd, int level, int name, void *v, socklen_t *l);
int __wrap_ioctl(int fd, unsigned long req, ...);
int __wrap_getsockname(int fd, struct sockaddr *a, socklen_t *l);
int __wrap_getpeername(int fd, struct sockaddr *a, socklen_t *l);
int __wrap_bind(int fd, const struct sockaddr *a, socklen_t l);
int __wrap_connect(int fd, const struct sockaddr *a, socklen_t l);
ssize_t __wrap_send(int fd, const void *b, size_t n, int f);
ssize_t __wrap_recv(int fd, void *b, size_t n, int f);
int __wrap_close(int fd);
void *__wrap_malloc(size_t n);
ssize_t __wrap_sendto(int fd, const void *b, size_t n, int f, const struct sockaddr *a,
		      socklen_t l);

int __wrap_socket(int d, int t, int p)
{
	return fi_hit(FI_SOCKET, ANY, ANY) ? (int)fi_result() : __real_socket(d, t, p);
}

int __wrap_setsockopt(int fd, int level, int name, const void *v, socklen_t l)
{
	if (fi_hit(FI_SETSOCKOPT, level, name))
		return (int)fi_result();
	return __real_setsockopt(fd, level, name, v, l);
}

int __wrap_getsockopt(int fd, int level, int name, void *v, socklen_t *l)
{
	if (fi_hit(FI_GETSOCKOPT, level, name))
		return (int)fi_result();
	return __real_getsockopt(fd, level, name, v, l);
}

int __wrap_ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, req);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (fi_hit(FI_IOCTL, (long)req, ANY))
		return (int)fi_result();
	return __real_ioctl(fd, req, arg);
}

int __wrap_getsockname(int fd, struct sockaddr *a, socklen_t *l)
{
	return fi_hit(FI_GETSOCKNAME, ANY, ANY) ? (int)fi_result() : __real_getsockname(fd, a, l);
}

int __wrap_getpeername(int fd, struct sockaddr *a, socklen_t *l)
{
	return fi_hit(FI_GETPEERNAME, ANY, ANY) ? (int)fi_result() : __real_getpeername(fd, a, l);
}

int __wrap_bind(int fd, const struct sockaddr *a, socklen_t l)
{
	return fi_hit(FI_BIND, ANY, ANY) ? (int)fi_result() : __real_bind(fd, a, l);
}

int __wrap_connect(int fd, const struct sockaddr *a, socklen_t l)
{
	return fi_hit(FI_CONNECT, ANY, ANY) ? (int)fi_result() : __real_connect(fd, a, l);
}

ssize_t __wrap_send(int fd, const void *b, size_t n, int f)
{
	return fi_hit(FI_SEND, ANY, ANY) ? (ssize_t)fi_result() : __real_send(fd, b, n, f);
}

ssize_t __wrap_recv(int fd, void *b, size_t n, int f)
{
	return fi_hit(FI_RECV, ANY, ANY) ? (ssize_t)fi_result() : __real_recv(fd, b, n, f);
}

int __wrap_close(int fd)
{
	return fi_hit(FI_CLOSE, ANY, ANY) ? (int)fi_result() : __real_close(fd);
}

void *__wrap_malloc(size_t n)
{
	if (fi_hit(FI_MALLOC, ANY, ANY)) {
		errno = ENOMEM;
		return NULL;
	}
	return __real_malloc(n);
}

ssize_t __wrap_sendto(int fd, const void *b, size_t n, int f, const struct sockaddr *a,
		      socklen_t l)
{
	if (fi_hit(FI_SENDTO, ANY, ANY))
		return (ssize_t)fi_result();
	return __real_sendto(fd, b, n, f, a, l);
}

/* ------------------------------------------------------------------------------------ */
/* Test harness: every test runs in a child process of its own, kernel tests each in a     */
/* fresh network namespace (no counter or socket of one test can leak into another).       */

struct result {
	int failed, skipped;
	long ms; /* how long the test took */
	char skip_reason[160];
};

static struct result *res; /* this test's slot, shared with the parent (MAP_SHARED) */

#define CHECK(cond) check_((cond) != 0, #cond, __LINE__)
#define CHECKF(cond, ...)                                                                \
	do {                                                                               \
		if (!check_((cond) != 0, #cond, __LINE__)) {                               \
			fprintf(stderr, "      ");                                         \
			fprintf(stderr, __VA_ARGS__);                                      \
			fputc('\n', stderr);                                               \
		}                                                                          \
	} while (0)
/* Stop the current test. */
#define REQUIRE(cond)                                                                    \
	do {                                                                               \
		if (!check_((cond) != 0, #cond, __LINE__))                                 \
			return;                                                            \
	} while (0)
#define CHECK_RC(call, want)                                                             \
	do {                                                                               \
		int rc_ = (call), want_ = (want);                                          \
		if (!check_(rc_ == want_, #call " == " #want, __LINE__))                  \
			fprintf(stderr, "      got %d (%s), errno %d (%s)\n", rc_,        \
				tcpr_strerror(rc_), errno, strerror(errno));               \
	} while (0)

static int check_(int ok, const char *expr, int line)
{
	if (!ok) {
		int e = errno;
		fprintf(stderr, "    line %d: check failed: %s (errno %d %s)\n", line, expr, e,
			strerror(e));
		res->failed = 1;
		errno = e;
	}
	return ok;
}

static void skip(const char *why)
{
	res->skipped = 1;
	snprintf(res->skip_reason, sizeof(res->skip_reason), "%s", why);
}

static int lo_up(void);
static long now_ms(void);

struct test {
	const char *name;
	void (*fn)(void);
	int needs_netns;
	pid_t pid;
	FILE *out; /* the child's stdout and stderr */
	long t0;
};

static void child(struct test *t)
{
	int fd = fileno(t->out);

	dup2(fd, STDOUT_FILENO);
	dup2(fd, STDERR_FILENO);
	alarm(60); /* a hung test fails instead of hanging the build */
	if (t->needs_netns && unshare(CLONE_NEWNET) < 0) {
		char why[128];
		snprintf(why, sizeof(why), "needs root: unshare(CLONE_NEWNET): %s",
			 strerror(errno));
		skip(why);
	} else if (t->needs_netns && lo_up() < 0) {
		check_(0, "bringing up loopback", __LINE__);
	} else {
		t->fn();
	}
	res->ms = now_ms() - t->t0;
	exit(0); /* exit(), not _exit(): LeakSanitizer checks at exit */
}

/* Run every test at once, each in a child process (and network namespace) of its own, then
 * report them in order with whatever each printed. Returns the number of failures. */
static int run_all(struct test *tests, size_t n)
{
	struct result *results;
	int n_passed = 0, n_failed = 0, n_skipped = 0;

	results = mmap(NULL, n * sizeof(*results), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (results == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	memset(results, 0, n * sizeof(*results));
	for (size_t i = 0; i < n; i++) {
		tests[i].out = tmpfile();
		tests[i].t0 = now_ms();
		fflush(NULL);
		tests[i].pid = tests[i].out ? fork() : -1;
		if (tests[i].pid == 0) {
			res = &results[i];
			child(&tests[i]);
		}
	}
	for (size_t i = 0; i < n; i++) {
		struct test *t = &tests[i];
		struct result *r = &results[i];
		int status = 0;
		char line[512];

		if (t->pid < 0 || waitpid(t->pid, &status, 0) != t->pid) {
			r->failed = 1;
			printf("    fork/wait: %s\n", strerror(errno));
		} else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			r->failed = 1;
		}
		if (t->out) {
			rewind(t->out);
			while (fgets(line, sizeof(line), t->out))
				fputs(line, stdout);
			fclose(t->out);
		}
		if (WIFSIGNALED(status))
			printf("    killed by signal %d (%s)\n", WTERMSIG(status),
			       WTERMSIG(status) == SIGALRM ? "timed out" : strsignal(WTERMSIG(status)));
		else if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
			printf("    exit status %d (sanitizer report above?)\n", WEXITSTATUS(status));
		if (r->failed) {
			n_failed++;
			printf("FAIL %s (%ld ms)\n", t->name, r->ms);
		} else if (r->skipped) {
			n_skipped++;
			printf("skip %s: %s\n", t->name, r->skip_reason);
		} else {
			n_passed++;
			printf("ok   %s (%ld ms)\n", t->name, r->ms);
		}
	}
	if (n_skipped)
		printf("# %d skipped\n", n_skipped);
	printf("%d passed, %d failed\n", n_passed, n_failed);
	return n_failed;
}

/* ------------------------------------------------------------------------------------ */
/* Socket helpers                                                                        */

enum mode { V4, V6, MAPPED };

static int lo_up(void)
{
	struct ifreq ifr;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), rc;

	if (fd < 0)
		return -1;
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.ifr_name, "lo");
	rc = ioctl(fd, SIOCGIFFLAGS, &ifr);
	if (rc == 0) {
		ifr.ifr_flags |= IFF_UP;
		rc = ioctl(fd, SIOCSIFFLAGS, &ifr);
	}
	close(fd);
	return rc;
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static int set_int(int fd, int level, int name, int val)
{
	return setsockopt(fd, level, name, &val, sizeof(val));
}

static int get_int(int fd, int level, int name)
{
	int v = -1;
	socklen_t l = sizeof(v);
	if (getsockopt(fd, level, name, &v, &l) < 0)
		return -1;
	return v;
}

static int tcp_state(int fd)
{
	struct tcp_info ti;
	socklen_t l = sizeof(ti);
	memset(&ti, 0, sizeof(ti));
	if (getsockopt(fd, SOL_TCP, TCP_INFO, &ti, &l) < 0)
		return -1;
	return ti.tcpi_state;
}

static int qlen(int fd, unsigned long req)
{
	int v = -1;
	if (ioctl(fd, req, &v) < 0)
		return -1;
	return v;
}
#define INQ(fd) qlen(fd, SIOCINQ)
#define OUTQ(fd) qlen(fd, SIOCOUTQ)
#define UNSENT(fd) qlen(fd, SIOCOUTQNSD)

/* Whether fd is in TCP repair mode: TCP_REPAIR_WINDOW is readable only then (EPERM else). */
static int is_frozen(int fd)
{
	struct tcp_repair_window w;
	socklen_t l = sizeof(w);
	return getsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, &w, &l) == 0;
}

static int fd_is_open(int fd)
{
	return fcntl(fd, F_GETFD) >= 0;
}

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;
	if (!d)
		return -1;
	while ((e = readdir(d)))
		n += e->d_name[0] != '.';
	closedir(d);
	return n - 1; /* the directory's own fd */
}

/* Drop every segment arriving at fd before TCP sees it (no ACK, as if lost). */
static int drop_all(int fd)
{
	struct sock_filter code[] = { BPF_STMT(BPF_RET | BPF_K, 0) };
	struct sock_fprog prog = { .len = 1, .filter = code };
	return setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog));
}

static int undrop(int fd)
{
	int zero = 0;
	return setsockopt(fd, SOL_SOCKET, SO_DETACH_FILTER, &zero, sizeof(zero));
}

static long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* Evaluate cond every millisecond until it holds (1) or ms pass (0). */
#define WAIT_UNTIL(cond, ms)                                                             \
	({                                                                                 \
		long end_ = now_ms() + (ms);                                               \
		int ok_;                                                                   \
		while (!(ok_ = (cond)) && now_ms() < end_)                                 \
			usleep(1000);                                                      \
		ok_;                                                                       \
	})

/* A TCP connection on loopback: listener l, the side to be moved a, its peer b. */
struct pair {
	int l, a, b;
	int a_is_server;
};

static socklen_t loop_addr(enum mode m, int port, struct sockaddr_storage *ss, int for_listen)
{
	memset(ss, 0, sizeof(*ss));
	if (m == V4) {
		struct sockaddr_in *s = (void *)ss;
		s->sin_family = AF_INET;
		s->sin_port = htons((uint16_t)port);
		s->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		return sizeof(*s);
	}
	struct sockaddr_in6 *s6 = (void *)ss;
	s6->sin6_family = AF_INET6;
	s6->sin6_port = htons((uint16_t)port);
	if (m == V6)
		s6->sin6_addr = in6addr_loopback;
	else if (!for_listen) /* dual-stack listener on ::, client to ::ffff:127.0.0.1 */
		inet_pton(AF_INET6, "::ffff:127.0.0.1", &s6->sin6_addr);
	return sizeof(*s6);
}

static int sock_port(int fd)
{
	struct sockaddr_storage ss;
	socklen_t l = sizeof(ss);
	if (getsockname(fd, (struct sockaddr *)&ss, &l) < 0)
		return -1;
	return ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
					     : ((struct sockaddr_in6 *)&ss)->sin6_port);
}

/* Connect a pair; peer_rcvbuf > 0 pins the peer's receive buffer (small: its window closes
 * quickly when it stops reading). Returns 0 or -1. */
static int make_pair(struct pair *p, enum mode m, int a_is_server, int peer_rcvbuf)
{
	struct sockaddr_storage ss;
	socklen_t sl;
	int fam = m == V4 ? AF_INET : AF_INET6, c, s, port;

	p->l = p->a = p->b = -1;
	p->a_is_server = a_is_server;
	p->l = socket(fam, SOCK_STREAM | SOCK_CLOEXEC, 0);
	c = socket(fam, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (p->l < 0 || c < 0)
		return -1;
	if (m != V4)
		set_int(p->l, SOL_IPV6, IPV6_V6ONLY, 0);
	if (peer_rcvbuf > 0)
		set_int(a_is_server ? c : p->l, SOL_SOCKET, SO_RCVBUF, peer_rcvbuf);
	sl = loop_addr(m, 0, &ss, 1);
	if (bind(p->l, (struct sockaddr *)&ss, sl) < 0 || listen(p->l, 8) < 0)
		return -1;
	port = sock_port(p->l);
	sl = loop_addr(m, port, &ss, 0);
	if (connect(c, (struct sockaddr *)&ss, sl) < 0)
		return -1;
	s = accept4(p->l, NULL, NULL, SOCK_CLOEXEC);
	if (s < 0)
		return -1;
	p->a = a_is_server ? s : c;
	p->b = a_is_server ? c : s;
	set_nonblock(p->a);
	set_nonblock(p->b);
	return 0;
}

static void close_pair(struct pair *p)
{
	if (p->a >= 0)
		close(p->a);
	if (p->b >= 0)
		close(p->b);
	if (p->l >= 0)
		close(p->l);
	p->a = p->b = p->l = -1;
}

/* Byte number off of direction dir: position-dependent, so loss, duplication and reordering
 * all show. */
static uint8_t pat(int dir, uint64_t off)
{
	uint64_t x = (off + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t)dir * 0xD1B54A32D192ED03ull;
	return (uint8_t)(x >> 56);
}

enum { A2B = 1, B2A = 2 };

/* Send up to n pattern bytes from *off. stop_when_full: return at the first EAGAIN instead
 * of waiting. Returns bytes sent or -1. */
static long send_pat(int fd, int dir, uint64_t *off, size_t n, int stop_when_full)
{
	uint8_t buf[16384];
	size_t done = 0;

	while (done < n) {
		size_t k = n - done < sizeof(buf) ? n - done : sizeof(buf);
		ssize_t r;
		for (size_t i = 0; i < k; i++)
			buf[i] = pat(dir, *off + i);
		r = send(fd, buf, k, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (r < 0) {
			struct pollfd pf = { .fd = fd, .events = POLLOUT };
			if (errno != EAGAIN)
				return -1;
			if (stop_when_full)
				break;
			if (poll(&pf, 1, TIMEOUT_MS) <= 0) {
				errno = ETIMEDOUT;
				return -1;
			}
			continue;
		}
		*off += (uint64_t)r;
		done += (size_t)r;
	}
	return (long)done;
}

/* Receive exactly n bytes and check them against the pattern. 0, or -1 with a message. */
static int recv_pat(int fd, int dir, uint64_t *off, size_t n)
{
	uint8_t buf[16384];
	size_t done = 0;

	while (done < n) {
		size_t k = n - done < sizeof(buf) ? n - done : sizeof(buf);
		ssize_t r = recv(fd, buf, k, MSG_DONTWAIT);
		if (r < 0 && errno == EAGAIN) {
			struct pollfd pf = { .fd = fd, .events = POLLIN };
			if (poll(&pf, 1, TIMEOUT_MS) <= 0) {
				fprintf(stderr, "    recv: timed out at offset %llu (%zu of %zu)\n",
					(unsigned long long)*off, done, n);
				return -1;
			}
			continue;
		}
		if (r <= 0) {
			fprintf(stderr, "    recv: %s at offset %llu\n",
				r == 0 ? "EOF" : strerror(errno), (unsigned long long)*off);
			return -1;
		}
		for (ssize_t i = 0; i < r; i++)
			if (buf[i] != pat(dir, *off + (uint64_t)i)) {
				fprintf(stderr, "    recv: wrong byte at offset %llu\n",
					(unsigned long long)(*off + (uint64_t)i));
				return -1;
			}
		*off += (uint64_t)r;
		done += (size_t)r;
	}
	return 0;
}

static int matches_pat(const uint8_t *buf, size_t n, int dir, uint64_t off)
{
	for (size_t i = 0; i < n; i++)
		if (buf[i] != pat(dir, off + i))
			return 0;
	return 1;
}

/* Nothing to read, no error, no EOF on fd within ms milliseconds. */
static int stays_silent(int fd, int ms)
{
	struct pollfd pf = { .fd = fd, .events = POLLIN | POLLRDHUP };
	return poll(&pf, 1, ms) == 0 && get_int(fd, SOL_SOCKET, SO_ERROR) == 0;
}

/* Value of a Tcp: counter in /proc/self/net/snmp (this namespace), or -1. */
static long snmp_tcp(const char *field)
{
	char hdr[1024], val[1024];
	FILE *f = fopen("/proc/self/net/snmp", "re");
	long out = -1;

	if (!f)
		return -1;
	while (fgets(hdr, sizeof(hdr), f)) {
		char *hs, *vs, *h, *v;
		if (strncmp(hdr, "Tcp:", 4) || !fgets(val, sizeof(val), f))
			continue;
		h = strtok_r(hdr, " \n", &hs);
		v = strtok_r(val, " \n", &vs);
		while (h && v) {
			if (!strcmp(h, field)) {
				out = strtol(v, NULL, 10);
				break;
			}
			h = strtok_r(NULL, " \n", &hs);
			v = strtok_r(NULL, " \n", &vs);
		}
		break;
	}
	fclose(f);
	return out;
}

struct resets {
	long out_rsts, estab_resets, in_errs;
};

static struct resets resets_now(void)
{
	struct resets r = { snmp_tcp("OutRsts"), snmp_tcp("EstabResets"),
			    snmp_tcp("InErrs") + snmp_tcp("InCsumErrors") };
	return r;
}

/* No RST went over the wire in this namespace (OutRsts counts every RST sent, by either end),
 * no segment was refused as malformed (InErrs, InCsumErrors: e.g. a hand-built ACK with a bad
 * checksum), and exactly `closes` sockets went from ESTABLISHED to CLOSE. EstabResets counts that local
 * transition — which a silent release in repair mode also makes — not RSTs seen on the wire,
 * so it is only a reset signal in the peer's own namespace. */
#define CHECK_NO_RESETS(before, closes)                                                  \
	do {                                                                               \
		struct resets r_ = resets_now();                                           \
		CHECKF(r_.out_rsts == (before).out_rsts &&                                 \
			       r_.estab_resets == (before).estab_resets + (closes) &&      \
			       r_.in_errs == (before).in_errs,                             \
		       "OutRsts %ld -> %ld, EstabResets %ld -> %ld (want +%d), "           \
		       "InErrs+InCsumErrors %ld -> %ld",                                   \
		       (before).out_rsts, r_.out_rsts, (before).estab_resets,              \
		       r_.estab_resets, (closes), (before).in_errs, r_.in_errs);           \
	} while (0)

/* ------------------------------------------------------------------------------------ */
/* A connection with data in every queue of the side to be moved                         */

struct staged {
	struct pair p;
	uint64_t a_sent; /* stream offset a has written up to */
	uint64_t b_read; /* stream offset b has read up to */
	uint64_t b_sent; /* stream offset b has written up to (a has read none of it) */
};

/* Leave a with: RECV_BYTES unread in its receive queue; a send queue whose head was sent and
 * lost (b drops everything) and whose tail was never sent (b's window is closed). b is
 * left dropping everything, a is left as is. */
#define RECV_BYTES 3000
static int stage(struct staged *st, enum mode m, int a_is_server)
{
	struct pair *p = &st->p;

	memset(st, 0, sizeof(*st));
	if (make_pair(p, m, a_is_server, 4096) < 0) {
		perror("    make_pair");
		return -1;
	}
	/* b -> a: unread by a. */
	if (send_pat(p->b, B2A, &st->b_sent, RECV_BYTES, 0) != RECV_BYTES ||
	    !WAIT_UNTIL(INQ(p->a) == RECV_BYTES, TIMEOUT_MS)) {
		fprintf(stderr, "    stage: receive queue of a not filled\n");
		return -1;
	}
	/* a -> b until b's small window is closed and a's buffer full; wait until everything
	 * a sent is acknowledged, so the rest is never-sent. */
	if (send_pat(p->a, A2B, &st->a_sent, 1 << 20, 1) <= 0 ||
	    !WAIT_UNTIL(OUTQ(p->a) > 0 && OUTQ(p->a) == UNSENT(p->a), TIMEOUT_MS)) {
		fprintf(stderr, "    stage: never-sent tail not formed (outq %d unsent %d)\n",
			OUTQ(p->a), UNSENT(p->a));
		return -1;
	}
	/* b starts dropping, then reads what it has: its window opens, a sends into the
	 * void — those bytes are sent but unacknowledged. */
	if (drop_all(p->b) < 0 || recv_pat(p->b, A2B, &st->b_read, (size_t)INQ(p->b)) < 0 ||
	    !WAIT_UNTIL(OUTQ(p->a) > UNSENT(p->a) && UNSENT(p->a) > 0, TIMEOUT_MS)) {
		fprintf(stderr, "    stage: no unacknowledged data (outq %d unsent %d)\n",
			OUTQ(p->a), UNSENT(p->a));
		return -1;
	}
	return 0;
}

/* Check a dump of a staged connection against what was sent. */
static void check_dump(const struct staged *sg, const struct tcpr_state *st, const uint8_t *q,
		       enum mode m)
{
	uint64_t acked = sg->a_sent - st->outq_len;

	CHECK(st->version == TCPR_STATE_VERSION && st->size == sizeof(*st));
	CHECK(st->family == (m == V4 ? AF_INET : AF_INET6));
	CHECK(!!(st->flags & TCPR_F_V4MAPPED) == (m == MAPPED));
	CHECK(st->tcp_state == TCP_ESTABLISHED);
	CHECK(st->inq_len == RECV_BYTES);
	CHECKF(st->outq_len > st->unsent_len && st->unsent_len > 0, "outq %u unsent %u",
	       st->outq_len, st->unsent_len);
	CHECK(acked == sg->b_read);
	CHECK(st->mss_clamp > 0);
	CHECK(st->flags & TCPR_F_WINDOW);
	CHECK(st->flags & TCPR_F_TIMESTAMP); /* on by default on loopback */
	CHECK(memchr(st->congestion, 0, sizeof(st->congestion)) && st->congestion[0]);
	REQUIRE(q != NULL);
	CHECK(matches_pat(q, st->inq_len, B2A, 0));
	CHECK(matches_pat(q + st->inq_len, st->outq_len, A2B, acked));
}

/* ------------------------------------------------------------------------------------ */
/* Tests                                                                                 */

static void test_strerror_every_code(void)
{
	const char *seen[64];
	int n = 0;

	/* Codes are consecutive from 0 down: every one up to the first "unknown error". */
	for (int code = TCPR_OK; n < 64; code--) {
		const char *s = tcpr_strerror(code);
		CHECKF(s != NULL && s[0] != '\0', "code %d", code);
		if (!s || !strcmp(s, "unknown error"))
			break;
		for (int i = 0; i < n; i++)
			CHECKF(strcmp(seen[i], s) != 0, "code %d repeats \"%s\"", code, s);
		seen[n++] = s;
	}
	CHECKF(n - 1 >= -TCPR_E_ACK, "only %d named codes", n - 1);
	CHECK(tcpr_strerror(1) != NULL);
	CHECK(tcpr_strerror(-1000000) != NULL);
}

/* A state that passes every check of tcpr_restore. */
static void valid_state(struct tcpr_state *st)
{
	memset(st, 0, sizeof(*st));
	st->version = TCPR_STATE_VERSION;
	st->size = sizeof(*st);
	st->family = AF_INET;
	st->tcp_state = TCP_ESTABLISHED;
	st->src_addr[0] = 127, st->src_addr[3] = 1;
	st->dst_addr[0] = 127, st->dst_addr[3] = 1;
	st->src_port = 40000;
	st->dst_port = 40001;
	st->mss_clamp = 1460;
	st->keepidle = 7200, st->keepintvl = 75, st->keepcnt = 9;
	strcpy(st->congestion, "reno");
}

/* Corrupt a valid state in the i-th way; NULL when there are no more ways. */
static const char *corrupt(int i, struct tcpr_state *s, int *want)
{
	*want = TCPR_E_INVALID;
	switch (i) {
	case 0: *want = TCPR_E_VERSION; s->version = 0; return "version 0";
	case 1: *want = TCPR_E_VERSION; s->version = TCPR_STATE_VERSION + 1; return "version 2";
	case 2: *want = TCPR_E_VERSION; s->size -= 1; return "size - 1";
	case 3: *want = TCPR_E_VERSION; s->size += 4; return "size + 4";
	case 4: s->family = AF_UNIX; return "family AF_UNIX";
	case 5: s->family = 0; return "family 0";
	case 6: s->flags = 0x80000000u; return "unknown flag bit";
	case 7: s->tcp_state = TCP_LISTEN; return "state LISTEN";
	case 8: s->tcp_state = 0x100 | TCP_ESTABLISHED; return "state 0x101";
	case 9: s->tcp_state = TCP_TIME_WAIT; return "state TIME_WAIT";
	case 10: s->outq_len = 4, s->unsent_len = 5; return "unsent > outq";
	case 11: s->src_port = 0; return "src port 0";
	case 12: s->dst_port = 0; return "dst port 0";
	case 13: s->mss_clamp = 0; return "mss 0";
	case 14: s->flags = TCPR_F_WSCALE, s->snd_wscale = 15; return "snd_wscale 15";
	case 15: s->flags = TCPR_F_WSCALE, s->rcv_wscale = 15; return "rcv_wscale 15";
	case 16: s->inq_len = 0x80000000u; return "inq 2 GiB";
	case 17: s->outq_len = 0xffffffffu; return "outq 4 GiB";
	case 18: memset(s->congestion, 'a', sizeof(s->congestion)); return "congestion not NUL-terminated";
	case 19: s->flags = TCPR_F_FIN_UNSENT; return "unsent FIN while ESTABLISHED";
	case 20: s->tcp_state = TCP_CLOSE_WAIT, s->flags = TCPR_F_FIN_UNSENT; return "unsent FIN in CLOSE_WAIT";
	case 21: s->tcp_state = TCP_SYN_SENT; return "state SYN_SENT";
	default: return NULL;
	}
}

/* Corrupted state structs are refused before the kernel is asked for anything: with the fd
 * limit at the number of open fds, reaching socket() would fail with TCPR_E_SOCKET (the
 * control case proves it), so any other code means no kernel call was made. */
static void test_restore_refuses_corrupted_state_without_kernel(void)
{
	struct rlimit old, lim;
	struct tcpr_state st;
	uint8_t q[8] = { 0 };
	const char *what;
	int fd = 123, want, lowest = open("/dev/null", O_RDONLY | O_CLOEXEC);

	REQUIRE(lowest >= 0);
	close(lowest);
	getrlimit(RLIMIT_NOFILE, &old);
	lim = old;
	lim.rlim_cur = (rlim_t)lowest;
	REQUIRE(setrlimit(RLIMIT_NOFILE, &lim) == 0);

	valid_state(&st);
	errno = 0;
	CHECK_RC(tcpr_restore(&st, NULL, &fd), TCPR_E_SOCKET); /* control: reached socket() */
	CHECK(errno == EMFILE && fd == -1);

	for (int i = 0; (valid_state(&st), what = corrupt(i, &st, &want)); i++) {
		int rc;
		fd = 123;
		errno = 0;
		rc = tcpr_restore(&st, q, &fd);
		CHECKF(rc == want && errno == EINVAL && fd == -1,
		       "%s: got %d (%s) errno %d fd %d, want %d", what, rc, tcpr_strerror(rc),
		       errno, fd, want);
	}
	/* Queue lengths without queue bytes. */
	valid_state(&st);
	st.inq_len = 1;
	fd = 123;
	CHECK_RC(tcpr_restore(&st, NULL, &fd), TCPR_E_INVALID);
	CHECK(fd == -1);

	setrlimit(RLIMIT_NOFILE, &old);
}

static void test_dump_refuses_small_state_struct(void)
{
	struct tcpr_state st;
	uint8_t *q = (uint8_t *)&st;
	int fds[2];

	REQUIRE(pipe(fds) == 0);
	memset(&st, 0, sizeof(st));
	st.size = sizeof(st) - 1;
	CHECK_RC(tcpr_dump(fds[0], &st, &q), TCPR_E_VERSION);
	CHECK(q == NULL);
	close(fds[0]);
	close(fds[1]);
}

/* freeze -> dump -> release -> restore -> activate with data in every queue: the peer gets
 * every byte once and in order, the restored side reads its old receive queue first, both
 * directions go on, nobody sends a RST, and the released socket sent neither FIN nor RST. */
enum activation { PLAIN, WITH_ACK, ACK_FAILS };

/* Activate n restored from st: tcpr_activate, or tcpr_activate_ack through a raw socket of
 * the flow's IP version (optionally with the ACK's sendto failing: the socket must be active
 * and its never-sent bytes sent all the same). */
static void activate_as(enum activation how, int n, const struct tcpr_state *st,
			const uint8_t *q)
{
	const uint8_t *tail = q + st->inq_len + st->outq_len - st->unsent_len;
	int v4 = st->family == AF_INET || (st->flags & TCPR_F_V4MAPPED), raw;

	if (how == PLAIN) {
		CHECK_RC(tcpr_activate(n, tail, st->unsent_len), TCPR_OK);
		return;
	}
	raw = socket(v4 ? AF_INET : AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
	REQUIRE(raw >= 0);
	if (how == ACK_FAILS)
		fi_arm((struct fault){ FI_SENDTO, ANY, ANY, 0, FAULT_ERRNO, 0 });
	errno = 0;
	CHECK_RC(tcpr_activate_ack(n, st, raw, tail, st->unsent_len),
		 how == ACK_FAILS ? TCPR_E_ACK : TCPR_OK);
	if (how == ACK_FAILS)
		CHECK(fi_fired && errno == FAULT_ERRNO);
	fi_disarm();
	close(raw);
}

/* into: restore into a socket made beforehand (tcpr_restore_into_many) instead of
 * tcpr_restore making one. */
static void roundtrip_(enum mode m, int a_is_server, enum activation how, int into)
{
	struct staged sg;
	struct tcpr_state st;
	struct resets r0;
	uint8_t *q = NULL;
	uint64_t a_read = 0;
	int n = -1, old_a, nfds;

	if (stage(&sg, m, a_is_server) < 0) {
		CHECK(!"staging the connection");
		close_pair(&sg.p);
		return;
	}
	r0 = resets_now();
	CHECK(r0.out_rsts >= 0);
	/* Isolate (b already drops), freeze, dump. */
	CHECK(drop_all(sg.p.a) == 0);
	CHECK_RC(tcpr_freeze(sg.p.a), TCPR_OK);
	CHECK(is_frozen(sg.p.a));
	st.size = sizeof(st);
	CHECK_RC(tcpr_dump(sg.p.a, &st, &q), TCPR_OK);
	check_dump(&sg, &st, q, m);
	if (res->failed)
		goto out;
	/* Release: the old fd is gone, the peer sees neither EOF nor reset. */
	old_a = sg.p.a;
	CHECK_RC(tcpr_release(sg.p.a), TCPR_OK);
	sg.p.a = -1;
	CHECK(!fd_is_open(old_a));
	CHECK(undrop(sg.p.b) == 0);
	CHECK(stays_silent(sg.p.b, 100));
	CHECK(tcp_state(sg.p.b) == TCP_ESTABLISHED);

	/* Restore (the listener still holds a's port when a is the server: SK_FORCE_REUSE). */
	nfds = count_fds();
	if (into) {
		const struct tcpr_state *stp = &st;
		const uint8_t *qp = q;
		int rc = -1, err = 0;
		n = socket(st.family, SOCK_STREAM | SOCK_CLOEXEC, 0);
		REQUIRE(n >= 0);
		CHECK(tcpr_restore_into_many(&n, &stp, &qp, 1, &rc, &err) == 0);
		CHECK_RC(rc, TCPR_OK);
	} else {
		CHECK_RC(tcpr_restore(&st, q, &n), TCPR_OK);
	}
	REQUIRE(n >= 0);
	CHECK(count_fds() == nfds + 1);
	CHECK(is_frozen(n));
	CHECK(tcp_state(n) == TCP_ESTABLISHED);
	CHECK(sock_port(n) == st.src_port);
	CHECK(INQ(n) == (int)st.inq_len);
	CHECK(stays_silent(sg.p.b, 50)); /* repair mode: nothing sent yet */
	activate_as(how, n, &st, q);
	CHECK(!is_frozen(n));
	set_nonblock(n);

	/* b gets all of a's stream (the lost head is retransmitted), exactly once. */
	CHECK(recv_pat(sg.p.b, A2B, &sg.b_read, sg.a_sent - sg.b_read) == 0);
	/* The restored side reads its old receive queue first, then new data. */
	CHECK(recv_pat(n, B2A, &a_read, RECV_BYTES) == 0);
	CHECK(send_pat(sg.p.b, B2A, &sg.b_sent, 100000, 0) == 100000);
	CHECK(recv_pat(n, B2A, &a_read, 100000) == 0);
	CHECK(send_pat(n, A2B, &sg.a_sent, 100000, 0) == 100000);
	CHECK(recv_pat(sg.p.b, A2B, &sg.b_read, 100000) == 0);
	CHECK(OUTQ(n) == 0 || WAIT_UNTIL(OUTQ(n) == 0, TIMEOUT_MS));
	CHECK_NO_RESETS(r0, 1); /* the release */
out:
	free(q);
	if (n >= 0)
		close(n);
	close_pair(&sg.p);
}

static void roundtrip(enum mode m, int a_is_server, enum activation how)
{
	roundtrip_(m, a_is_server, how, 0);
}

static void test_roundtrip_ipv4_client(void) { roundtrip(V4, 0, PLAIN); }
static void test_roundtrip_ipv6_client(void) { roundtrip(V6, 0, PLAIN); }
static void test_roundtrip_v4mapped_client(void) { roundtrip(MAPPED, 0, PLAIN); }
/* The server side shares its port with the listener, which stays open (SK_FORCE_REUSE). */
static void test_roundtrip_ipv4_server_activate_ack_lost(void) { roundtrip(V4, 1, ACK_FAILS); }
static void test_roundtrip_ipv6_server_activate_ack(void) { roundtrip(V6, 1, WITH_ACK); }
static void test_roundtrip_v4mapped_server_activate_ack(void) { roundtrip(MAPPED, 1, WITH_ACK); }
static void test_roundtrip_ipv6_restore_into(void) { roundtrip_(V6, 0, WITH_ACK, 1); }
static void test_roundtrip_v4mapped_server_restore_into(void) { roundtrip_(MAPPED, 1, WITH_ACK, 1); }

/* restore_into refuses a socket of the other family and a non-socket, and touches neither. */
static void test_restore_into_refusals(void)
{
	struct staged sg;
	struct tcpr_state st;
	uint8_t *q = NULL;
	int v4, pipefd[2], nfds;

	if (stage(&sg, V6, 0) < 0) {
		CHECK(!"staging the connection");
		close_pair(&sg.p);
		return;
	}
	CHECK(drop_all(sg.p.a) == 0);
	CHECK_RC(tcpr_freeze(sg.p.a), TCPR_OK);
	st.size = sizeof(st);
	CHECK_RC(tcpr_dump(sg.p.a, &st, &q), TCPR_OK);
	v4 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	REQUIRE(v4 >= 0 && pipe(pipefd) == 0);
	nfds = count_fds();
	CHECK_RC(tcpr_restore_into(v4, &st, q), TCPR_E_FAMILY);
	CHECK(errno == EAFNOSUPPORT);
	CHECK(!is_frozen(v4) && sock_port(v4) == 0);
	CHECK_RC(tcpr_restore_into(pipefd[0], &st, q), TCPR_E_NOT_SOCKET);
	CHECK(count_fds() == nfds);
	CHECK_RC(tcpr_resume(sg.p.a), TCPR_OK); /* the original carries on */
	free(q);
	close(v4);
	close(pipefd[0]);
	close(pipefd[1]);
	close_pair(&sg.p);
}

/* The failed-move path: freeze + dump, then resume on the same socket; nothing is lost. */
static void test_resume_after_freeze_and_dump_loses_nothing(void)
{
	struct staged sg;
	struct tcpr_state st;
	struct resets r0;
	uint8_t *q = NULL;
	uint64_t a_read = 0;

	if (stage(&sg, V6, 0) < 0) {
		CHECK(!"staging the connection");
		close_pair(&sg.p);
		return;
	}
	r0 = resets_now();
	CHECK(drop_all(sg.p.a) == 0);
	CHECK_RC(tcpr_freeze(sg.p.a), TCPR_OK);
	st.size = sizeof(st);
	CHECK_RC(tcpr_dump(sg.p.a, &st, &q), TCPR_OK);
	check_dump(&sg, &st, q, V6);
	free(q);
	CHECK_RC(tcpr_resume(sg.p.a), TCPR_OK);
	CHECK(!is_frozen(sg.p.a));
	CHECK(undrop(sg.p.a) == 0 && undrop(sg.p.b) == 0);
	CHECK(recv_pat(sg.p.b, A2B, &sg.b_read, sg.a_sent - sg.b_read) == 0);
	CHECK(recv_pat(sg.p.a, B2A, &a_read, RECV_BYTES) == 0);
	CHECK(send_pat(sg.p.b, B2A, &sg.b_sent, 50000, 0) == 50000);
	CHECK(recv_pat(sg.p.a, B2A, &a_read, 50000) == 0);
	CHECK(send_pat(sg.p.a, A2B, &sg.a_sent, 50000, 0) == 50000);
	CHECK(recv_pat(sg.p.b, A2B, &sg.b_read, 50000) == 0);
	CHECK_NO_RESETS(r0, 0);
	close_pair(&sg.p);
}

static void test_dump_of_unfrozen_socket_refused_socket_keeps_working(void)
{
	struct pair p;
	struct tcpr_state st;
	uint8_t *q = (uint8_t *)&st;
	uint64_t ao = 0, bo = 0, ai = 0, bi = 0;

	REQUIRE(make_pair(&p, V4, 0, 0) == 0);
	CHECK(send_pat(p.b, B2A, &bo, 1000, 0) == 1000);
	CHECK(WAIT_UNTIL(INQ(p.a) == 1000, TIMEOUT_MS));
	st.size = sizeof(st);
	errno = 0;
	CHECK_RC(tcpr_dump(p.a, &st, &q), TCPR_E_QUEUE_SEL);
	CHECK(errno == EPERM);
	CHECK(q == NULL);
	CHECK(!is_frozen(p.a));
	CHECK(recv_pat(p.a, B2A, &ai, 1000) == 0);
	CHECK(send_pat(p.a, A2B, &ao, 1000, 0) == 1000);
	CHECK(recv_pat(p.b, A2B, &bi, 1000) == 0);
	close_pair(&p);
}

/* A socket that freeze refuses is left as it was: not in repair mode and still working. */
static void check_untouched_tcp(int fd)
{
	CHECK(!is_frozen(fd));
}

static void test_refuse_non_sockets(void)
{
	int fds[2], closed;
	char c = 0;

	REQUIRE(pipe(fds) == 0);
	errno = 0;
	CHECK_RC(tcpr_freeze(fds[0]), TCPR_E_NOT_SOCKET);
	CHECK(errno == ENOTSOCK);
	CHECK(write(fds[1], "x", 1) == 1 && read(fds[0], &c, 1) == 1 && c == 'x');
	close(fds[0]);
	close(fds[1]);

	closed = open("/dev/null", O_RDONLY | O_CLOEXEC);
	close(closed);
	errno = 0;
	CHECK_RC(tcpr_freeze(closed), TCPR_E_NOT_SOCKET);
	CHECK(errno == EBADF);
	CHECK_RC(tcpr_freeze(-1), TCPR_E_NOT_SOCKET);
}

static void test_refuse_udp_and_unix(void)
{
	int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), sp[2];
	struct sockaddr_in sin = { .sin_family = AF_INET,
				   .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t l = sizeof(sin);
	char c = 0;

	REQUIRE(u >= 0);
	CHECK(bind(u, (struct sockaddr *)&sin, sizeof(sin)) == 0);
	CHECK(getsockname(u, (struct sockaddr *)&sin, &l) == 0);
	CHECK(connect(u, (struct sockaddr *)&sin, sizeof(sin)) == 0);
	errno = 0;
	CHECK_RC(tcpr_freeze(u), TCPR_E_NOT_TCP);
	CHECK(errno == EPROTONOSUPPORT);
	CHECK(send(u, "u", 1, 0) == 1 && recv(u, &c, 1, 0) == 1 && c == 'u');
	close(u);

	REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0);
	CHECK_RC(tcpr_freeze(sp[0]), TCPR_E_NOT_TCP);
	CHECK(write(sp[0], "s", 1) == 1 && read(sp[1], &c, 1) == 1 && c == 's');
	close(sp[0]);
	close(sp[1]);
	REQUIRE(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sp) == 0);
	CHECK_RC(tcpr_freeze(sp[0]), TCPR_E_NOT_TCP);
	close(sp[0]);
	close(sp[1]);
}

static void test_refuse_mptcp(void)
{
	struct sockaddr_in sin = { .sin_family = AF_INET,
				   .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t l = sizeof(sin);
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_MPTCP), c, s;
	uint64_t o = 0, i = 0;

	if (ls < 0) {
		skip("kernel cannot create MPTCP sockets (the check is on SO_PROTOCOL)");
		return;
	}
	CHECK_RC(tcpr_freeze(ls), TCPR_E_MPTCP); /* before any state check */
	REQUIRE(bind(ls, (struct sockaddr *)&sin, sizeof(sin)) == 0 && listen(ls, 1) == 0);
	REQUIRE(getsockname(ls, (struct sockaddr *)&sin, &l) == 0);
	c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_MPTCP);
	REQUIRE(c >= 0 && connect(c, (struct sockaddr *)&sin, sizeof(sin)) == 0);
	s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
	REQUIRE(s >= 0);
	CHECK(tcp_state(c) == TCP_ESTABLISHED);
	errno = 0;
	CHECK_RC(tcpr_freeze(c), TCPR_E_MPTCP);
	CHECK(errno == ENOPROTOOPT);
	CHECK_RC(tcpr_freeze(s), TCPR_E_MPTCP);
	CHECK(send_pat(c, A2B, &o, 20000, 0) == 20000 && recv_pat(s, A2B, &i, 20000) == 0);
	close(c);
	close(s);
	close(ls);
}

static void test_refuse_listen_and_unconnected(void)
{
	struct pair p;
	int fresh = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);

	REQUIRE(fresh >= 0);
	errno = 0;
	CHECK_RC(tcpr_freeze(fresh), TCPR_E_STATE); /* CLOSE */
	CHECK(errno == EINVAL);
	check_untouched_tcp(fresh);
	close(fresh);

	REQUIRE(make_pair(&p, V4, 0, 0) == 0);
	close(p.a);
	close(p.b);
	p.a = p.b = -1;
	CHECK_RC(tcpr_freeze(p.l), TCPR_E_STATE);
	check_untouched_tcp(p.l);
	/* The listener still accepts. */
	close_pair(&p);
	REQUIRE(make_pair(&p, V6, 0, 0) == 0);
	CHECK_RC(tcpr_freeze(p.l), TCPR_E_STATE);
	{
		struct sockaddr_storage ss;
		socklen_t sl = loop_addr(V6, sock_port(p.l), &ss, 0);
		int c = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0), s;
		CHECK(connect(c, (struct sockaddr *)&ss, sl) == 0);
		s = accept4(p.l, NULL, NULL, SOCK_CLOEXEC);
		CHECK(s >= 0);
		close(c);
		if (s >= 0)
			close(s);
	}
	close_pair(&p);
}

static void test_refuse_syn_sent_then_connection_completes(void)
{
	struct sockaddr_storage ss;
	socklen_t sl;
	int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), c, s;
	struct pollfd pf;

	REQUIRE(l >= 0);
	sl = loop_addr(V4, 0, &ss, 1);
	REQUIRE(bind(l, (struct sockaddr *)&ss, sl) == 0 && listen(l, 1) == 0);
	REQUIRE(drop_all(l) == 0); /* the SYN is lost */
	sl = loop_addr(V4, sock_port(l), &ss, 0);
	c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	REQUIRE(c >= 0);
	CHECK(connect(c, (struct sockaddr *)&ss, sl) < 0 && errno == EINPROGRESS);
	CHECK(tcp_state(c) == TCP_SYN_SENT);
	errno = 0;
	CHECK_RC(tcpr_freeze(c), TCPR_E_STATE);
	CHECK(tcp_state(c) == TCP_SYN_SENT);
	check_untouched_tcp(c);
	/* The SYN retransmission (after ~1 s) completes the connection. */
	CHECK(undrop(l) == 0);
	pf.fd = c;
	pf.events = POLLOUT;
	CHECK(poll(&pf, 1, TIMEOUT_MS) == 1 && get_int(c, SOL_SOCKET, SO_ERROR) == 0);
	CHECK(tcp_state(c) == TCP_ESTABLISHED);
	s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
	CHECK(s >= 0);
	if (s >= 0)
		close(s);
	close(c);
	close(l);
}

/* freeze + dump fd into st, the queue bytes into *q (the caller frees them). */
static int freeze_dump(int fd, struct tcpr_state *st, uint8_t **q)
{
	int rc = tcpr_freeze(fd);
	if (rc)
		return rc;
	st->size = sizeof(*st);
	return tcpr_dump(fd, st, q);
}

/* Half-closed states freeze and dump with every FIN kept out of the byte counts — both ends'
 * dumps agree on the sequence numbers — and resume leaves them working. */
static void test_half_closed_freeze_dump_resume(void)
{
	struct pair p;
	struct tcpr_state sa, sb;
	uint8_t *qa = NULL, *qb = NULL;
	uint64_t o = 0, i = 0, bo = 0, bi = 0;
	uint32_t b_snd;
	char c;

	REQUIRE(make_pair(&p, V4, 0, 0) == 0);
	/* FIN_WAIT1: 1000 bytes and the FIN sent, all lost on the way. */
	CHECK(drop_all(p.b) == 0);
	CHECK(send_pat(p.a, A2B, &o, 1000, 0) == 1000);
	CHECK(shutdown(p.a, SHUT_WR) == 0);
	CHECK(tcp_state(p.a) == TCP_FIN_WAIT1);
	CHECK_RC(freeze_dump(p.a, &sa, &qa), TCPR_OK);
	CHECKF(sa.tcp_state == TCP_FIN_WAIT1 && sa.outq_len == 1000 && sa.unsent_len == 0 &&
		       !(sa.flags & TCPR_F_FIN_UNSENT),
	       "state %u outq %u unsent %u flags %#x", sa.tcp_state, sa.outq_len, sa.unsent_len,
	       sa.flags);
	CHECK(qa && matches_pat(qa + sa.inq_len, 1000, A2B, 0));
	CHECK_RC(freeze_dump(p.b, &sb, &qb), TCPR_OK); /* ESTABLISHED, has seen nothing */
	CHECK(sb.rcv_seq == sa.snd_seq - sa.outq_len && sb.snd_seq == sa.rcv_seq);
	CHECK_RC(tcpr_resume(p.a), TCPR_OK);
	CHECK_RC(tcpr_resume(p.b), TCPR_OK);
	free(qa);
	free(qb);
	qa = qb = NULL;
	CHECK(undrop(p.b) == 0);
	CHECK(recv_pat(p.b, A2B, &i, 1000) == 0);
	CHECK(WAIT_UNTIL(recv(p.b, &c, 1, MSG_DONTWAIT) == 0, TIMEOUT_MS)); /* then EOF */

	/* FIN_WAIT2 and CLOSE_WAIT. */
	CHECK(WAIT_UNTIL(tcp_state(p.a) == TCP_FIN_WAIT2, TIMEOUT_MS));
	CHECK(tcp_state(p.b) == TCP_CLOSE_WAIT);
	CHECK_RC(freeze_dump(p.a, &sa, &qa), TCPR_OK);
	CHECK_RC(freeze_dump(p.b, &sb, &qb), TCPR_OK);
	CHECK(sa.tcp_state == TCP_FIN_WAIT2 && sa.outq_len == 0 && sa.unsent_len == 0);
	CHECK(sb.tcp_state == TCP_CLOSE_WAIT && sb.inq_len == 0 && sb.outq_len == 0);
	CHECK(sb.rcv_seq == sa.snd_seq && sb.snd_seq == sa.rcv_seq);
	b_snd = sb.snd_seq;
	CHECK_RC(tcpr_resume(p.a), TCPR_OK);
	CHECK_RC(tcpr_resume(p.b), TCPR_OK);
	free(qa);
	free(qb);
	qa = qb = NULL;
	CHECK(send_pat(p.b, B2A, &bo, 20000, 0) == 20000);
	CHECK(recv_pat(p.a, B2A, &bi, 20000) == 0);

	/* LAST_ACK: b's FIN is lost. */
	CHECK(drop_all(p.a) == 0);
	CHECK(shutdown(p.b, SHUT_WR) == 0);
	CHECK(tcp_state(p.b) == TCP_LAST_ACK);
	CHECK_RC(freeze_dump(p.b, &sb, &qb), TCPR_OK);
	CHECK(sb.tcp_state == TCP_LAST_ACK && sb.outq_len == 0 && sb.snd_seq == b_snd + 20000);
	CHECK_RC(tcpr_resume(p.b), TCPR_OK);
	free(qb);
	CHECK(undrop(p.a) == 0);
	CHECK(WAIT_UNTIL(recv(p.a, &c, 1, MSG_DONTWAIT) == 0, TIMEOUT_MS));
	CHECK(WAIT_UNTIL(tcp_state(p.b) == TCP_CLOSE, TIMEOUT_MS));
	close_pair(&p);
}

/* A CLOSE_WAIT (IPv4) and a FIN_WAIT2 (IPv6) connection move on loopback — release,
 * restore, tcpr_activate_ack re-creating the FINs — then carry on and close normally. */
static void test_half_closed_roundtrip_close_wait_and_fin_wait2(void)
{
	struct pair p;
	struct tcpr_state st;
	struct resets r0;
	uint8_t *q = NULL;
	uint64_t o = 0, i = 0, bo = 0, bi = 0;
	int n = -1, raw4 = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
	int raw6 = socket(AF_INET6, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
	char c;

	REQUIRE(raw4 >= 0 && raw6 >= 0);
	/* CLOSE_WAIT: b sent 500 bytes and its FIN; a read none of it. */
	REQUIRE(make_pair(&p, V4, 0, 0) == 0);
	r0 = resets_now();
	CHECK(send_pat(p.b, B2A, &bo, 500, 0) == 500);
	CHECK(shutdown(p.b, SHUT_WR) == 0);
	CHECK(WAIT_UNTIL(tcp_state(p.a) == TCP_CLOSE_WAIT && tcp_state(p.b) == TCP_FIN_WAIT2,
			 TIMEOUT_MS));
	CHECK_RC(freeze_dump(p.a, &st, &q), TCPR_OK);
	CHECK(st.tcp_state == TCP_CLOSE_WAIT && st.inq_len == 500);
	CHECK_RC(tcpr_release(p.a), TCPR_OK);
	p.a = -1;
	CHECK(stays_silent(p.b, 50));
	CHECK_RC(tcpr_restore(&st, q, &n), TCPR_OK);
	REQUIRE(n >= 0);
	CHECK_RC(tcpr_activate_ack(n, &st, raw4, NULL, 0), TCPR_OK);
	CHECK(tcp_state(n) == TCP_CLOSE_WAIT);
	set_nonblock(n);
	CHECK(recv_pat(n, B2A, &bi, 500) == 0);
	CHECK(WAIT_UNTIL(recv(n, &c, 1, MSG_DONTWAIT) == 0, TIMEOUT_MS)); /* EOF after them */
	CHECK(send_pat(n, A2B, &o, 20000, 0) == 20000);
	CHECK(recv_pat(p.b, A2B, &i, 20000) == 0);
	CHECK(shutdown(n, SHUT_WR) == 0);
	CHECK(WAIT_UNTIL(recv(p.b, &c, 1, MSG_DONTWAIT) == 0, TIMEOUT_MS));
	CHECK(WAIT_UNTIL(tcp_state(n) == TCP_CLOSE, TIMEOUT_MS));
	CHECK_NO_RESETS(r0, 1); /* the release: CLOSE_WAIT -> CLOSE counts like ESTABLISHED */
	free(q);
	q = NULL;
	close(n);
	n = -1;
	close_pair(&p);

	/* FIN_WAIT2: a's FIN acknowledged, b still sending. */
	o = i = bo = bi = 0;
	REQUIRE(make_pair(&p, V6, 0, 0) == 0);
	r0 = resets_now();
	CHECK(shutdown(p.a, SHUT_WR) == 0);
	CHECK(WAIT_UNTIL(tcp_state(p.a) == TCP_FIN_WAIT2, TIMEOUT_MS));
	CHECK_RC(freeze_dump(p.a, &st, &q), TCPR_OK);
	CHECK(st.tcp_state == TCP_FIN_WAIT2);
	CHECK_RC(tcpr_release(p.a), TCPR_OK);
	p.a = -1;
	CHECK_RC(tcpr_restore(&st, q, &n), TCPR_OK);
	REQUIRE(n >= 0);
	CHECK_RC(tcpr_activate_ack(n, &st, raw6, NULL, 0), TCPR_OK);
	/* At once (the injected ACK of our FIN), not after a FIN retransmission 3 s later. */
	CHECK(WAIT_UNTIL(tcp_state(n) == TCP_FIN_WAIT2, 100));
	set_nonblock(n);
	CHECK(send_pat(p.b, B2A, &bo, 20000, 0) == 20000);
	CHECK(recv_pat(n, B2A, &bi, 20000) == 0);
	CHECK(shutdown(p.b, SHUT_WR) == 0);
	CHECK(WAIT_UNTIL(recv(n, &c, 1, MSG_DONTWAIT) == 0, TIMEOUT_MS));
	CHECK(WAIT_UNTIL(tcp_state(p.b) == TCP_CLOSE, TIMEOUT_MS));
	CHECK_NO_RESETS(r0, 0); /* FIN_WAIT2 -> CLOSE is not counted */
	free(q);
	close(n);
	close_pair(&p);
	close(raw4);
	close(raw6);
}

/* Without CAP_NET_ADMIN TCP_REPAIR is refused: TCPR_E_REPAIR_ON, socket untouched. */
static void test_refuse_without_cap_net_admin(void)
{
	struct pair p;
	uint64_t o = 0, i = 0;
	pid_t pid;
	int status = -1;

	REQUIRE(make_pair(&p, V4, 0, 0) == 0);
	pid = fork();
	if (pid == 0) {
		int rc, e;
		if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
			_exit(3);
		errno = 0;
		rc = tcpr_freeze(p.a);
		e = errno;
		_exit(rc == TCPR_E_REPAIR_ON && e == EPERM ? 0 : 1);
	}
	REQUIRE(pid > 0);
	CHECK(waitpid(pid, &status, 0) == pid);
	CHECKF(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status %#x", status);
	check_untouched_tcp(p.a);
	CHECK(send_pat(p.a, A2B, &o, 5000, 0) == 5000 && recv_pat(p.b, A2B, &i, 5000) == 0);
	close_pair(&p);
}

/* release refuses what cannot be put in repair mode, and then leaves the fd open. */
static void test_release_refusals_leave_fd_open(void)
{
	struct pair p;
	int fds[2], u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	char c = 0;

	REQUIRE(make_pair(&p, V4, 0, 0) == 0);
	errno = 0;
	CHECK_RC(tcpr_release(p.l), TCPR_E_REPAIR_ON);
	CHECK(errno == EPERM && fd_is_open(p.l));
	CHECK(get_int(p.l, SOL_SOCKET, SO_ACCEPTCONN) == 1);
	close_pair(&p);

	REQUIRE(pipe(fds) == 0);
	CHECK_RC(tcpr_release(fds[0]), TCPR_E_REPAIR_ON);
	CHECK(fd_is_open(fds[0]));
	CHECK(write(fds[1], "p", 1) == 1 && read(fds[0], &c, 1) == 1 && c == 'p');
	close(fds[0]);
	close(fds[1]);

	REQUIRE(u >= 0);
	CHECK_RC(tcpr_release(u), TCPR_E_REPAIR_ON);
	CHECK(fd_is_open(u));
	close(u);
}

/* Documented behaviour: release of an ESTABLISHED socket that was not frozen switches repair
 * on itself and closes silently (the rollback of a move releases a restored socket whether or
 * not activate already switched repair off). The peer sees neither FIN nor RST. */
static void test_release_of_unfrozen_established_socket_is_silent(void)
{
	struct pair p;
	struct resets r0 = resets_now();

	REQUIRE(make_pair(&p, V4, 0, 0) == 0);
	CHECK_RC(tcpr_release(p.a), TCPR_OK);
	CHECK(!fd_is_open(p.a));
	p.a = -1;
	CHECK(stays_silent(p.b, 100));
	CHECK(tcp_state(p.b) == TCP_ESTABLISHED);
	CHECK_NO_RESETS(r0, 1); /* the release */
	close_pair(&p);
}

/* Every step of dump fails with its own code; the buffer is freed (LSan), errno is the
 * step's, *queues is NULL, and the socket is unharmed: a later dump succeeds. */
static void test_dump_step_failures(void)
{
	struct staged sg;
	struct tcpr_state st;
	uint8_t *q;
	struct {
		struct fault f;
		int want;
	} cases[] = {
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_INFO, 0, FAULT_ERRNO, 0 }, TCPR_E_INFO },
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_INFO, 0, ENOTSOCK, 0 }, TCPR_E_NOT_SOCKET },
		{ { FI_GETSOCKNAME, ANY, ANY, 0, FAULT_ERRNO, 0 }, TCPR_E_NAME },
		{ { FI_GETPEERNAME, ANY, ANY, 0, FAULT_ERRNO, 0 }, TCPR_E_NAME },
		{ { FI_IOCTL, SIOCINQ, ANY, 0, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_LEN },
		{ { FI_IOCTL, SIOCOUTQ, ANY, 0, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_LEN },
		{ { FI_IOCTL, SIOCOUTQNSD, ANY, 0, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_LEN },
		{ { FI_MALLOC, ANY, ANY, 0, ENOMEM, 0 }, TCPR_E_NOMEM },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR_QUEUE, 0, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEL },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR_QUEUE, 1, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEL },
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_QUEUE_SEQ, 0, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEQ },
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_QUEUE_SEQ, 1, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEQ },
		{ { FI_RECV, ANY, ANY, 0, FAULT_ERRNO, 0 }, TCPR_E_PEEK },
		{ { FI_RECV, ANY, ANY, 1, FAULT_ERRNO, 0 }, TCPR_E_PEEK },
		/* A queue that keeps changing between its length and its bytes (a transient
		 * change is read again: test_dump_rereads_a_queue_that_changed_once). */
		{ { FI_RECV, ANY, ANY, EVERY, 0, 1 }, TCPR_E_PEEK },       /* queue shrank */
		{ { FI_RECV, ANY, ANY, EVERY, 0, 1 << 30 }, TCPR_E_PEEK }, /* queue grew */
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_MAXSEG, 0, FAULT_ERRNO, 0 }, TCPR_E_MSS },
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_TIMESTAMP, 0, FAULT_ERRNO, 0 }, TCPR_E_TIMESTAMP },
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_REPAIR_WINDOW, 0, FAULT_ERRNO, 0 }, TCPR_E_WINDOW },
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_NODELAY, 0, FAULT_ERRNO, 0 }, TCPR_E_SOCKOPT },
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_KEEPCNT, 0, FAULT_ERRNO, 0 }, TCPR_E_SOCKOPT },
		{ { FI_GETSOCKOPT, SOL_SOCKET, SO_BUF_LOCK, 0, FAULT_ERRNO, 0 }, TCPR_E_SOCKOPT },
		{ { FI_GETSOCKOPT, SOL_TCP, TCP_CONGESTION, 0, FAULT_ERRNO, 0 }, TCPR_E_SOCKOPT },
		{ { FI_GETSOCKOPT, SOL_IP, IP_TTL, 0, FAULT_ERRNO, 0 }, TCPR_E_SOCKOPT },
	};
	int nfds;

	if (stage(&sg, V4, 0) < 0) {
		CHECK(!"staging the connection");
		close_pair(&sg.p);
		return;
	}
	CHECK(drop_all(sg.p.a) == 0);
	CHECK_RC(tcpr_freeze(sg.p.a), TCPR_OK);
	nfds = count_fds();
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc, e;
		q = (uint8_t *)&st;
		st.size = sizeof(st);
		fi_arm(cases[i].f);
		errno = 0;
		rc = tcpr_dump(sg.p.a, &st, &q);
		e = errno;
		fi_disarm();
		CHECKF(fi_fired && rc == cases[i].want && q == NULL &&
			       (cases[i].f.err == 0 || e == cases[i].f.err),
		       "case %zu: fired %d, got %d (%s) errno %d, queues %p, want %d", i, fi_fired,
		       rc, tcpr_strerror(rc), e, (void *)q, cases[i].want);
		CHECK(is_frozen(sg.p.a));
	}
	CHECK(count_fds() == nfds);
	/* Unharmed: a full dump still matches. */
	st.size = sizeof(st);
	q = NULL;
	CHECK_RC(tcpr_dump(sg.p.a, &st, &q), TCPR_OK);
	check_dump(&sg, &st, q, V4);
	free(q);
	close_pair(&sg.p);
}

/* A queue that changes once between its length and its bytes (segments processed from the
 * socket's backlog when one of dump's calls releases the lock) is read again: the dump
 * succeeds and matches. */
static void test_dump_rereads_a_queue_that_changed_once(void)
{
	struct staged sg;
	struct tcpr_state st;
	uint8_t *q = NULL;
	struct fault once[] = {
		{ FI_RECV, ANY, ANY, 0, 0, 1 },       /* shrank */
		{ FI_RECV, ANY, ANY, 1, 0, 1 << 30 }, /* grew */
	};

	if (stage(&sg, V4, 0) < 0) {
		CHECK(!"staging the connection");
		close_pair(&sg.p);
		return;
	}
	CHECK(drop_all(sg.p.a) == 0);
	CHECK_RC(tcpr_freeze(sg.p.a), TCPR_OK);
	for (size_t i = 0; i < sizeof(once) / sizeof(once[0]); i++) {
		st.size = sizeof(st);
		fi_arm(once[i]);
		CHECK_RC(tcpr_dump(sg.p.a, &st, &q), TCPR_OK);
		fi_disarm();
		CHECK(fi_fired);
		check_dump(&sg, &st, q, V4);
		free(q);
		q = NULL;
	}
	close_pair(&sg.p);
}

/* Every step of restore fails with its own code, closes the half-built socket (no fd leak),
 * keeps errno, and sends nothing to the peer; after that a clean restore carries on the
 * stream. activate's steps fail with their own codes too, and a failed release (close())
 * leaves the socket frozen and releasable. */
static void test_restore_activate_release_step_failures(void)
{
	struct staged sg;
	struct tcpr_state st;
	struct resets r0;
	uint8_t *q = NULL;
	uint64_t a_read = 0;
	int n = -1, nfds, closes = 1 /* the release */, after_connect = 0;
	struct {
		struct fault f;
		int want;
	} cases[] = {
		{ { FI_SOCKET, ANY, ANY, 0, EMFILE, 0 }, TCPR_E_SOCKET },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR, 0, FAULT_ERRNO, 0 }, TCPR_E_REPAIR_ON },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR_QUEUE, 0, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEL },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_QUEUE_SEQ, 0, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEQ },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR_QUEUE, 1, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEL },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_QUEUE_SEQ, 1, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEQ },
		{ { FI_SETSOCKOPT, SOL_IP, IP_FREEBIND, 0, FAULT_ERRNO, 0 }, TCPR_E_BIND },
		{ { FI_BIND, ANY, ANY, 0, EADDRINUSE, 0 }, TCPR_E_BIND },
		{ { FI_CONNECT, ANY, ANY, 0, EADDRNOTAVAIL, 0 }, TCPR_E_CONNECT },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR_OPTIONS, 0, FAULT_ERRNO, 0 }, TCPR_E_OPTIONS },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_TIMESTAMP, 0, FAULT_ERRNO, 0 }, TCPR_E_TIMESTAMP },
		{ { FI_SETSOCKOPT, SOL_SOCKET, SO_SNDBUFFORCE, 0, FAULT_ERRNO, 0 }, TCPR_E_BUF },
		{ { FI_SETSOCKOPT, SOL_SOCKET, SO_RCVBUFFORCE, 0, FAULT_ERRNO, 0 }, TCPR_E_BUF },
		{ { FI_SETSOCKOPT, SOL_SOCKET, SO_BUF_LOCK, 0, FAULT_ERRNO, 0 }, TCPR_E_BUF },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR_QUEUE, 2, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEL },
		{ { FI_SEND, ANY, ANY, 0, FAULT_ERRNO, 0 }, TCPR_E_RECVQ },
		{ { FI_SEND, ANY, ANY, 0, 0, 0 }, TCPR_E_RECVQ }, /* no progress: no hang */
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR_WINDOW, 0, FAULT_ERRNO, 0 }, TCPR_E_WINDOW },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR_QUEUE, 3, FAULT_ERRNO, 0 }, TCPR_E_QUEUE_SEL },
		{ { FI_SEND, ANY, ANY, 1, FAULT_ERRNO, 0 }, TCPR_E_SENDQ },
		{ { FI_SEND, ANY, ANY, 1, 0, 0 }, TCPR_E_SENDQ },
		{ { FI_SETSOCKOPT, SOL_TCP, TCP_CONGESTION, 0, FAULT_ERRNO, 0 }, TCPR_E_SOCKOPT },
	};

	if (stage(&sg, V4, 0) < 0) {
		CHECK(!"staging the connection");
		close_pair(&sg.p);
		return;
	}
	r0 = resets_now();
	CHECK(drop_all(sg.p.a) == 0);
	CHECK_RC(tcpr_freeze(sg.p.a), TCPR_OK);
	st.size = sizeof(st);
	CHECK_RC(tcpr_dump(sg.p.a, &st, &q), TCPR_OK);
	REQUIRE(q != NULL && !res->failed);
	CHECK((st.buf_lock & 3) != 3); /* SO_BUF_LOCK is set on restore (autotuned buffers) */

	/* release: close() failing leaves the socket frozen; then it is released for real. */
	fi_arm((struct fault){ FI_CLOSE, ANY, ANY, 0, EIO, 0 });
	CHECK_RC(tcpr_release(sg.p.a), TCPR_E_CLOSE);
	fi_disarm();
	CHECK(fd_is_open(sg.p.a) && is_frozen(sg.p.a));
	CHECK_RC(tcpr_release(sg.p.a), TCPR_OK);
	sg.p.a = -1;
	CHECK(undrop(sg.p.b) == 0);

	nfds = count_fds();
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc, e, fd = 123;
		/* A socket that failed after connect() closes from ESTABLISHED (silently). */
		closes += after_connect;
		after_connect |= cases[i].want == TCPR_E_CONNECT;
		fi_arm(cases[i].f);
		errno = 0;
		rc = tcpr_restore(&st, q, &fd);
		e = errno;
		fi_disarm();
		CHECKF(fi_fired && rc == cases[i].want && fd == -1 &&
			       e == (cases[i].f.err ? cases[i].f.err : ENOBUFS),
		       "case %zu: fired %d, got %d (%s) errno %d fd %d, want %d", i, fi_fired, rc,
		       tcpr_strerror(rc), e, fd, cases[i].want);
		CHECK(count_fds() == nfds);
	}
	CHECK(stays_silent(sg.p.b, 50));

	CHECK_RC(tcpr_restore(&st, q, &n), TCPR_OK);
	REQUIRE(n >= 0);
	/* activate_ack checks the state it is given before it leaves repair mode. */
	{
		struct tcpr_state bad = st;
		int raw = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
		bad.unsent_len = bad.outq_len + 1;
		CHECK_RC(tcpr_activate_ack(n, &bad, raw, NULL, 0), TCPR_E_INVALID);
		bad = st;
		bad.version = 0;
		CHECK_RC(tcpr_activate_ack(n, &bad, raw, NULL, 0), TCPR_E_VERSION);
		CHECK(is_frozen(n));
		close(raw);
	}
	/* activate: repair off refused -> still frozen, nothing sent; then the unsent send
	 * fails -> repair is off, the caller sends the tail itself. */
	fi_arm((struct fault){ FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR, 0, FAULT_ERRNO, 0 });
	CHECK_RC(tcpr_activate(n, q + st.inq_len + st.outq_len - st.unsent_len, st.unsent_len),
		 TCPR_E_REPAIR_OFF);
	fi_disarm();
	CHECK(errno == FAULT_ERRNO && is_frozen(n));
	CHECK(stays_silent(sg.p.b, 50));
	fi_arm((struct fault){ FI_SEND, ANY, ANY, 0, FAULT_ERRNO, 0 });
	CHECK_RC(tcpr_activate(n, q + st.inq_len + st.outq_len - st.unsent_len, st.unsent_len),
		 TCPR_E_UNSENT);
	fi_disarm();
	CHECK(errno == FAULT_ERRNO && !is_frozen(n));
	CHECK(send(n, q + st.inq_len + st.outq_len - st.unsent_len, st.unsent_len, 0) ==
	      (ssize_t)st.unsent_len);
	set_nonblock(n);
	CHECK(recv_pat(sg.p.b, A2B, &sg.b_read, sg.a_sent - sg.b_read) == 0);
	CHECK(recv_pat(n, B2A, &a_read, RECV_BYTES) == 0);
	CHECK(send_pat(n, A2B, &sg.a_sent, 10000, 0) == 10000);
	CHECK(recv_pat(sg.p.b, A2B, &sg.b_read, 10000) == 0);
	CHECK_NO_RESETS(r0, closes);
	free(q);
	close(n);
	close_pair(&sg.p);
}

/* freeze's own steps: TCP_INFO and socket options fail with their codes, socket untouched. */
static void test_freeze_step_failures(void)
{
	struct pair p;

	REQUIRE(make_pair(&p, V4, 0, 0) == 0);
	fi_arm((struct fault){ FI_GETSOCKOPT, SOL_SOCKET, SO_PROTOCOL, 0, FAULT_ERRNO, 0 });
	CHECK_RC(tcpr_freeze(p.a), TCPR_E_SOCKOPT);
	fi_arm((struct fault){ FI_GETSOCKOPT, SOL_TCP, TCP_INFO, 0, FAULT_ERRNO, 0 });
	CHECK_RC(tcpr_freeze(p.a), TCPR_E_INFO);
	fi_arm((struct fault){ FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR, 0, FAULT_ERRNO, 0 });
	CHECK_RC(tcpr_freeze(p.a), TCPR_E_REPAIR_ON);
	CHECK(errno == FAULT_ERRNO);
	fi_disarm();
	check_untouched_tcp(p.a);
	fi_arm((struct fault){ FI_SETSOCKOPT, SOL_TCP, TCP_REPAIR, 0, FAULT_ERRNO, 0 });
	CHECK_RC(tcpr_resume(p.a), TCPR_E_REPAIR_OFF);
	fi_disarm();
	close_pair(&p);
}

/* ------------------------------------------------------------------------------------ */

/* With arguments, only the tests whose names contain one of them (e.g. "half_closed"). */
int main(int argc, char **argv)
{
#define T(fn, netns) { #fn, fn, netns, 0, NULL, 0 }
	struct test tests[] = {
		T(test_strerror_every_code, 0),
		T(test_restore_refuses_corrupted_state_without_kernel, 0),
		T(test_dump_refuses_small_state_struct, 0),
		T(test_roundtrip_ipv4_client, 1),
		T(test_roundtrip_ipv6_client, 1),
		T(test_roundtrip_v4mapped_client, 1),
		T(test_roundtrip_ipv4_server_activate_ack_lost, 1),
		T(test_roundtrip_ipv6_server_activate_ack, 1),
		T(test_roundtrip_v4mapped_server_activate_ack, 1),
		T(test_roundtrip_ipv6_restore_into, 1),
		T(test_roundtrip_v4mapped_server_restore_into, 1),
		T(test_restore_into_refusals, 1),
		T(test_resume_after_freeze_and_dump_loses_nothing, 1),
		T(test_dump_of_unfrozen_socket_refused_socket_keeps_working, 1),
		T(test_refuse_non_sockets, 0),
		T(test_refuse_udp_and_unix, 1),
		T(test_refuse_mptcp, 1),
		T(test_refuse_listen_and_unconnected, 1),
		T(test_refuse_syn_sent_then_connection_completes, 1),
		T(test_half_closed_freeze_dump_resume, 1),
		T(test_half_closed_roundtrip_close_wait_and_fin_wait2, 1),
		T(test_refuse_without_cap_net_admin, 1),
		T(test_release_refusals_leave_fd_open, 1),
		T(test_release_of_unfrozen_established_socket_is_silent, 1),
		T(test_freeze_step_failures, 1),
		T(test_dump_step_failures, 1),
		T(test_dump_rereads_a_queue_that_changed_once, 1),
		T(test_restore_activate_release_step_failures, 1),
	};
#undef T

	size_t n = sizeof(tests) / sizeof(tests[0]);

	if (argc > 1) {
		size_t kept = 0;
		for (size_t i = 0; i < n; i++)
			for (int a = 1; a < argc; a++)
				if (strstr(tests[i].name, argv[a])) {
					tests[kept++] = tests[i];
					break;
				}
		if (!kept) {
			fprintf(stderr, "no test name contains any of the arguments\n");
			return 2;
		}
		n = kept;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);
	return run_all(tests, n) ? 1 : 0;
}
