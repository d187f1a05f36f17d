/*
 * break13_logflood - a leaking poll() server that, on command, makes the calls whose log lines
 * keepfix must not lose behind its rate limit (issue 13, change 2: `suppressed` at most once
 * per 10 s). Each connection is read to EOF and forgotten (CLOSE_WAIT, one `close_wait` line
 * each in log mode), so a test floods the log by connecting and closing.
 *
 * stdin commands (one per line):
 *   rlimit N   setrlimit(RLIMIT_NOFILE) soft N, hard unchanged      -> RLIMIT rc=R
 *   seccomp    no_new_privs + an allow-everything seccomp filter      -> SECCOMP rc=R
 *   exit       exit(0) at once (the destructor runs)
 *
 * Usage: break13_logflood PORT
 * stdout: READY port=P, EOF fd=N, RLIMIT rc=R, SECCOMP rc=R
 */
#define _GNU_SOURCE
#include "common.h"
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/resource.h>

static void command(char *line)
{
    if (!strncmp(line, "rlimit ", 7)) {
        struct rlimit r;
        getrlimit(RLIMIT_NOFILE, &r);
        r.rlim_cur = (rlim_t)parse_long(line + 7, "limit");
        printf("RLIMIT rc=%d\n", setrlimit(RLIMIT_NOFILE, &r));
    } else if (!strcmp(line, "seccomp")) {
        struct sock_filter allow[] = { BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW) };
        struct sock_fprog prog = { 1, allow };
        int rc = prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        if (rc == 0)
            rc = prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
        printf("SECCOMP rc=%d\n", rc);
    } else if (!strcmp(line, "exit")) {
        exit(0);
    }
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: break13_logflood PORT");
    int l = bind_host_on(AF_INET, "127.0.0.1", parse_port(argv[1]), 0, 0);
    if (listen(l, 512) < 0)
        die("listen:");
    printf("READY port=%d\n", local_port(l));
    static struct pollfd p[4096];
    int n = 2;
    p[0] = (struct pollfd){ .fd = 0, .events = POLLIN };
    p[1] = (struct pollfd){ .fd = l, .events = POLLIN };
    char in[256];
    size_t have = 0;
    while (!g_term) {
        if (poll(p, n, 1000) < 0) {
            if (errno == EINTR)
                continue;
            die("poll:");
        }
        if (p[0].revents) {
            ssize_t k = read(0, in + have, sizeof in - 1 - have);
            if (k <= 0)
                break;
            have += k;
            char *nl;
            while ((nl = memchr(in, '\n', have))) {
                *nl = 0;
                command(in);
                have -= nl + 1 - in;
                memmove(in, nl + 1, have);
            }
        }
        if (p[1].revents & POLLIN) {
            int c = accept(l, NULL, NULL);
            if (c >= 0 && n < 4096)
                p[n++] = (struct pollfd){ .fd = c, .events = POLLIN };
        }
        for (int i = 2; i < n; i++) {
            if (p[i].fd < 0 || !p[i].revents)
                continue;
            char b[256];
            ssize_t k = read(p[i].fd, b, sizeof b);
            if (k <= 0) {
                /* Forgotten: the number stays open, the socket in CLOSE_WAIT. */
                printf("EOF fd=%d\n", p[i].fd);
                p[i].fd = -1;
            }
        }
    }
    return 0;
}
