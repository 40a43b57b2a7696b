/*
 * memhold: a stateful test workload for stasis (built static, runs in a busybox image).
 *
 *   memhold MIB [COMPRESSIBLE_PERCENT]
 *   memhold lock PATH      hold a flock(2) and a POSIX (fcntl) write lock on PATH until killed
 *   memhold trylock PATH   print how another process finds PATH: flock=<busy|free> posix=<pid|free>
 *
 * Holds MIB MiB filled with a pattern derived from a nonce drawn at start (pseudo-random, except
 * COMPRESSIBLE_PERCENT of the pages, default 0, which hold low-entropy words that zstd compresses),
 * and a counter that only lives in memory. SIGUSR2 rewrites 5% of the pages with a new pattern
 * (what changes between two backups of a busy container). It creates /data/new/log in a new directory and keeps it open,
 * appending a line every tick, so a checkpoint must carry filesystem changes and an open file.
 * Every 100 ms it writes /tmp/status:
 *     nonce=<hex> counter=<n> mib=<m> verified=<ok|bad|never> verifications=<k>
 * On SIGUSR1 it re-checks every word of its memory against the pattern and reports the result in
 * the next status. A restored copy proves its memory is intact when the nonce is unchanged, the
 * counter went on from where it was, and a verification says ok.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t verify_requested, mutate_requested;

static void on_usr1(int sig) { (void)sig; verify_requested = 1; }
static void on_usr2(int sig) { (void)sig; mutate_requested = 1; }

static uint64_t mix(uint64_t x) { /* splitmix64 */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

#define PAGE_WORDS 512 /* 4 KiB pages */

static uint64_t nonce;
static size_t compressible_pages;
static uint8_t *generation; /* per page: how many times SIGUSR2 rewrote it */

static uint64_t expected(size_t i) {
    size_t page = i / PAGE_WORDS;
    uint64_t v = mix(nonce + i + ((uint64_t)generation[page] << 40));
    return page < compressible_pages ? (v & 0xff) : v;
}

/* The two kinds of lock CRIU must carry (--file-locks): BSD flock and POSIX record locks. */
static int locks(const char *mode, const char *path) {
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) { perror(path); return 1; }
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    if (strcmp(mode, "lock") == 0) {
        if (flock(fd, LOCK_EX) != 0 || fcntl(fd, F_SETLKW, &fl) != 0) { perror("lock"); return 1; }
        for (;;) pause();
    }
    int busy = flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    if (fcntl(fd, F_GETLK, &fl) != 0) { perror("F_GETLK"); return 1; }
    if (fl.l_type == F_UNLCK) printf("flock=%s posix=free\n", busy ? "busy" : "free");
    else printf("flock=%s posix=%d\n", busy ? "busy" : "free", (int)fl.l_pid);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && (strcmp(argv[1], "lock") == 0 || strcmp(argv[1], "trylock") == 0))
        return locks(argv[1], argv[2]);
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    size_t percent = argc > 2 ? strtoul(argv[2], NULL, 10) : 0;
    size_t words = mib * 1024 * 1024 / sizeof(uint64_t);
    size_t pages = words / PAGE_WORDS;
    compressible_pages = pages * (percent > 100 ? 100 : percent) / 100;
    if (getrandom(&nonce, sizeof nonce, 0) != sizeof nonce)
        nonce = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);

    uint64_t *mem = malloc(words * sizeof(uint64_t));
    generation = calloc(pages ? pages : 1, 1);
    if (!mem || !generation) { perror("malloc"); return 1; }
    for (size_t i = 0; i < words; i++) mem[i] = expected(i);
    uint64_t mutations = 0;

    mkdir("/data", 0755);
    mkdir("/data/new", 0755);
    FILE *log = fopen("/data/new/log", "a");
    if (!log) { perror("/data/new/log"); return 1; }
    setvbuf(log, NULL, _IOLBF, 0);

    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    uint64_t counter = 0, verifications = 0;
    const char *verified = "never";
    printf("memhold: %zu MiB, nonce %016llx\n", mib, (unsigned long long)nonce);
    fflush(stdout);
    for (;;) {
        if (mutate_requested) {
            mutate_requested = 0;
            mutations++;
            for (size_t k = 0; k < pages / 20; k++) {
                size_t page = mix(nonce ^ (mutations << 32) ^ k) % pages;
                generation[page]++;
                for (size_t i = page * PAGE_WORDS; i < (page + 1) * PAGE_WORDS; i++) mem[i] = expected(i);
            }
        }
        if (verify_requested) {
            verify_requested = 0;
            verified = "ok";
            for (size_t i = 0; i < words; i++)
                if (mem[i] != expected(i)) { verified = "bad"; break; }
            verifications++;
        }
        counter++;
        fprintf(log, "%llu\n", (unsigned long long)counter);
        FILE *st = fopen("/tmp/status.tmp", "w");
        if (st) {
            fprintf(st, "nonce=%016llx counter=%llu mib=%zu verified=%s verifications=%llu mutations=%llu\n",
                    (unsigned long long)nonce, (unsigned long long)counter, mib, verified,
                    (unsigned long long)verifications, (unsigned long long)mutations);
            fclose(st);
            rename("/tmp/status.tmp", "/tmp/status");
        }
        struct timespec ts = {0, 100 * 1000 * 1000};
        while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
    }
}
