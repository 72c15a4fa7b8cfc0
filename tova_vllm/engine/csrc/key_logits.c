/* Last-query logits read in place from vLLM's CPU KV pages (see native.py).
 *
 * The torch path copies each row's K blocks into a buffer and multiplies the copy: three
 * passes over K.  This reads every K element once, where it lies, and keeps the product in
 * float32.  A K half page of one (block, kv head) is tiles of T tokens x P dims stored
 * [bs / T][D / P][T][P]: T = bs, P = 1 is the transposed layout of vLLM's vec ISAs, T = 1,
 * P = D is row order, T = 16, P = 2 is AMX's VNNI packing.
 *
 * Parallel with OpenMP: torch's wheel ships libgomp.so.1 and loads it first, so this
 * library binds to the same runtime and its warm thread pool (a second pool would spin
 * against torch's on the same cores).
 */
#include <stdint.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };

typedef struct {
    const char *const *pages; /* [layers]: each layer's pages */
    int dtype, rows;
    int64_t block_elems; /* elements per block: kv_heads * 2 * bs * D */
    int kv_heads, bs, D, T, P, group, per_row;
    const int32_t *table; /* [rows, per_row] */
    const float *q;       /* [layers, rows, kv_heads, group, D] */
    const int32_t *live;  /* [rows] or NULL: positions at or past live[row] get -inf */
    float scale;
    float *out;           /* [layers, rows, kv_heads, group, per_row * bs] */
    int64_t first, last;  /* (layer, row, kv head) items of this worker */
} job_t;

static inline float from_bf16(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Where (layer, row, kv head) work item ``item`` reads and writes: its K half page of
 * block table entry b is ``key_page(j, item, b)``, its queries ``j->q + item * G * D``,
 * its logits ``j->out + item * G * W`` (q and out are laid out item after item). */
static inline __attribute__((always_inline)) const char *key_page(const job_t *j,
                                                                 int64_t item, int b,
                                                                 int elem_bytes) {
    const int64_t row = item / j->kv_heads % j->rows;
    const char *pages = j->pages[item / j->kv_heads / j->rows];
    const int64_t block = j->table[row * j->per_row + b];
    return pages + (block * j->block_elems
                    + (item % j->kv_heads) * (int64_t)2 * j->bs * j->D) * elem_bytes;
}

#define KERNEL(NAME, ELEM, LOAD)                                                            \
    static void NAME(const job_t *j) {                                                      \
        const int64_t W = (int64_t)j->per_row * j->bs;                                      \
        const int T = j->T, P = j->P, D = j->D, G = j->group;                               \
        for (int64_t item = j->first; item < j->last; ++item) {                             \
            const float *q = j->q + item * G * D;                                           \
            float *out = j->out + item * G * W;                                             \
            memset(out, 0, sizeof(float) * G * W);                                          \
            for (int b = 0; b < j->per_row; ++b) {                                          \
                const ELEM *k = (const ELEM *)key_page(j, item, b, sizeof(ELEM));           \
                for (int tile = 0; tile < j->bs / T; ++tile) {                              \
                    for (int dg = 0; dg < D / P; ++dg) {                                    \
                        const ELEM *src = k + ((int64_t)tile * (D / P) + dg) * T * P;       \
                        for (int g = 0; g < G; ++g) {                                       \
                            const float *qd = q + g * D + dg * P;                           \
                            float *o = out + g * W + b * j->bs + tile * T;                  \
                            if (P == 1) {                                                   \
                                const float a = qd[0];                                      \
                                for (int t = 0; t < T; ++t) o[t] += a * LOAD(src[t]);       \
                            } else if (P == 2) {                                            \
                                const float a = qd[0], c = qd[1];                           \
                                for (int t = 0; t < T; ++t)                                 \
                                    o[t] += a * LOAD(src[2 * t]) + c * LOAD(src[2 * t + 1]);\
                            } else {                                                        \
                                for (int t = 0; t < T; ++t) {                               \
                                    float s = 0.f;                                          \
                                    for (int p = 0; p < P; ++p)                             \
                                        s += qd[p] * LOAD(src[t * P + p]);                  \
                                    o[t] += s;                                              \
                                }                                                           \
                            }                                                               \
                        }                                                                   \
                    }                                                                       \
                }                                                                           \
            }                                                                               \
            for (int64_t i = 0; i < G * W; ++i) out[i] *= j->scale;                         \
        }                                                                                   \
    }

/* The transposed layout (P = 1, T = bs) with bs a multiple of 16, the common case (vLLM's
 * vec and vec16 ISAs): 16 tokens' logits of N query heads stay in registers over all D
 * dims, so each K vector is loaded once and feeds N fused multiply-adds. */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef _Float16 v16e __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v16f load_f32(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline __attribute__((always_inline)) v16f load_bf16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline __attribute__((always_inline)) v16f load_f16(const _Float16 *p) {
    v16e h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, v16f);
}

#define TRANSPOSED(NAME, ELEM, LOADV)                                                       \
    /* Tokens c .. c + 16 * V of N heads; ``next`` is prefetched along (the next block's K \
     * at the same offsets: blocks are scattered, so the hardware cannot guess it). */     \
    static inline __attribute__((always_inline)) void NAME##_heads(                         \
        const ELEM *k, const ELEM *next, int bs, int D, const float *q, float *out,         \
        int64_t W, float scale, const int N, const int V) {                                 \
        for (int c = 0; c < bs; c += 16 * V) {                                              \
            v16f acc[2][8] = {{{0}}};                                                       \
            for (int d = 0; d < D; ++d) {                                                   \
                const ELEM *row = k + (int64_t)d * bs + c;                                  \
                __builtin_prefetch(next + (int64_t)d * bs + c);                             \
                for (int v = 0; v < V; ++v) {                                               \
                    const v16f kv = LOADV(row + 16 * v);                                    \
                    for (int n = 0; n < N; ++n) acc[v][n] += q[n * D + d] * kv;             \
                }                                                                           \
            }                                                                               \
            for (int v = 0; v < V; ++v)                                                     \
                for (int n = 0; n < N; ++n) {                                               \
                    const v16f r = acc[v][n] * scale;                                       \
                    memcpy(out + n * W + c + 16 * v, &r, sizeof r);                         \
                }                                                                           \
        }                                                                                   \
    }                                                                                       \
    static void NAME(const job_t *j) {                                                      \
        const int64_t W = (int64_t)j->per_row * j->bs;                                      \
        const int D = j->D, G = j->group, bs = j->bs;                                       \
        for (int64_t item = j->first; item < j->last; ++item) {                             \
            const float *q = j->q + item * G * D;                                           \
            float *out = j->out + item * G * W;                                             \
            for (int b = 0; b < j->per_row; ++b) {                                          \
                const ELEM *k = (const ELEM *)key_page(j, item, b, sizeof(ELEM));           \
                const ELEM *next = b + 1 < j->per_row                                       \
                    ? (const ELEM *)key_page(j, item, b + 1, sizeof(ELEM)) : k;             \
                float *o = out + b * bs;                                                    \
                int g = 0;                                                                  \
                if (bs % 32 == 0) {                                                         \
                    for (; g + 8 <= G; g += 8)                                              \
                        NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 8, 2); \
                    for (; g + 4 <= G; g += 4)                                              \
                        NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 4, 2); \
                    for (; g + 2 <= G; g += 2)                                              \
                        NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 2, 2); \
                    for (; g < G; ++g)                                                      \
                        NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 1, 2); \
                } else {                                                                    \
                    for (; g + 8 <= G; g += 8)                                              \
                        NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 8, 1); \
                    for (; g + 4 <= G; g += 4)                                              \
                        NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 4, 1); \
                    for (; g < G; ++g)                                                      \
                        NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 1, 1); \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }

