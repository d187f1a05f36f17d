/*
 * rescue_tracer - holds another process under ptrace (PTRACE_SEIZE: it keeps
 * running), as a debugger or strace would, until its stdin closes.
 *
 * Models: a process that is already traced; `keepfix rescue` must leave it
 * alone and say who traces it.
 *
 * Usage: rescue_tracer PID
 * stdout: READY tracer=PID, DETACHED
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/ptrace.h>

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 2)
        die("usage: rescue_tracer PID");
    pid_t pid = (pid_t)parse_long(argv[1], "pid");
    if (ptrace(PTRACE_SEIZE, pid, NULL, NULL) != 0)
        die("PTRACE_SEIZE %d:", (int)pid);
    printf("READY tracer=%d\n", (int)getpid());
    char c;
    while (read(0, &c, 1) > 0)
        ;
    ptrace(PTRACE_DETACH, pid, NULL, NULL);
    printf("DETACHED\n");
    return 0;
}
