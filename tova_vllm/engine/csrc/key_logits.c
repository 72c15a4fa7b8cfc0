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

/* Calls with less work (multiply-adds) than this run on the calling thread.  Waking
 * torch's warm pool costs a few microseconds: two threads measured faster than one from
 * 1 row x 3 kv heads x 64 positions x 64 dims (36K) up (2 cores, Zen 3). */
#define MIN_PARALLEL_WORK (1 << 15)

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
 * vec and vec16 ISAs): VL tokens' logits of N query heads stay in registers over all D
 * dims, so each K vector is loaded once and feeds N fused multiply-adds. */
/* One vector of VL floats: the machine's register width.  ACCUMULATORS is how many of
 * them a kernel keeps summing side by side: half the register file (AVX-512: 32 registers
 * of 16 floats; AVX2 and others: 16 of 8), the rest holding loads and broadcasts.  Generic
 * vectors wider than the hardware's, or more accumulators than registers, spill to the
 * stack on every step (AVX-512 blocking on a Zen 3 ran 4x slower than torch).  Neither
 * changes the order of a logit's or an output's sum. */
#if defined(__AVX512F__)
#define VL 16
#define ACCUMULATORS 16
#else
#define VL 8
#define ACCUMULATORS 8
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef _Float16 ve __attribute__((vector_size(VL * 2)));

static inline __attribute__((always_inline)) vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline __attribute__((always_inline)) vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline __attribute__((always_inline)) vf load_f16(const _Float16 *p) {
    ve h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, vf);
}

#define TRANSPOSED(NAME, ELEM, LOADV)                                                       \
    /* Tokens c .. c + VL * V of N heads; ``next`` is prefetched along (the next block's K  \
     * at the same offsets: blocks are scattered, so the hardware cannot guess it). */      \
    static inline __attribute__((always_inline)) void NAME##_heads(                         \
        const ELEM *k, const ELEM *next, int bs, int D, const float *q, float *out,         \
        int64_t W, float scale, const int N, const int V) {                                 \
        for (int c = 0; c < bs; c += VL * V) {                                              \
            vf acc[2][8] = {{{0}}};                                                         \
            for (int d = 0; d < D; ++d) {                                                   \
                const ELEM *row = k + (int64_t)d * bs + c;                                  \
                __builtin_prefetch(next + (int64_t)d * bs + c);                             \
                for (int v = 0; v < V; ++v) {                                               \
                    const vf kv = LOADV(row + VL * v);                                      \
                    for (int n = 0; n < N; ++n) acc[v][n] += q[n * D + d] * kv;             \
                }                                                                           \
            }                                                                               \
            for (int v = 0; v < V; ++v)                                                     \
                for (int n = 0; n < N; ++n) {                                               \
                    const vf r = acc[v][n] * scale;                                         \
                    memcpy(out + n * W + c + VL * v, &r, sizeof r);                         \
                }                                                                           \
        }                                                                                   \
    }                                                                                       \
    /* Logits of block table entry b of work item ``item`` into ``out`` + b * bs. */        \
    static inline void NAME##_block(const job_t *j, int64_t item, int b, const float *q,    \
                                    float *out, int64_t W) {                                \
        const int D = j->D, G = j->group, bs = j->bs;                                       \
        const ELEM *k = (const ELEM *)key_page(j, item, b, sizeof(ELEM));                   \
        const ELEM *next = b + 1 < j->per_row                                               \
            ? (const ELEM *)key_page(j, item, b + 1, sizeof(ELEM)) : k;                     \
        float *o = out + b * bs;                                                            \
        int g = 0;                                                                          \
        if (bs % (2 * VL) == 0) {                                                           \
            for (; ACCUMULATORS >= 16 && g + 8 <= G; g += 8)                                \
                NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 8, 2);      \
            for (; g + 4 <= G; g += 4)                                                      \
                NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 4, 2);      \
            for (; g + 2 <= G; g += 2)                                                      \
                NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 2, 2);      \
            for (; g < G; ++g)                                                              \
                NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 1, 2);      \
        } else {                                                                            \
            for (; g + 8 <= G; g += 8)                                                      \
                NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 8, 1);      \
            for (; g + 4 <= G; g += 4)                                                      \
                NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 4, 1);      \
            for (; g + 2 <= G; g += 2)                                                      \
                NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 2, 1);      \
            for (; g < G; ++g)                                                              \
                NAME##_heads(k, next, bs, D, q + g * D, o + g * W, W, j->scale, 1, 1);      \
        }                                                                                   \
    }                                                                                       \
    static void NAME(const job_t *j) {                                                      \
        const int64_t W = (int64_t)j->per_row * j->bs;                                      \
        for (int64_t item = j->first; item < j->last; ++item)                               \
            for (int b = 0; b < j->per_row; ++b)                                            \
                NAME##_block(j, item, b, j->q + item * j->group * j->D,                     \
                             j->out + item * j->group * W, W);                              \
    }

