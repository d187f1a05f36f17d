/*
 * guest_daemon - a daemon that detaches from its terminal and opens its database.
 *
 * Models: a classic daemon start-up.  It listens on 127.0.0.1 (so keepfix's
 * thread starts and logs `start`), prints READY, closes 0, 1 and 2, and opens
 * its three database files, which take those numbers: DIR/data (fd 0),
 * DIR/index (fd 1) and DIR/wal (fd 2).  Then it turns SO_KEEPALIVE off on its
 * listener (keepfix logs an `app_override` line on its next tick, whatever
 * happened to `start`), writes RECORDS records to each file over about a
 * second, and exits 0.  Every line in the files is `record FILE N`: anything
 * else was written by someone else.
 *
 * Usage: guest_daemon [--records N] PORT DIR
 * stdout: READY port=P (before stdout is closed)
 */
#define _GNU_SOURCE
#include "common.h"

int main(int argc, char **argv)
{
    proto_init();
    long records = 10;
    static const struct option opts[] = { { "records", required_argument, 0, 'r' }, { 0, 0, 0, 0 } };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (c == 'r')
            records = parse_long(optarg, "records");
        else
            die("usage: guest_daemon [--records N] PORT DIR");
    }
    if (argc - optind != 2)
        die("usage: guest_daemon [--records N] PORT DIR");
    int lfd = listen_on(AF_INET, parse_port(argv[optind]), 0, 0);
    print_ready(lfd);
    fflush(stdout);

    close(0);
    close(1);
    close(2);
    static const char *names[3] = { "data", "index", "wal" };
    for (int i = 0; i < 3; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", argv[optind + 1], names[i]);
        int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd != i)
            _exit(10 + i);
    }
    int zero = 0;
    setsockopt(lfd, SOL_SOCKET, SO_KEEPALIVE, &zero, sizeof zero);
    for (long n = 0; n < records; n++) {
        for (int i = 0; i < 3; i++) {
            char rec[128];
            int len = snprintf(rec, sizeof rec, "record %s %ld\n", names[i], n);
            if (write(i, rec, len) != len)
                _exit(20 + i);
        }
        sleep_ms(1000 / (records > 0 ? records : 1));
    }
    return 0;
}
