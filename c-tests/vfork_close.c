/*
 * vfork_close - a program that spawns helpers with vfork() and closes fds in the child.
 *
 * Models legacy spawners: vfork(), then in the child close() the listener and connections it
 * should not inherit, and execve(). The child shares the parent's memory but not its fd table:
 * what the child closes stays open in the parent.
 *
 *   vfork_close PORT
 * It listens, prints READY port=P, accepts one connection C (ACCEPT fd=N), then vforks a child
 * that closes C and the listener and execs /bin/true; the parent waits for it (CHILD status=S).
 * Then the parent turns keepalive off on C, as a legacy program might (SETSOCKOPT ret= errno=),
 * prints DONE and waits for the test (stdin EOF) holding C.
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/wait.h>

int main(int argc, char **argv)
{
    proto_init();
    int lfd = listen_on(AF_INET, argc > 1 ? parse_port(argv[1]) : 0, 0, 0);
    print_ready(lfd);
    int c = accept(lfd, NULL, NULL);
    if (c < 0)
        die("accept:");
    printf("ACCEPT fd=%d\n", c);
    pid_t pid = vfork();
    if (pid == 0) {
        close(c);
        close(lfd);
        execl("/bin/true", "true", (char *)NULL);
        _exit(127);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    printf("CHILD status=%d\n", WEXITSTATUS(st));
    int zero = 0;
    errno = 0;
    int r = setsockopt(c, SOL_SOCKET, SO_KEEPALIVE, &zero, sizeof zero);
    printf("SETSOCKOPT ret=%d errno=%d\n", r, errno);
    printf("DONE\n");
    wait_for_test();
    return 0;
}