TRANSPOSED(fast_f32, float, load_f32)
TRANSPOSED(fast_bf16, uint16_t, load_bf16)
TRANSPOSED(fast_f16, _Float16, load_f16)

/* The vector width this build chose (floats): the start-up line names it. */
int tova_vector_floats(void) { return VL; }

/* ---- Decode attention that also gives TOVA's scores (one pass over K and V) ----
 *
 * For a decode step whose every query is the last one of an evicting row, the softmax
 * weights that attention computes are the scores eviction needs; computing them again
 * would read K a second time.  So such a step's attention is done here: logits (the
 * kernel above), softmax, the weighted sum of V, and each kv head's sum of its query
 * heads' weights, all from one read of the row's K and V.  Only the transposed-K,
 * row-V layout of vLLM's vec ISAs (and a head size that is a multiple of 16) is handled;
 * the caller runs the stock kernel otherwise. */
static inline __attribute__((always_inline)) vf vmax(vf a, vf b) {
    const vi take_a = a > b;
    return (vf)((take_a & (vi)a) | (~take_a & (vi)b));
}

/* e^x for x <= 0 (softmax after subtracting the maximum): Cephes' expf (range reduction
 * by ln 2, degree-6 polynomial; ~1 ulp), 0 below the smallest normal's logarithm. */
static inline __attribute__((always_inline)) vf vexp(vf x) {
    const vi tiny = x < -87.33654f;
    x = vmax(x, (vf){} - 87.33654f);
    const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf y = (vf){} + 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const vi two_n = (n + 127) << 23;
    return (vf)(~tiny & (vi)(y * (vf)two_n));
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < VL; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

static inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VL; ++i) s += v[i];
    return s;
}

/* Softmax of logits[0 .. live) in place (weights not yet divided by their sum); returns
 * 1 / sum.  Positions live .. W (rounded up to VL) are left as they are. */
static float softmax_unnormalized(float *logits, int64_t live) {
    const int64_t whole = live / VL * VL;
    vf m_vec = (vf){} - __builtin_inff();
    for (int64_t t = 0; t < whole; t += VL) m_vec = vmax(m_vec, load_f32(logits + t));
    float m = hmax(m_vec);
    for (int64_t t = whole; t < live; ++t) m = logits[t] > m ? logits[t] : m;
    vf s_vec = {};
    for (int64_t t = 0; t < whole; t += VL) {
        const vf e = vexp(load_f32(logits + t) - m);
        memcpy(logits + t, &e, sizeof e);
        s_vec += e;
    }
    float s = hsum(s_vec);
    if (whole < live) {  /* the tail, through one padded vector */
        float tail[VL];
        for (int i = 0; i < VL; ++i) tail[i] = whole + i < live ? logits[whole + i] - m : -__builtin_inff();
        const vf e = vexp(load_f32(tail));
        for (int64_t t = whole; t < live; ++t) { logits[t] = e[t - whole]; s += e[t - whole]; }
    }
    return 1.f / s;
}

