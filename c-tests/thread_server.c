/*
 * thread_server - one detached thread per connection, which leaks at EOF.
 *
 * Models: the thread-per-connection server whose handler returns at EOF
 * without close() (unless --no-leak): the socket stays in CLOSE_WAIT and the
 * fd leaks, while other threads keep opening and closing fds - a preload
 * library must be thread-safe about fd reuse.  Blocking accept() loop in the
 * main thread; handler threads block SIGTERM/SIGINT so the signal interrupts
 * accept() in main.
 *
 * Usage: thread_server [--no-leak] PORT
 * stdout: READY port=P, ACCEPT fd=N, EOF fd=N, CLOSE fd=N (--no-leak),
 *         READ_ERR/WRITE_ERR fd=N errno=E, ACCEPT_ERR errno=E,
 *         STATS accepted=A served=S eof=E errors=R
 */
#define _GNU_SOURCE
#include "common.h"
#include <pthread.h>

static int no_leak;
static long served, eofs, errors; /* updated with __atomic builtins */

static void *handler(void *arg)
{
    int fd = (int)(long)arg;
    char buf[4096];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n > 0) {
            int k = answer_lines(fd, buf, n);
            if (k >= 0) {
                __atomic_add_fetch(&served, k, __ATOMIC_RELAXED);
                continue;
            }
            printf("WRITE_ERR fd=%d errno=%d\n", fd, errno);
            __atomic_add_fetch(&errors, 1, __ATOMIC_RELAXED);
        } else if (n == 0) {
            printf("EOF fd=%d\n", fd);
            __atomic_add_fetch(&eofs, 1, __ATOMIC_RELAXED);
        } else {
            printf("READ_ERR fd=%d errno=%d\n", fd, errno);
            __atomic_add_fetch(&errors, 1, __ATOMIC_RELAXED);
        }
        break;
    }
    if (no_leak) {
        close(fd);
        printf("CLOSE fd=%d\n", fd);
    }
    /* else THE BUG: return without close(fd). */
    return NULL;
}

int main(int argc, char **argv)
{
    proto_init();
    static const struct option opts[] = {
        { "no-leak", no_argument, NULL, 'n' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'n')
            no_leak = 1;
        else
            die("usage: thread_server [--no-leak] PORT");
    }
    if (optind != argc - 1)
        die("usage: thread_server [--no-leak] PORT");
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    print_ready(lfd);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigset_t term, old;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigaddset(&term, SIGINT);

    long accepted = 0;
    while (!g_term) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0) {
            if (errno != EINTR) {
                printf("ACCEPT_ERR errno=%d\n", errno);
                __atomic_add_fetch(&errors, 1, __ATOMIC_RELAXED);
                sleep_ms(10);
            }
            continue;
        }
        printf("ACCEPT fd=%d\n", cfd);
        accepted++;
        pthread_t tid;
        pthread_sigmask(SIG_BLOCK, &term, &old); /* the new thread inherits the mask */
        int err = pthread_create(&tid, &attr, handler, (void *)(long)cfd);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (err) {
            fprintf(stderr, "thread_server: pthread_create: %s\n", strerror(err));
            close(cfd);
            printf("CLOSE fd=%d\n", cfd);
        }
    }
    printf("STATS accepted=%ld served=%ld eof=%ld errors=%ld\n", accepted,
           __atomic_load_n(&served, __ATOMIC_RELAXED), __atomic_load_n(&eofs, __ATOMIC_RELAXED),
           __atomic_load_n(&errors, __ATOMIC_RELAXED));
    return 0;
}
