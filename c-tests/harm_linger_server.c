/*
 * harm_linger_server - a leaky server whose connections linger on close.
 *
 * Models: a server that sets SO_LINGER {1, 5} on every accepted connection,
 * reads the request once (with a half-closing client that read() also
 * consumes the FIN), queues a large answer the client is slow to read
 * (non-blocking writes until EAGAIN, at most 8 MiB) and forgets the fd.
 * A second thread appends a numbered record to a data file every 10 ms.
 * accept() at EMFILE: ACCEPT_ERR, then a 20 ms pause.  Every accept() and
 * close() is timed.  On the stdin command "close" it closes every connection
 * it still holds (timing each close), then reports.
 *
 * Usage: harm_linger_server DATAFILE PORT
 * stdout: READY port=P, ACCEPT fd=N us=U queued=B, ACCEPT_ERR errno=E us=U,
 *         CLOSE fd=N ret=R errno=E CLOSE_US=U, FILE_ERR errno=E,
 *         STATS accepted=A accept_max_us=U close_max_us=C records=R file_err=F
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>

static long long now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int data_fd = -1, stop_data;
static long records, file_err;

static void *data_thread(void *arg)
{
    (void)arg;
    while (!__atomic_load_n(&stop_data, __ATOMIC_ACQUIRE)) {
        char b[64];
        int n = snprintf(b, sizeof b, "record %06ld\n", records);
        if (write(data_fd, b, (size_t)n) != n) {
            printf("FILE_ERR errno=%d\n", errno);
            file_err++;
        } else {
            records++;
        }
        sleep_ms(10);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 3)
        die("usage: harm_linger_server DATAFILE PORT");
    data_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    if (data_fd < 0)
        die("open %s:", argv[1]);
    int lfd = listen_on(AF_INET, parse_port(argv[2]), 0, 0);
    set_nonblock(lfd);
    print_ready(lfd);
    pthread_t t;
    if (pthread_create(&t, NULL, data_thread, NULL) != 0)
        die("pthread_create");
    static char big[1 << 16];
    memset(big, 'x', sizeof big);
    int held[1024], nheld = 0;
    long long accept_max = 0, close_max = 0;
    long accepted = 0;
    struct linebuf lb = { .len = 0 };
    int closing = 0;
    while (!g_term && !closing) {
        struct pollfd p[2] = { { lfd, POLLIN, 0 }, { 0, POLLIN, 0 } };
        if (poll(p, 2, 100) <= 0)
            continue;
        if (p[1].revents) {
            char cmd[64];
            if (lb_fill(&lb, 0) < 0)
                break;
            while (lb_getline(&lb, cmd, sizeof cmd))
                if (!strcmp(cmd, "close"))
                    closing = 1;
        }
        if (!(p[0].revents & POLLIN))
            continue;
        long long t0 = now_us();
        int fd = accept(lfd, NULL, NULL);
        long long us = now_us() - t0;
        if (us > accept_max)
            accept_max = us;
        if (fd < 0) {
            if (errno != EAGAIN) {
                printf("ACCEPT_ERR errno=%d us=%lld\n", errno, us);
                sleep_ms(20);
            }
            continue;
        }
        accepted++;
        struct linger lg = { 1, 5 };
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        char req[256];
        struct pollfd q = { fd, POLLIN, 0 };
        if (poll(&q, 1, 1000) > 0 && read(fd, req, sizeof req) < 0)
            printf("READ_ERR fd=%d errno=%d\n", fd, errno);
        set_nonblock(fd);
        long queued = 0;
        while (queued < (8L << 20)) {
            ssize_t n = write(fd, big, sizeof big);
            if (n <= 0)
                break;
            queued += n;
        }
        printf("ACCEPT fd=%d us=%lld queued=%ld\n", fd, us, queued);
        if (nheld < 1024)
            held[nheld++] = fd;
    }
    for (int i = 0; i < nheld; i++) {
        long long t0 = now_us();
        int r = close(held[i]);
        int e = r < 0 ? errno : 0;
        long long us = now_us() - t0;
        if (us > close_max)
            close_max = us;
        printf("CLOSE fd=%d ret=%d errno=%d CLOSE_US=%lld\n", held[i], r, e, us);
    }
    __atomic_store_n(&stop_data, 1, __ATOMIC_RELEASE);
    pthread_join(t, NULL);
    printf("STATS accepted=%ld accept_max_us=%lld close_max_us=%lld records=%ld file_err=%ld\n", accepted,
           accept_max, close_max, records, file_err);
    return 0;
}