#define FUSED(NAME, ELEM, LOADV, LOGITS)                                                    \
    /* out[n][dc .. dc + VL * V) = sum over t < live of p[n][t] V[t] for N heads. */        \
    static inline __attribute__((always_inline)) void NAME##_values(                        \
        const job_t *j, int64_t item, int64_t live, const float *p, int64_t W,              \
        const float *inv, float *out, int dc, const int N, const int V) {                   \
        const int D = j->D, bs = j->bs;                                                     \
        vf acc[4][4] = {{{0}}};                                                             \
        for (int b = 0; (int64_t)b * bs < live; ++b) {                                      \
            const ELEM *vals = (const ELEM *)key_page(j, item, b, sizeof(ELEM))             \
                               + (int64_t)bs * D + dc;                                      \
            const int64_t base = (int64_t)b * bs;                                           \
            const int tokens = live - base < bs ? (int)(live - base) : bs;                  \
            for (int t = 0; t < tokens; ++t) {                                              \
                for (int v = 0; v < V; ++v) {                                               \
                    const vf x = LOADV(vals + (int64_t)t * D + VL * v);                     \
                    for (int n = 0; n < N; ++n) acc[n][v] += p[n * W + base + t] * x;       \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        for (int n = 0; n < N; ++n)                                                         \
            for (int v = 0; v < V; ++v) {                                                   \
                const vf r = acc[n][v] * inv[n];                                            \
                memcpy(out + (int64_t)n * D + dc + VL * v, &r, sizeof r);                   \
            }                                                                               \
    }                                                                                       \
    /* The same with V known only here: each branch is a constant-V instance. */            \
    static inline __attribute__((always_inline)) void NAME##_values_v(                      \
        const job_t *j, int64_t item, int64_t live, const float *p, int64_t W,              \
        const float *inv, float *out, int dc, const int N, const int V) {                   \
        if (V == 4) NAME##_values(j, item, live, p, W, inv, out, dc, N, 4);                 \
        else if (V == 2) NAME##_values(j, item, live, p, W, inv, out, dc, N, 2);            \
        else NAME##_values(j, item, live, p, W, inv, out, dc, N, 1);                        \
    }                                                                                       \
    static void NAME(const job_t *j, float *attn, float *scores) {                          \
        const int64_t W = (int64_t)j->per_row * j->bs;                                      \
        const int D = j->D, G = j->group;                                                   \
        float inv[G];  /* any group: MQA models have 71 query heads per kv head */          \
        for (int64_t item = j->first; item < j->last; ++item) {                             \
            const int64_t live = j->live[item / j->kv_heads];                               \
            const float *q = j->q + item * G * D;                                           \
            float *p = j->out + item * G * W;                                               \
            for (int b = 0; (int64_t)b * j->bs < live; ++b) LOGITS##_block(j, item, b, q, p, W); \
            for (int g = 0; g < G; ++g) inv[g] = softmax_unnormalized(p + g * W, live);     \
            float *sc = scores + item * W;                                                  \
            for (int64_t t = 0; t < W; ++t) sc[t] = 0.f;                                    \
            for (int g = 0; g < G; ++g)                                                     \
                for (int64_t t = 0; t < live; ++t) sc[t] += p[g * W + t] * inv[g];          \
            float *o = attn + item * G * D;                                                 \
            for (int g = 0; g < G;) {                                                       \
                const int N = G - g >= 4 ? 4 : G - g >= 2 ? 2 : 1;                          \
                for (int dc = 0; dc < D;) {                                                 \
                    /* 4 x 4 accumulators where registers hold them, else 4 x 2 */          \
                    const int V = ACCUMULATORS >= 16 && D - dc >= 4 * VL ? 4 : 16 / VL;     \
                    if (N == 4)                                                             \
                        NAME##_values_v(j, item, live, p + g * W, W, inv + g, o + g * D, dc, 4, V); \
                    else if (N == 2)                                                        \
                        NAME##_values_v(j, item, live, p + g * W, W, inv + g, o + g * D, dc, 2, V); \
                    else                                                                    \
                        NAME##_values_v(j, item, live, p + g * W, W, inv + g, o + g * D, dc, 1, V); \
                    dc += VL * V;                                                           \
                }                                                                           \
                g += N;                                                                     \
            }                                                                               \
        }                                                                                   \
    }

FUSED(attend_f32, float, load_f32, fast_f32)
FUSED(attend_bf16, uint16_t, load_bf16, fast_bf16)
FUSED(attend_f16, _Float16, load_f16, fast_f16)

/* The decode rule over one row's scores (exactly policies.selection.position_to_drop's
 * choice, no arithmetic): the lowest-scoring of positions 0 .. live - 1, ties to the
 * highest position; a NaN ranks lowest (torch.argmin), the last NaN when several. */
static int64_t lowest_position(const void *scores, int f64, int64_t base, int64_t live) {
    int64_t lowest = -1, last_nan = -1;
    double best = 0.0;
    for (int64_t s = 0; s < live; ++s) {
        const double v = f64 ? ((const double *)scores)[base + s]
                             : (double)((const float *)scores)[base + s];
        if (v != v) last_nan = s;
        else if (lowest < 0 || v <= best) { best = v; lowest = s; }
    }
    return last_nan >= 0 ? last_nan : lowest;
}

/* Row e's decode move: its last live position's K column and V row, every kv head, into
 * the dropped position ``drop``.  Writes the two slots (equal when the newest token is
 * dropped, and then nothing moves). */
static void move_last_into(const job_t *j, int64_t e, int64_t drop, int64_t *src_slot,
                           int64_t *dst_slot) {
    const int H = j->kv_heads, bs = j->bs, D = j->D;
    const int64_t last = j->live[e] - 1;
    const int32_t *table = j->table + e * j->per_row;
    const int64_t from = table[last / bs], from_off = last % bs;
    const int64_t to = table[drop / bs], to_off = drop % bs;
    *src_slot = from * bs + from_off;
    *dst_slot = to * bs + to_off;
    if (drop == last) return;
    const int elem = j->dtype == F32 ? 4 : 2;
    char *pages = (char *)j->pages[0];
    for (int h = 0; h < H; ++h) {
        const int64_t head = (int64_t)h * 2 * bs * D;
        char *a = pages + (from * j->block_elems + head) * elem;
        char *b = pages + (to * j->block_elems + head) * elem;
        for (int d = 0; d < D; ++d)  /* K: column from_off of the [D][bs] half page */
            memcpy(b + ((int64_t)d * bs + to_off) * elem, a + ((int64_t)d * bs + from_off) * elem, elem);
        memcpy(b + ((int64_t)bs * D + to_off * D) * elem,  /* V: row of the [bs][D] half */
               a + ((int64_t)bs * D + from_off * D) * elem, (size_t)D * elem);
    }
}

/* Row e's decode eviction right after its attention, while its pages are in cache: the
 * score of each live position is its kv heads' sums added in head order, divided by all
 * the layer's query heads (TOVA's mean); the lowest one is dropped and the row's last
 * live position moves into it.  ``mean``: scratch of ``live`` floats. */
static void evict_row(const job_t *j, int64_t e, const float *scores, int total_q_heads,
                      float *mean, int64_t *src_slot, int64_t *dst_slot) {
    const int64_t W = (int64_t)j->per_row * j->bs, live = j->live[e];
    const int H = j->kv_heads;
    const float *sc = scores + e * H * W;
    for (int64_t t = 0; t < live; ++t) {
        float sum = sc[t];
        for (int h = 1; h < H; ++h) sum += sc[h * W + t];
        mean[t] = sum / (float)total_q_heads;
    }
    move_last_into(j, e, lowest_position(mean, 0, 0, live), src_slot, dst_slot);
}

/* The same for a row under a position rule (tova_position_drop's key: the logical
 * position held in ``positions`` [slot], plus 2**40 below ``protect``; ties to the
 * highest cache position); the side state's position moves with the K and V. */
static void evict_row_by_position(const job_t *j, int64_t e, int32_t *positions,
                                  int64_t protect, int64_t *src_slot, int64_t *dst_slot) {
    const int bs = j->bs;
    const int32_t *table = j->table + e * j->per_row;
    int64_t lowest = 0, best = 0;
    for (int64_t s = 0; s < j->live[e]; ++s) {
        const int64_t p = positions[table[s / bs] * (int64_t)bs + s % bs];
        const int64_t key = p + (p < protect ? (int64_t)1 << 40 : 0);
        if (s == 0 || key <= best) { best = key; lowest = s; }
    }
    move_last_into(j, e, lowest, src_slot, dst_slot);
    positions[*dst_slot] = positions[*src_slot];
}

/* Decode attention of one layer, one query per row, over the row's first live[e] cache
 * positions (block table [rows, per_row]; K transposed, V rows, bs and D multiples of
 * 16): ``attn`` [rows, kv_heads, group, D] float32, ``scores`` [rows, kv_heads, W] each
 * kv head's sum over its query heads of the softmax weights (0 past live), ``logits``
 * [rows, kv_heads, group, W] scratch.  With ``evicts`` ([rows], nonzero: the row is at
 * its budget and drops one position), each such row then evicts (``evict_row``) into
 * ``src_slots``/``dst_slots`` [rows] (-1 for the other rows).  With ``positions`` (the
 * layer's side-state positions, int32 [positions_size]) the rows evict by their position
 * rule instead (``evict_row_by_position``, ``protect`` [rows]), after the step's new
 * positions are written (``new_slots``/``new_positions``, n_new).  Returns 0; -1 for an
 * unsupported shape or dtype, -2 for a block id outside the pages, a live length outside
 * 1 .. W, or a side state too small for the pages or a new slot. */
int tova_decode_attention(const void *pages, int dtype, int64_t block_elems, int kv_heads,
                          int bs, int D, const int32_t *table, int rows, int per_row,
                          const float *q, int group, float scale, const int32_t *live,
                          float *logits, float *attn, float *scores, int threads,
                          int num_blocks, const int32_t *evicts, int total_q_heads,
                          int64_t *src_slots, int64_t *dst_slots, int32_t *positions,
                          int64_t positions_size, const int64_t *protect,
                          const int64_t *new_slots, const int64_t *new_positions,
                          int64_t n_new) {
    if (dtype < F32 || dtype > F16 || bs % 16 || D % 16 || group < 1) return -1;
    if (evicts && !positions && total_q_heads < 1) return -1;
    for (int64_t i = 0; i < (int64_t)rows * per_row; ++i)
        if (table[i] < 0 || table[i] >= num_blocks) return -2;
    for (int e = 0; e < rows; ++e)
        if (live[e] < 1 || live[e] > (int64_t)per_row * bs) return -2;
    if (positions) {  /* every slot of the pages, and each new one, has its entry */
        if (positions_size < (int64_t)num_blocks * bs) return -2;
        for (int64_t i = 0; i < n_new; ++i)
            if (new_slots[i] < 0 || new_slots[i] >= positions_size) return -2;
        for (int64_t i = 0; i < n_new; ++i) positions[new_slots[i]] = (int32_t)new_positions[i];
    }
    const char *layer[1] = {(const char *)pages};
    const job_t base = {layer, dtype, rows, block_elems, kv_heads, bs, D, bs, 1, group,
                        per_row, table, q, live, scale, logits, 0, 0};
    const int64_t items = (int64_t)rows * kv_heads;
    const int64_t work = items * group * per_row * bs * D;
    if (threads < 1 || work < MIN_PARALLEL_WORK) threads = 1;
    if (threads > items) threads = (int)items;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int i = 0; i < threads; ++i) {
            job_t job = base;
            job.first = items * i / threads;
            job.last = items * (i + 1) / threads;
            if (dtype == F32) attend_f32(&job, attn, scores);
            else if (dtype == BF16) attend_bf16(&job, attn, scores);
            else attend_f16(&job, attn, scores);
        }
        /* (the loop's barrier: every kv head of every row has its scores) */
        if (evicts) {
#pragma omp for schedule(static)
            for (int e = 0; e < rows; ++e) {
                /* the row's own logits, no longer needed, are the scratch */
                float *mean = logits + (int64_t)e * kv_heads * group * per_row * bs;
                src_slots[e] = dst_slots[e] = -1;
                if (evicts[e] && positions)
                    evict_row_by_position(&base, e, positions, protect[e], src_slots + e,
                                          dst_slots + e);
                else if (evicts[e])
                    evict_row(&base, e, scores, total_q_heads, mean, src_slots + e,
                              dst_slots + e);
            }
        }
    }
    return 0;
}

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
    const int64_t work = items * group * per_row * bs * D;
    if (threads < 1 || work < MIN_PARALLEL_WORK) threads = 1;
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
            const int64_t drop = lowest_position(scores, f64, base, live[e]);
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

