use super::*;
use ember_kernels::scatter_rows;

/// fp8 cache writes: random bytes into scattered slots of a pool (one slot past it), row widths
/// from one MLA latent row to narrower than a warp; exact.
#[test]
fn scatter_rows_matches_the_cpu_reference() {
    let Some(k) = kernels() else { return };
    let mut rng = rng();
    let s = k.stream();
    for &(pool_rows, tokens, row_bytes) in &[(64, 5, 576), (1024, 37, 256), (16, 3, 7)] {
        let mut pool: Vec<u8> = (0..pool_rows * row_bytes).map(|_| rng.random()).collect();
        let rows: Vec<u8> = (0..tokens * row_bytes).map(|_| rng.random()).collect();
        let mut slots: Vec<u32> = (0..pool_rows as u32).collect();
        slots.sort_by_key(|_| rng.random::<u32>());
        slots.truncate(tokens - 1);
        slots.push(pool_rows as u32 + 3);
        let mut dpool = s.clone_htod(&pool).unwrap();
        let (drows, dslots) = (s.clone_htod(&rows).unwrap(), s.clone_htod(&slots).unwrap());
        assert_eq!(
            scatter_rows::scatter_rows(&mut pool, &rows, &slots, row_bytes).unwrap(),
            1
        );
        k.scatter_rows(&mut dpool, &drows.as_view(), &dslots.as_view(), row_bytes)
            .unwrap();
        assert_eq!(
            s.clone_dtoh(&dpool).unwrap(),
            pool,
            "[{pool_rows}, {row_bytes}]"
        );
    }
}
