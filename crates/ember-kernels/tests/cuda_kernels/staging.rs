use super::*;

/// Step metadata staged through the page-locked ring: every upload arrives intact, for sizes in
/// one class and across classes, more uploads than the ring has buffers (each buffer reused
/// while earlier copies may still be in flight), and a size beyond staging (a pageable copy).
#[test]
fn staged_uploads_arrive_intact() {
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    let mut sent = Vec::new();
    for round in 0..40 {
        let n = [1usize, 200, 256, 257, 5000, 70_000, 3_000_000][round % 7];
        let data: Vec<u32> = (0..n).map(|_| rng.random()).collect();
        let slice = k.stage(&data).unwrap();
        assert!(slice.len() >= n, "round {round}: {} < {n}", slice.len());
        sent.push((data, slice));
    }
    for (i, (data, slice)) in sent.iter().enumerate() {
        let back = st.clone_dtoh(slice).unwrap();
        assert_eq!(
            &back[..data.len()],
            &data[..],
            "upload {i} of {} elements",
            data.len()
        );
    }
    let floats: Vec<f32> = (0..999).map(|_| rng.random_range(-1.0..1.0)).collect();
    let back = st.clone_dtoh(&k.stage(&floats).unwrap()).unwrap();
    assert_eq!(&back[..floats.len()], &floats[..]);
}

/// `write_at` lands its elements at the offset and leaves the rest of the buffer as it was;
/// `write_rows` lands each row at its pitch and leaves the rest of the row.
#[test]
fn write_at_overwrites_only_its_range() {
    let Some(k) = kernels() else { return };
    let st = k.stream();
    let mut rng = rng();
    let base: Vec<u32> = (0..1000).map(|_| rng.random()).collect();
    let dst = st.clone_htod(&base).unwrap();
    let mut want = base.clone();
    for (offset, n) in [(0usize, 1usize), (17, 300), (999, 1), (500, 500)] {
        let data: Vec<u32> = (0..n).map(|_| rng.random()).collect();
        k.write_at(&dst, offset, &data).unwrap();
        want[offset..offset + n].copy_from_slice(&data);
    }
    assert!(
        k.write_at(&dst, 999, &[1, 2]).is_err(),
        "overruns the buffer"
    );
    assert_eq!(st.clone_dtoh(&dst).unwrap(), want);
    // Rows of 7 into rows 50 apart (a graph's block tables, rewritten to the width needed).
    let rows: Vec<u32> = (0..20 * 7).map(|_| rng.random()).collect();
    k.write_rows(&dst, 50, &rows, 7).unwrap();
    for (r, row) in rows.chunks(7).enumerate() {
        want[r * 50..r * 50 + 7].copy_from_slice(row);
    }
    assert_eq!(
        st.clone_dtoh(&dst).unwrap(),
        want,
        "only each row's first 7"
    );
    assert!(
        k.write_rows(&dst, 50, &rows, 70).is_err(),
        "wider than the pitch"
    );
    let too_many = vec![0u32; 21 * 7];
    assert!(
        k.write_rows(&dst, 50, &too_many, 7).is_err(),
        "past the buffer"
    );
}
