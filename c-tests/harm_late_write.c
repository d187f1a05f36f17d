/*
 * harm_late_write - answers that come late, or from another process.
 *
 *   --mode late  (default): for each connection, read() the request to EOF
 *                (a 0-byte read), "work" WORK ms, then write the answer
 *                "answer-for-ID\n" (ID from the request "req-ID\n") and close.
 *   --mode fork: fork a child per connection and forget the parent's copy of
 *                the fd (never closed: the parent's leak).  The child reads the
 *                request (one read()), then streams 4000 bytes as 40 writes of
 *                100 bytes, 100 ms apart, and closes.
 *
 * Usage: harm_late_write [--mode late|fork] [--work-ms MS] PORT
 * stdout: READY port=P, ACCEPT fd=N, EOF fd=N,
 *         WRITE fd=N id=ID ret=R errno=E            (late)
 *         CHILD pid=P fd=N sent=B err=E             (fork, from the child)
 *         STATS accepted=A
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/wait.h>

static void child_stream(int fd)
{
    char b[256];
    struct pollfd p = { fd, POLLIN, 0 };
    if (poll(&p, 1, 2000) > 0 && read(fd, b, sizeof b) < 0)
        printf("READ_ERR fd=%d errno=%d\n", fd, errno);
    char chunk[100];
    memset(chunk, 'z', sizeof chunk);
    long sent = 0;
    int err = 0;
    for (int i = 0; i < 40 && !err; i++) {
        ssize_t n = write(fd, chunk, sizeof chunk);
        if (n != (ssize_t)sizeof chunk)
            err = n < 0 ? errno : -1;
        else
            sent += n;
        sleep_ms(100);
    }
    printf("CHILD pid=%d fd=%d sent=%ld err=%d\n", getpid(), fd, sent, err);
    close(fd);
    _exit(0);
}

int main(int argc, char **argv)
{
    proto_init();
    const char *mode = "late";
    int work = 2000;
    static const struct option opts[] = { { "mode", 1, 0, 'm' }, { "work-ms", 1, 0, 'w' }, { 0, 0, 0, 0 } };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'm')
            mode = optarg;
        else if (c == 'w')
            work = (int)parse_long(optarg, "work-ms");
        else
            die("usage: harm_late_write [--mode late|fork] [--work-ms MS] PORT");
    }
    if (optind >= argc)
        die("missing PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    print_ready(lfd);
    long accepted = 0;
    while (!g_term) {
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        struct pollfd p = { lfd, POLLIN, 0 };
        if (poll(&p, 1, 100) <= 0)
            continue;
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            continue;
        accepted++;
        printf("ACCEPT fd=%d\n", fd);
        if (!strcmp(mode, "fork")) {
            fflush(stdout);
            pid_t pid = fork();
            if (pid == 0)
                child_stream(fd);
            continue; /* the parent forgets fd */
        }
        char req[256], all[256];
        size_t len = 0;
        ssize_t n;
        while ((n = read(fd, req, sizeof req)) > 0)
            if (len + (size_t)n < sizeof all) {
                memcpy(all + len, req, (size_t)n);
                len += (size_t)n;
            }
        all[len] = 0;
        printf("EOF fd=%d\n", fd);
        int id = -1;
        sscanf(all, "req-%d", &id);
        sleep_ms(work);
        char b[64];
        int k = snprintf(b, sizeof b, "answer-for-%d\n", id);
        ssize_t r = write(fd, b, (size_t)k);
        printf("WRITE fd=%d id=%d ret=%zd errno=%d\n", fd, id, r, r < 0 ? errno : 0);
        close(fd);
    }
    printf("STATS accepted=%ld\n", accepted);
    return 0;
}
