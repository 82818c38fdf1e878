// Rows of one-byte elements (fp8 KV cache codes) into their slots of a pool: pool[slots[t]] =
// rows[t], row_bytes each; one block per row, its threads striding over the bytes. A slot past
// the pool's pool_rows rows is skipped. CPU reference: crates/ember-kernels/src/scatter_rows.rs.

extern "C" __global__ void scatter_rows_u8(unsigned char* __restrict__ pool,
                                           const unsigned char* __restrict__ rows,
                                           const unsigned* __restrict__ slots, long long row_bytes,
                                           long long pool_rows) {
  const long long t = blockIdx.x;
  const long long slot = slots[t];
  if (slot >= pool_rows) return;
  unsigned char* dst = pool + slot * row_bytes;
  const unsigned char* src = rows + t * row_bytes;
  for (long long i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[i] = src[i];
}
