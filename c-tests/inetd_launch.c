/*
 * inetd_launch - a minimal inetd: accept one connection, exec a service on it.
 *
 * Models: inetd / xinetd / tcpserver in "nowait" mode.  Listens on
 * 127.0.0.1:PORT, prints READY on its own stdout BEFORE redirecting anything,
 * accepts ONE connection, dup2s it onto fd 0 and fd 1 (and fd 2 with
 * --stderr-socket), closes the listener and the original connection fd,
 * applies each -e NAME=VALUE with setenv (this is how tests give LD_PRELOAD
 * and KEEPFIX_* to the service only, not to the launcher) and execvp()s PROG.
 * On exec failure it reports on stderr and _exit(127)s.
 *
 * Usage: inetd_launch [-e NAME=VALUE]... [--stderr-socket] PORT -- PROG [ARGS...]
 * stdout: READY port=P    (then stdout belongs to the connection)
 */
#define _GNU_SOURCE
#include "common.h"

#define USAGE "usage: inetd_launch [-e NAME=VALUE]... [--stderr-socket] PORT -- PROG [ARGS...]"

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    char *envs[64];
    int nenv = 0, stderr_socket = 0;
    static const struct option opts[] = {
        { "stderr-socket", no_argument, NULL, 's' },
        { "env", required_argument, NULL, 'e' },
        { 0, 0, 0, 0 },
    };
    int c;
    /* '+': stop at the first positional (PORT) so PROG's options are left alone */
    while ((c = getopt_long(argc, argv, "+e:", opts, NULL)) != -1) {
        if (c == 'e' && nenv < 64 && strchr(optarg, '='))
            envs[nenv++] = optarg;
        else if (c == 's')
            stderr_socket = 1;
        else
            die(USAGE);
    }
    if (optind < argc && strcmp(argv[optind], "--") == 0)
        optind++;
    if (optind >= argc)
        die(USAGE);
    int port = parse_port(argv[optind++]);
    if (optind < argc && strcmp(argv[optind], "--") == 0)
        optind++;
    if (optind >= argc)
        die(USAGE);
    char **prog = &argv[optind];

    int lfd = listen_on(AF_INET, port, 0, 0);
    print_ready(lfd);
    fflush(stdout);

    int cfd;
    do
        cfd = accept(lfd, NULL, NULL);
    while (cfd < 0 && errno == EINTR);
    if (cfd < 0)
        die("accept:");
    close(lfd);

    if (dup2(cfd, 0) < 0 || dup2(cfd, 1) < 0 || (stderr_socket && dup2(cfd, 2) < 0))
        die("dup2:");
    if (cfd > 2)
        close(cfd);

    for (int i = 0; i < nenv; i++) {
        char *eq = strchr(envs[i], '=');
        *eq = '\0';
        setenv(envs[i], eq + 1, 1);
        *eq = '=';
    }
    execvp(prog[0], prog);
    fprintf(stderr, "inetd_launch: exec %s: %s\n", prog[0], strerror(errno));
    _exit(127);
}
