//! Writes rows of one-byte elements (an fp8 KV cache's e4m3 or e5m2 codes) into the slots of a
//! pool: `pool[slots[t]] = rows[t]`, each row `row_bytes` long. candle's CUDA scatter has no
//! float8 kernel, so ember's fp8 caches write through this.
//!
//! A slot past the pool is not written (the kernel cannot fail mid-launch; the caller's slots
//! come from the block manager): the reference says how many were skipped. Later rows win
//! where two share a slot (the block manager never does that).

use crate::error::check_shape;
use crate::KernelError;

/// Tokens of a scatter, or why `rows` is not `[slots.len(), row_bytes]` over whole pool rows.
pub fn scatter_rows_shape(
    pool_len: usize,
    rows_len: usize,
    slots: usize,
    row_bytes: usize,
) -> Result<usize, KernelError> {
    check_shape(
        row_bytes > 0 && pool_len.is_multiple_of(row_bytes),
        "scatter_rows",
        || format!("the pool's {pool_len} bytes are not rows of {row_bytes}"),
    )?;
    check_shape(rows_len == slots * row_bytes, "scatter_rows", || {
        format!("rows hold {rows_len} bytes, expected {slots} slots x {row_bytes}")
    })?;
    Ok(slots)
}

/// CPU reference: copies row `t` of `rows` into row `slots[t]` of `pool`; returns how many rows
/// were skipped for a slot past the pool. Any element type (the kernel's are one byte).
pub fn scatter_rows<T: Copy>(
    pool: &mut [T],
    rows: &[T],
    slots: &[u32],
    row_bytes: usize,
) -> Result<usize, KernelError> {
    scatter_rows_shape(pool.len(), rows.len(), slots.len(), row_bytes)?;
    let pool_rows = pool.len() / row_bytes;
    let mut skipped = 0;
    for (row, &slot) in rows.chunks_exact(row_bytes).zip(slots) {
        let slot = slot as usize;
        if slot >= pool_rows {
            skipped += 1;
            continue;
        }
        pool[slot * row_bytes..(slot + 1) * row_bytes].copy_from_slice(row);
    }
    Ok(skipped)
}

/// The launcher: [`scatter_rows`] on the GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};

    use super::scatter_rows_shape;
    use crate::cuda::{block_per_row, CudaKernels};
    use crate::error::check_shape;
    use crate::KernelError;

    impl CudaKernels {
        /// [`crate::scatter_rows::scatter_rows`] on the GPU, over a pool of any one-byte element
        /// (`u8`, float8): `slots` stay on the device; one past the pool is skipped.
        pub fn scatter_rows<P: DeviceRepr>(
            &self,
            pool: &mut CudaSlice<P>,
            rows: &CudaView<'_, P>,
            slots: &CudaView<'_, u32>,
            row_bytes: usize,
        ) -> Result<(), KernelError> {
            check_shape(std::mem::size_of::<P>() == 1, "scatter_rows", || {
                format!(
                    "elements of {} bytes; the kernel copies bytes",
                    std::mem::size_of::<P>()
                )
            })?;
            let tokens = scatter_rows_shape(pool.len(), rows.len(), slots.len(), row_bytes)?;
            if tokens == 0 {
                return Ok(());
            }
            let threads = (row_bytes as u32).next_multiple_of(32).clamp(32, 256);
            let cfg = block_per_row("scatter_rows", "tokens", tokens, threads)?;
            let pool_rows = (pool.len() / row_bytes) as i64;
            let row_bytes = row_bytes as i64;
            let f = self.scatter_rows.load_function("scatter_rows_u8")?;
            let mut launch = self.stream.launch_builder(&f);
            launch
                .arg(pool)
                .arg(rows)
                .arg(slots)
                .arg(&row_bytes)
                .arg(&pool_rows);
            // SAFETY: matches scatter_rows_u8(unsigned char*, const unsigned char*, const
            // unsigned*, long long, long long) in kernels/scatter_rows.cu for one-byte elements
            // (checked); scatter_rows_shape bounds every row read, and the kernel skips slots past
            // pool_rows.
            unsafe { launch.launch(cfg) }?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_each_row_into_its_slot_and_skips_slots_past_the_pool() {
        let mut pool = [0u8; 8];
        let rows = [1, 2, 3, 4, 5, 6];
        assert_eq!(scatter_rows(&mut pool, &rows, &[3, 0, 9], 2).unwrap(), 1);
        assert_eq!(pool, [3, 4, 0, 0, 0, 0, 1, 2]);
        assert!(scatter_rows(&mut pool, &rows, &[0, 1], 2).is_err());
        assert!(scatter_rows(&mut pool[..7], &rows[..2], &[0], 2).is_err());
    }
}
