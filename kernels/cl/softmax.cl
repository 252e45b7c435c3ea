/* Partially fused row softmax (Chen et al. 2023, "Speed is all you need"): the max and the sum
 * of exponentials come from ONE read with an online rescaling (m, s) -> (m', s exp(m - m') + ...),
 * merged across the work-group; a second read writes exp(x - m) / s. One launch, no temporaries.
 * One work-group per row; the local size must be a power of two. */
inline void merge_ms(float* m, float* s, const float m2, const float s2) {
    const float mm = fmax(*m, m2);
    if (mm == -INFINITY) return;  /* both empty */
    *s = *s * exp(*m - mm) + s2 * exp(m2 - mm);
    *m = mm;
}

__kernel void softmax_rows(__global const T* x, __global T* y, const int ncols, __local float* lm, __local float* ls) {
    const int row = get_group_id(0);
    const int lid = get_local_id(0), L = get_local_size(0);
    const int base = row * ncols;
    float m = -INFINITY, s = 0.0f;
    for (int j = lid; j < ncols; j += L) merge_ms(&m, &s, LD(x, base + j), 1.0f);
    lm[lid] = m; ls[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int k = L / 2; k > 0; k >>= 1) {
        if (lid < k) {
            float a = lm[lid], b = ls[lid];
            merge_ms(&a, &b, lm[lid + k], ls[lid + k]);
            lm[lid] = a; ls[lid] = b;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float M = lm[0], inv = 1.0f / ls[0];
    for (int j = lid; j < ncols; j += L) ST(y, base + j, exp(LD(x, base + j) - M) * inv);
}
