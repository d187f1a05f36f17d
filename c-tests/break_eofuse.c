/*
 * break_eofuse - a program that keeps using numbers of half-closed connections, near its fd limit.
 *
 * Fills its table with /dev/null up to fd FILL-1, then accepts CONNS connections (each client
 * sends "id-N\n" and half-closes) plus one "sacrificial" connection read to EOF and leaked (the
 * proof that keepfix vacated something). Then, per --mode:
 *   zeroread  each connection: one read() of the request, then read(fd, buf, 0), readv() with two
 *             zero-length iovecs, recvmsg() with no iovec, recv(fd, NULL, 0, 0), each returning
 *             0; SIGPIPE at its default; 1.5 s later it writes "reply-id-N\n" and closes.
 *   sysdup3   connection 0 read to EOF, then syscall(SYS_dup3, log1, fd, 0) puts a log file on its
 *             number; connection 1 read to EOF, then syscall(SYS_close_range, fd, fd, 0) and
 *             open(log2) takes that number; both get "logK I\n" lines every 10 ms for 1.5 s.
 *   sigflip   SIGPIPE ignored; each connection read to EOF; 1.3 s later SIGPIPE back to default;
 *             at 2 s "reply-id-N\n" is written and the connection closed.
 * stdout: READY port=P, FILLED fd=N, ACCEPT fd=N, WROTE fd=N r=R errno=E, LOGERR file=K errno=E,
 *         PROOF fd=N open=0|1 (the sacrificial number still open), STATS ...
 * usage: break_eofuse --mode M [--fill N] [--conns K] DIR
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/syscall.h>
#include <sys/uio.h>

int main(int argc, char **argv)
{
    int fill = 100, conns = 4;
    const char *mode = "zeroread";
    static const struct option opts[] = { { "fill", required_argument, 0, 'f' },
                                          { "conns", required_argument, 0, 'c' },
                                          { "mode", required_argument, 0, 'm' },
                                          { 0, 0, 0, 0 } };
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 'f')
            fill = (int)parse_long(optarg, "fill");
        else if (o == 'c')
            conns = (int)parse_long(optarg, "conns");
        else if (o == 'm')
            mode = optarg;
        else
            die("usage: break_eofuse --mode M [--fill N] [--conns K] DIR");
    }
    if (optind + 1 != argc || conns > 16)
        die("usage: break_eofuse --mode M [--fill N] [--conns K] DIR");
    const char *dir = argv[optind];
    proto_init();
    int sigflip = strcmp(mode, "sigflip") == 0;
    if (!sigflip)
        signal(SIGPIPE, SIG_DFL);
    int lfd = listen_on(AF_INET, 0, 0, 0);
    print_ready(lfd);
    int last = fill_fds_to(fill - 1);
    printf("FILLED fd=%d\n", last);
    int fd[16];
    char id[16][64];
    for (int i = 0; i < conns; i++) {
        fd[i] = accept(lfd, NULL, NULL);
        if (fd[i] < 0)
            die("accept:");
        ssize_t n = read_line(fd[i], id[i], sizeof id[i], 3000);
        if (n <= 0)
            die("read request:");
        printf("ACCEPT fd=%d id=%s\n", fd[i], id[i]);
    }
    /* The sacrificial leak: read to EOF, kept. */
    int sac = accept(lfd, NULL, NULL);
    if (sac < 0)
        die("accept:");
    char buf[512];
    while (read(sac, buf, sizeof buf) > 0)
        ;
    long long t0 = now_ms();
    int bad = 0;
    if (strcmp(mode, "zeroread") == 0) {
        for (int i = 0; i < conns; i++) {
            struct pollfd p = { fd[i], POLLRDHUP, 0 };
            poll(&p, 1, 2000); /* the FIN is there, unread */
            struct iovec iov[2] = { { buf, 0 }, { buf, 0 } };
            struct msghdr mh;
            memset(&mh, 0, sizeof mh);
            ssize_t a = read(fd[i], buf, 0), b = readv(fd[i], iov, 2), c = recvmsg(fd[i], &mh, 0),
                    d = recv(fd[i], NULL, 0, 0);
            printf("ZERO fd=%d read=%zd readv=%zd recvmsg=%zd recv=%zd\n", fd[i], a, b, c, d);
        }
        sleep_ms(1500);
    } else if (sigflip) {
        for (int i = 0; i < conns; i++)
            while (read(fd[i], buf, sizeof buf) > 0)
                ;
        sleep_ms(1300);
        signal(SIGPIPE, SIG_DFL);
        printf("SIGPIPE default\n");
        sleep_ms(700);
    } else if (strcmp(mode, "sysdup3") == 0) {
        if (conns < 2)
            die("sysdup3 needs 2 connections");
        for (int i = 0; i < 2; i++)
            while (read(fd[i], buf, sizeof buf) > 0)
                ;
        char path[4096];
        snprintf(path, sizeof path, "%s/log1", dir);
        int l1 = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (l1 < 0 || syscall(SYS_dup3, l1, fd[0], 0) != fd[0])
            die("dup3:");
        close(l1);
        if (syscall(SYS_close_range, fd[1], fd[1], 0) != 0)
            die("close_range:");
        snprintf(path, sizeof path, "%s/log2", dir);
        int l2 = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (l2 < 0)
            die("open log2:");
        printf("LOGS log1=%d log2=%d\n", fd[0], l2);
        int lf[2] = { fd[0], l2 };
        for (int k = 0; now_ms() - t0 < 1500; k++) {
            for (int j = 0; j < 2; j++) {
                char line[64];
                int len = snprintf(line, sizeof line, "log%d %d\n", j + 1, k);
                if (write(lf[j], line, (size_t)len) != len) {
                    printf("LOGERR file=%d errno=%d\n", j + 1, errno);
                    bad++;
                }
            }
            sleep_ms(10);
        }
        if (close(lf[0]) != 0 || close(lf[1]) != 0) {
            printf("LOGERR close errno=%d\n", errno);
            bad++;
        }
        conns = 0;
    }
    for (int i = 0; i < conns; i++) {
        char reply[128];
        int len = snprintf(reply, sizeof reply, "reply-%s\n", id[i]);
        ssize_t r = write(fd[i], reply, (size_t)len);
        printf("WROTE fd=%d r=%zd errno=%d\n", fd[i], r, r < 0 ? errno : 0);
        if (r != len)
            bad++;
        close(fd[i]);
    }
    printf("PROOF fd=%d open=%d\n", sac, fcntl(sac, F_GETFD) >= 0);
    printf("STATS bad=%d\n", bad);
    return 0;
}