TRANSPOSED(fast_f32, float, load_f32)
TRANSPOSED(fast_bf16, uint16_t, load_bf16)
TRANSPOSED(fast_f16, _Float16, load_f16)

#define AS_FLOAT(x) ((float)(x))
#define AS_BF16(x) from_bf16(x)
KERNEL(run_f32, float, AS_FLOAT)
KERNEL(run_bf16, uint16_t, AS_BF16)
KERNEL(run_f16, _Float16, AS_FLOAT)

static void run_kernel(const job_t *j) {
    if (j->P == 1 && j->T == j->bs && j->bs % 16 == 0) {
        if (j->dtype == F32) fast_f32(j);
        else if (j->dtype == BF16) fast_bf16(j);
        else fast_f16(j);
    } else if (j->dtype == F32) run_f32(j);
    else if (j->dtype == BF16) run_bf16(j);
    else run_f16(j);
    if (j->live) {
        const int64_t W = (int64_t)j->per_row * j->bs;
        for (int64_t item = j->first; item < j->last; ++item) {
            const int64_t live = j->live[item / j->kv_heads % j->rows];
            float *out = j->out + item * j->group * W;
            for (int g = 0; g < j->group; ++g)
                for (int64_t i = live < 0 ? 0 : live; i < W; ++i)
                    out[g * W + i] = -__builtin_inff();
        }
    }
}

/* Logits of ``layers`` layers at once (same block table and live lengths, each its own
 * pages and queries).  Returns 0, or -1 for an unknown dtype or a bad tiling. */
int tova_key_logits(const void *const *pages, int layers, int dtype, int64_t block_elems,
                    int kv_heads, int bs, int D, int T, int P, const int32_t *table, int rows,
                    int per_row, const float *q, int group, float scale, const int32_t *live,
                    float *out, int threads, int num_blocks) {
    if (dtype < F32 || dtype > F16 || T <= 0 || P <= 0 || bs % T || D % P) return -1;
    for (int64_t i = 0; i < (int64_t)rows * per_row; ++i)
        if (table[i] < 0 || table[i] >= num_blocks) return -2;
    const job_t base = {(const char *const *)pages, dtype, rows, block_elems, kv_heads, bs,
                        D, T, P, group, per_row, table, q, live, scale, out, 0, 0};
    const int64_t items = (int64_t)layers * rows * kv_heads;
    /* Waking the pool costs a few microseconds: small calls (a tiny model's) run here. */
    const int64_t work = items * group * per_row * bs * D;
    if (threads < 1 || work < (1 << 20)) threads = 1;
    if (threads > items) threads = (int)items;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int i = 0; i < threads; ++i) {
        job_t job = base;
        job.first = items * i / threads;
        job.last = items * (i + 1) / threads;
        run_kernel(&job);
    }
    return 0;
}

