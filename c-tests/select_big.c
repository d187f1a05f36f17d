/*
 * select_big - calls select() with nfds > FD_SETSIZE.
 *
 * Models: old code that computes select()'s nfds badly (FD_SETSIZE + 1 =
 * 1025).  To stay memory-safe the "fd_set" is really a zeroed 4096-byte
 * buffer (the kernel reads (nfds + 7) / 8 bytes of it) with only fd 0 set;
 * timeout 0.  Then one legitimate select(1, ...).  A preload library
 * interposing select() is expected to log an error for the first call; the
 * program just reports what it got.
 *
 * Usage: select_big
 * stdout: SELECT ret=R errno=E   (twice; errno set to 0 before each call)
 *         DONE
 */
#define _GNU_SOURCE
#include "common.h"
#include <sys/select.h>

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);

    fd_set *big = calloc(1, 4096); /* far more than 1025 bits */
    if (!big)
        die("out of memory");
    FD_SET(0, big);
    struct timeval tv = { 0, 0 };
    errno = 0;
    int r = select(FD_SETSIZE + 1, big, NULL, NULL, &tv);
    printf("SELECT ret=%d errno=%d\n", r, errno);
    free(big);

    fd_set set;
    FD_ZERO(&set);
    FD_SET(0, &set);
    tv = (struct timeval){ 0, 0 };
    errno = 0;
    r = select(1, &set, NULL, NULL, &tv);
    printf("SELECT ret=%d errno=%d\n", r, errno);
    printf("DONE\n");
    return 0;
}