/* Steady decode's eviction for position rules (policies.registry.PolicyUnit.
 * position_rule: keep score = logical position, plus 2**40 below the row's protect[e]),
 * in L layers' side-state positions at once, with no scores: the new slots' positions
 * are written first (new_slots / new_positions, n_new), then row e of layer l drops its
 * live cache position of lowest key (ties: the highest position, as lowest_position) and
 * (once every row has chosen) the position held by its last live slot moves into the
 * dropped slot.  Keys are exact
 * in int64, as the rule's fp64 scores are.  positions[l]: int32 [size]; slots [E][width];
 * writes src [E] and dst [L][E] as tova_decode_drop does.  Returns -2, having written
 * nothing, for a live length outside 1 .. width or a slot outside 0 .. size - 1. */
int tova_position_drop(int32_t *const *positions, int layers, int64_t size, int64_t rows,
                       int64_t width, const int32_t *live, const int64_t *slots,
                       const int64_t *protect, const int64_t *new_slots,
                       const int64_t *new_positions, int64_t n_new, int64_t *src,
                       int64_t *dst) {
    for (int64_t e = 0; e < rows; ++e) {
        if (live[e] < 1 || live[e] > width) return -2;
        for (int64_t s = 0; s < live[e]; ++s)
            if (slots[e * width + s] < 0 || slots[e * width + s] >= size) return -2;
    }
    for (int64_t i = 0; i < n_new; ++i)
        if (new_slots[i] < 0 || new_slots[i] >= size) return -2;
    for (int64_t e = 0; e < rows; ++e) src[e] = slots[e * width + live[e] - 1];
    const int64_t protected_key = (int64_t)1 << 40;
    for (int l = 0; l < layers; ++l) {
        int32_t *pos = positions[l];
        for (int64_t i = 0; i < n_new; ++i) pos[new_slots[i]] = (int32_t)new_positions[i];
        for (int64_t e = 0; e < rows; ++e) {
            const int64_t *row = slots + e * width;
            int64_t lowest = 0, best = 0;
            for (int64_t s = 0; s < live[e]; ++s) {
                const int64_t p = pos[row[s]];
                const int64_t key = p + (p < protect[e] ? protected_key : 0);
                if (s == 0 || key <= best) { best = key; lowest = s; }
            }
            dst[(int64_t)l * rows + e] = row[lowest];
        }
        /* Every row chooses before any moves, as scores taken first would have it. */
        for (int64_t e = 0; e < rows; ++e) pos[dst[(int64_t)l * rows + e]] = pos[src[e]];
    }
    return 0;
}