/* Copy K and V, every head, of slot src[l * src_stride + i] onto slot dst[l * dst_stride
 * + i] of each layer l's pages (slot = block * bs + offset).  ``elements[o * M + m]``:
 * flat offset inside a block of element m of in-block offset o (M = 2 * kv_heads * D
 * elements per slot, in any layout).  Within a layer sources and destinations are
 * disjoint sets or equal pairs, so copying pair after pair is the same as reading all
 * first. */
int tova_copy_slots(void *const *pages, int layers, int elem_bytes, int64_t block_elems,
                    int bs, const int64_t *elements, int64_t M, const int64_t *src,
                    int64_t src_stride, const int64_t *dst, int64_t dst_stride, int64_t n,
                    int64_t num_slots) {
    if (elem_bytes != 4 && elem_bytes != 2 && elem_bytes != 1) return -1;
    /* Every slot is checked before anything is written: a bad one changes nothing. */
    for (int l = 0; l < layers; ++l)
        for (int64_t i = 0; i < n; ++i) {
            const int64_t s = src[l * src_stride + i], d = dst[l * dst_stride + i];
            if (s < 0 || s >= num_slots || d < 0 || d >= num_slots) return -2;
        }
    for (int l = 0; l < layers; ++l) {
        for (int64_t i = 0; i < n; ++i) {
            const int64_t s = src[l * src_stride + i], d = dst[l * dst_stride + i];
            if (s == d) continue;
            const int64_t *from = elements + (s % bs) * M;
            const int64_t *to = elements + (d % bs) * M;
            const int64_t a = s / bs * block_elems, b = d / bs * block_elems;
            if (elem_bytes == 4) {
                uint32_t *p = (uint32_t *)pages[l];
                for (int64_t m = 0; m < M; ++m) p[b + to[m]] = p[a + from[m]];
            } else if (elem_bytes == 2) {
                uint16_t *p = (uint16_t *)pages[l];
                for (int64_t m = 0; m < M; ++m) p[b + to[m]] = p[a + from[m]];
            } else {
                uint8_t *p = (uint8_t *)pages[l];
                for (int64_t m = 0; m < M; ++m) p[b + to[m]] = p[a + from[m]];
            }
        }
    }
    return 0;
}

/* The decode rule's choice for L layers x E rows at once, exactly as
 * policies.selection.position_to_drop makes it (no arithmetic, so the same answer): row e
 * of layer l drops its lowest-scoring live cache position (ties: the highest; a NaN ranks
 * lowest, as torch.argmin has it), and its last live position moves into the dropped one.
 * scores [L][E][width] (float32, or float64 when f64), live [E] (>= 1), slots [E][width]:
 * the slot of each cache position.  Writes src[e] = slot of row e's last live position and
 * dst[l * E + e] = slot of the dropped one (== src when the last one is dropped). */
int tova_decode_drop(const void *scores, int f64, int layers, int64_t rows, int64_t width,
                     const int32_t *live, const int64_t *slots, int64_t *src, int64_t *dst) {
    for (int64_t e = 0; e < rows; ++e)
        if (live[e] < 1 || live[e] > width) return -2;
    for (int64_t e = 0; e < rows; ++e) src[e] = slots[e * width + live[e] - 1];
    for (int l = 0; l < layers; ++l) {
        for (int64_t e = 0; e < rows; ++e) {
            const int64_t base = ((int64_t)l * rows + e) * width;
            int64_t lowest = -1, last_nan = -1;
            double best = 0.0;
            for (int64_t s = 0; s < live[e]; ++s) {
                const double v = f64 ? ((const double *)scores)[base + s]
                                     : (double)((const float *)scores)[base + s];
                if (v != v) last_nan = s;
                else if (lowest < 0 || v <= best) { best = v; lowest = s; }
            }
            const int64_t drop = last_nan >= 0 ? last_nan : lowest;
            dst[(int64_t)l * rows + e] = slots[e * width + drop];
        }
    }
    return 0;
}

/* values[i] (int64, stored as int32) into arrays[a][index[i]] for every array a: the new
 * slots' logical positions in every layer's side state at once.  Indices are checked
 * below size before anything is written. */
int tova_scatter_i32(int32_t *const *arrays, int n_arrays, const int64_t *index,
                     const int64_t *values, int64_t n, int64_t size) {
    for (int64_t i = 0; i < n; ++i)
        if (index[i] < 0 || index[i] >= size) return -2;
    for (int a = 0; a < n_arrays; ++a)
        for (int64_t i = 0; i < n; ++i) arrays[a][index[i]] = (int32_t)values[i];
    return 0;
}
