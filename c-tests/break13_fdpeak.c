/*
 * break13_fdpeak - a server whose fd use peaks and falls back: it opens many files, accepts a
 * connection on a high number, then closes the files. Against the honest figures of issue 13
 * (change 2): when keepfix cannot count fds (no /proc/self/fd), a `used_min=` or
 * keepfix_fds_used_min must still be a true lower bound of what is open now, not the peak.
 *
 * stdin commands (one per line):
 *   open N     open N more /dev/null files                 -> OPENED total=T
 *   accept     accept one connection (blocking), kept      -> ACCEPT fd=F
 *   closeall   close every file opened by `open`           -> CLOSED
 *   rlimit N   setrlimit(RLIMIT_NOFILE) soft N              -> RLIMIT rc=R
 *
 * Usage: break13_fdpeak PORT
 * stdout: READY port=P, then one line per command
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/resource.h>

int main(int argc, char **argv)
{
    proto_init();
    if (argc != 2)
        die("usage: break13_fdpeak PORT");
    int l = bind_host_on(AF_INET, "127.0.0.1", parse_port(argv[1]), 0, 0);
    if (listen(l, 16) < 0)
        die("listen:");
    printf("READY port=%d\n", local_port(l));
    static int files[65536];
    int nfiles = 0;
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!strncmp(line, "open ", 5)) {
            long n = parse_long(line + 5, "count");
            for (long i = 0; i < n && nfiles < 65536; i++) {
                int fd = open("/dev/null", O_RDONLY);
                if (fd < 0)
                    die("open:");
                files[nfiles++] = fd;
            }
            printf("OPENED total=%d\n", nfiles);
        } else if (!strcmp(line, "accept")) {
            int c = accept(l, NULL, NULL);
            if (c < 0)
                die("accept:");
            printf("ACCEPT fd=%d\n", c);
        } else if (!strcmp(line, "closeall")) {
            while (nfiles > 0)
                close(files[--nfiles]);
            printf("CLOSED\n");
        } else if (!strncmp(line, "rlimit ", 7)) {
            struct rlimit r;
            getrlimit(RLIMIT_NOFILE, &r);
            r.rlim_cur = (rlim_t)parse_long(line + 7, "limit");
            printf("RLIMIT rc=%d\n", setrlimit(RLIMIT_NOFILE, &r));
        }
    }
    return 0;
}
