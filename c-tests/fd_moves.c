/*
 * fd_moves - a program that moves its sockets between fd numbers and then closes everything.
 *
 * Models legacy code that shuffles descriptors: dup2() a connection to a fixed number, dup3()
 * it on with O_CLOEXEC, F_DUPFD it higher, closing each old number; and a daemon-style
 * close_range(3, ~0U) / closefrom(3) that closes every fd it has, before starting over.
 *
 *   fd_moves PORT
 * stdin commands, one per line:
 *   move      accept one connection, then dup2(c,100) close(c) dup3(100,101,O_CLOEXEC) close(100)
 *             fcntl(101,F_DUPFD,200) close(101); prints MOVED fd=200 cloexec=C
 *   disable   setsockopt(200, SO_KEEPALIVE, 0); prints SETSOCKOPT ret=R errno=E
 *   closeall  close_range(3, ~0U, 0) (closefrom(3) with "closefrom"), then listens again:
 *             prints CLOSED ret=R errno=E, then READY port=P
 *   closefrom the same with closefrom(3)
 *   closeloop the same with the daemon idiom: close(fd) for every fd from 3 to 1023
 *   hold      accept one connection and keep it (never closes, never reads): ACCEPT fd=N
 * stdout: READY port=P, then one line per command.
 */
#define _GNU_SOURCE
#include "common.h"
#include <linux/close_range.h>

int main(int argc, char **argv)
{
    proto_init();
    int port = argc > 1 ? parse_port(argv[1]) : 0;
    int lfd = listen_on(AF_INET, port, 0, 0);
    print_ready(lfd);
    char cmd[64];
    while (fgets(cmd, sizeof cmd, stdin)) {
        if (!strncmp(cmd, "move", 4)) {
            int c = accept(lfd, NULL, NULL);
            if (c < 0)
                die("accept:");
            dup2(c, 100);
            close(c);
            dup3(100, 101, O_CLOEXEC);
            close(100);
            int m = fcntl(101, F_DUPFD, 200);
            close(101);
            printf("MOVED fd=%d cloexec=%d\n", m, (fcntl(m, F_GETFD) & FD_CLOEXEC) ? 1 : 0);
        } else if (!strncmp(cmd, "disable", 7)) {
            int zero = 0;
            errno = 0;
            int r = setsockopt(200, SOL_SOCKET, SO_KEEPALIVE, &zero, sizeof zero);
            printf("SETSOCKOPT ret=%d errno=%d\n", r, errno);
        } else if (!strncmp(cmd, "closeall", 8) || !strncmp(cmd, "closefrom", 9) || !strncmp(cmd, "closeloop", 9)) {
            errno = 0;
            int r = 0;
            if (!strncmp(cmd, "closeall", 8))
                r = close_range(3, ~0U, 0);
            else if (!strncmp(cmd, "closefrom", 9))
                closefrom(3);
            else
                for (int fd = 3; fd < 1024; fd++)
                    close(fd);
            if (!strncmp(cmd, "closeloop", 9))
                errno = 0; /* the loop's EBADFs on numbers never opened are expected */
            printf("CLOSED ret=%d errno=%d\n", r, errno);
            lfd = listen_on(AF_INET, 0, 0, 0);
            print_ready(lfd);
        } else if (!strncmp(cmd, "hold", 4)) {
            int c = accept(lfd, NULL, NULL);
            if (c < 0)
                die("accept:");
            printf("ACCEPT fd=%d\n", c);
        }
    }
    return 0;
}
