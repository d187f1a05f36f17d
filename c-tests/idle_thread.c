/*
 * idle_thread - a preload library (not a program) that starts one thread, which does nothing.
 *
 * The benchmark's control for keepfix's watchdog thread: `LD_PRELOAD=idle_thread.so PROGRAM`
 * is PROGRAM made multi-threaded and nothing else. glibc then takes the slower path of its
 * multi-threaded process in fork() (it locks and unlocks malloc's arenas and the stdio list
 * around it, and the child resets them) and in its cancellable calls, and the kernel makes a
 * fork of a process that runs threads. The thread blocks in pause() for ever; it is not
 * inherited by forked children.
 *
 * Build: gcc -O2 -shared -fPIC -pthread -o idle_thread.so idle_thread.c
 */
#include <pthread.h>
#include <unistd.h>

static void *idle(void *arg)
{
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

__attribute__((constructor)) static void start_idle_thread(void)
{
    pthread_t t;
    if (pthread_create(&t, NULL, idle, NULL) == 0)
        pthread_detach(t);
}
