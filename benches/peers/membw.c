/* Memory-bandwidth probe for the single-stream decode bound (benches/peers/compare.sh).
 *
 * Streams a buffer far larger than the last-level cache with T OpenMP threads and prints JSON:
 *   read  GB/s: sum of all floats (what decode does to the weights: read once per token)
 *   copy  GB/s: memcpy of src to dst, bytes copied per second (traffic is 2x that, 3x with write-allocate)
 *   write GB/s: memset
 * Best of R repetitions. Build: cc -O3 -march=native -fopenmp membw.c -o membw
 * Usage: membw [MiB=1024] [reps=5]   (threads from OMP_NUM_THREADS)
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 1024;
    int reps = argc > 2 ? atoi(argv[2]) : 5;
    size_t bytes = mib << 20, n = bytes / sizeof(float);
    float *a = aligned_alloc(64, bytes), *b = aligned_alloc(64, bytes);
    if (!a || !b) { fprintf(stderr, "alloc failed\n"); return 1; }
    int T = omp_get_max_threads();
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) { a[i] = (float)(i & 1023) * 1e-3f; b[i] = 0.f; }

    double best_read = 0, best_copy = 0, best_write = 0, sink = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = now(), total = 0;
#pragma omp parallel reduction(+ : total)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            size_t lo = n / nt * t, hi = t == nt - 1 ? n : n / nt * (t + 1);
            float s[16] = {0};
            for (size_t i = lo; i + 16 <= hi; i += 16)
                for (int k = 0; k < 16; k++) s[k] += a[i + k];
            for (int k = 0; k < 16; k++) total += s[k];
        }
        double dt = now() - t0;
        sink += total;
        if (bytes / dt > best_read) best_read = bytes / dt;

        t0 = now();
#pragma omp parallel
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            size_t lo = bytes / nt * t, hi = t == nt - 1 ? bytes : bytes / nt * (t + 1);
            memcpy((char *)b + lo, (char *)a + lo, hi - lo);
        }
        dt = now() - t0;
        if (bytes / dt > best_copy) best_copy = bytes / dt;

        t0 = now();
#pragma omp parallel
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            size_t lo = bytes / nt * t, hi = t == nt - 1 ? bytes : bytes / nt * (t + 1);
            memset((char *)b + lo, r & 0xff, hi - lo);
        }
        dt = now() - t0;
        if (bytes / dt > best_write) best_write = bytes / dt;
    }
    printf("{\"threads\": %d, \"buffer_mib\": %zu, \"reps\": %d, \"read_gbs\": %.2f, \"copy_gbs\": %.2f, "
           "\"write_gbs\": %.2f, \"sink\": %.1f}\n",
           T, mib, reps, best_read / 1e9, best_copy / 1e9, best_write / 1e9, sink + b[n / 2] * 0);
    return 0;
}
