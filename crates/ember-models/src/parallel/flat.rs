//! Collectives over flat buffers: the shape bookkeeping a transport that only moves flat,
//! same-typed buffers between ranks needs to implement [`Communicator`] (NCCL, in
//! [`crate::parallel::nccl`]). Concatenations along any dimension, uneven gathers, scatters of any
//! dimension, all-to-alls of ragged and empty pieces and broadcasts to ranks that do not know
//! the shape all come down to five flat calls, after an exchange of small fixed-size headers
//! (dtype and shape) where the peers cannot know the shapes. Kept apart from NCCL so the
//! bookkeeping runs in CI over the threads backend (see the tests).

use candle_core::{DType, Device, Result, Tensor};

use crate::parallel::Communicator;

/// One flat collective.
#[derive(Debug, Clone)]
pub enum FlatCall {
    /// The element-wise sum, on every rank.
    AllReduce,
    /// Every rank's input (the same count everywhere), concatenated in rank order.
    AllGather,
    /// The sum, split in `world` even pieces: rank r keeps piece r.
    ReduceScatter,
    /// `root`'s input, on every rank.
    Broadcast { root: usize },
    /// Elements sent to and received from each rank, in rank order; the input is the pieces
    /// sent, end to end, and the output those received.
    AllToAll { send: Vec<usize>, recv: Vec<usize> },
}

/// What moves flat buffers between the ranks of a group.
pub trait FlatTransport: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Where this rank's tensors live.
    fn device(&self) -> &Device;
    /// `call` on this rank's flat `input` (at least one element), giving `[out_len]`.
    fn run(&self, input: &Tensor, call: FlatCall, out_len: usize) -> Result<Tensor>;
    /// Fails the group: every rank's calls return an error instead of waiting.
    fn abort(&self, reason: &str);
}

/// A [`Communicator`] over a flat transport.
pub struct Staged<T>(pub T);

fn group_error(reason: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("the parallel group failed: {reason}"))
}

/// The element types a header names, by index.
const HEADER_DTYPES: [DType; 7] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::F64,
    DType::U32,
    DType::I64,
    DType::U8,
];
/// Dimensions a header carries.
const HEADER_DIMS: usize = 6;
/// `[dtype index, number of dimensions, dims...]`.
const HEADER_LEN: usize = 2 + HEADER_DIMS;

fn header(dtype: DType, shape: &[usize]) -> Result<[i64; HEADER_LEN]> {
    let Some(code) = HEADER_DTYPES.iter().position(|&d| d == dtype) else {
        candle_core::bail!("the flat collectives do not take {dtype:?} tensors")
    };
    if shape.len() > HEADER_DIMS {
        candle_core::bail!(
            "the flat collectives take tensors of up to {HEADER_DIMS} dimensions, not {shape:?}"
        );
    }
    let mut h = [0i64; HEADER_LEN];
    h[0] = code as i64;
    h[1] = shape.len() as i64;
    for (slot, &d) in h[2..].iter_mut().zip(shape) {
        *slot = d as i64;
    }
    Ok(h)
}

fn read_header(h: &[i64]) -> Result<(DType, Vec<usize>)> {
    let dtype = usize::try_from(h[0])
        .ok()
        .and_then(|i| HEADER_DTYPES.get(i).copied());
    let dims = usize::try_from(h[1]).ok().filter(|&n| n <= HEADER_DIMS);
    match (dtype, dims) {
        (Some(dtype), Some(n)) => Ok((dtype, h[2..2 + n].iter().map(|&d| d as usize).collect())),
        _ => candle_core::bail!("a rank sent a malformed collective header {h:?}"),
    }
}

/// Moves axis 0 of `t` to position `dim` and merges it with the axis there: the inverse of
/// splitting `dim` into `[world, piece]` and moving `world` to the front.
fn merge_leading_axis(t: &Tensor, dim: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let mut order: Vec<usize> = (1..=dim).collect();
    order.push(0);
    order.extend(dim + 1..dims.len());
    let moved = t.permute(order)?.contiguous()?;
    let mut merged = dims[1..].to_vec();
    merged[dim] *= dims[0];
    moved.reshape(merged)
}

impl<T: FlatTransport> Staged<T> {
    /// Every rank's `[n]` flat tensor, `n` the same everywhere, as `[world · n]` in rank order.
    fn gather_flat(&self, flat: &Tensor) -> Result<Tensor> {
        let n = flat.elem_count();
        self.0.run(flat, FlatCall::AllGather, n * self.world_size())
    }

    /// Every rank's header, on the host.
    fn gather_headers(&self, mine: &[i64]) -> Result<Vec<Vec<i64>>> {
        let t = Tensor::from_slice(mine, mine.len(), self.0.device())?;
        let all = self.gather_flat(&t)?.to_vec1::<i64>()?;
        Ok(all.chunks(mine.len()).map(<[i64]>::to_vec).collect())
    }
}

impl<T: FlatTransport> Communicator for Staged<T> {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn world_size(&self) -> usize {
        self.0.world_size()
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor> {
        let n = tensor.elem_count();
        if n == 0 {
            return Ok(tensor.clone());
        }
        self.0
            .run(tensor, FlatCall::AllReduce, n)?
            .reshape(tensor.shape())
    }

    fn all_gather_equal(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        let n = tensor.elem_count();
        if n == 0 {
            return self.all_gather(tensor, dim);
        }
        let all = self.gather_flat(&tensor.flatten_all()?)?;
        let mut stacked = vec![self.world_size()];
        stacked.extend_from_slice(tensor.dims());
        merge_leading_axis(&all.reshape(stacked)?, dim)
    }

    fn all_gather(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        // The ranks may differ along `dim` (an uneven split of a step's tokens): each learns the
        // others' shapes, and every rank sends the largest count, padded.
        let headers = self.gather_headers(&header(tensor.dtype(), tensor.dims())?)?;
        let shapes = headers
            .iter()
            .map(|h| read_header(h).map(|(_, shape)| shape))
            .collect::<Result<Vec<_>>>()?;
        let counts: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let most = counts.iter().copied().max().unwrap_or(0);
        if most == 0 {
            return Tensor::cat(
                &shapes
                    .iter()
                    .map(|s| Tensor::zeros(s.as_slice(), tensor.dtype(), self.0.device()))
                    .collect::<Result<Vec<_>>>()?,
                dim,
            );
        }
        let flat = tensor.flatten_all()?;
        let padded = if flat.elem_count() == most {
            flat
        } else {
            let pad = Tensor::zeros(most - flat.elem_count(), tensor.dtype(), self.0.device())?;
            Tensor::cat(&[flat, pad], 0)?
        };
        let all = self.gather_flat(&padded)?;
        if counts.iter().all(|&c| c == most) {
            let mut stacked = vec![self.world_size()];
            stacked.extend_from_slice(tensor.dims());
            return merge_leading_axis(&all.reshape(stacked)?, dim);
        }
        let pieces = shapes
            .iter()
            .zip(&counts)
            .enumerate()
            .map(|(r, (shape, &n))| all.narrow(0, r * most, n)?.reshape(shape.as_slice()))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&pieces, dim)
    }

    fn reduce_scatter_sum(&self, tensor: &Tensor, dim: usize) -> Result<Tensor> {
        let world = self.world_size();
        let dims = tensor.dims().to_vec();
        let len = dims[dim];
        if !len.is_multiple_of(world) {
            candle_core::bail!(
                "reduce_scatter: dim {dim} of size {len} does not split over {world} ranks"
            );
        }
        // Split `dim` into [world, piece] and bring `world` to the front: each rank's piece is
        // then one contiguous block, in rank order, as NCCL scatters.
        let mut split = dims[..dim].to_vec();
        split.extend([world, len / world]);
        split.extend_from_slice(&dims[dim + 1..]);
        let mut order = vec![dim];
        order.extend(0..dim);
        order.extend(dim + 1..split.len());
        let blocks = tensor.reshape(split)?.permute(order)?.contiguous()?;
        let mut piece = dims.clone();
        piece[dim] = len / world;
        let n = tensor.elem_count() / world;
        if n == 0 {
            return Tensor::zeros(piece, tensor.dtype(), self.0.device());
        }
        self.0
            .run(&blocks.flatten_all()?, FlatCall::ReduceScatter, n)?
            .reshape(piece)
    }

    fn all_to_all(&self, send: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let world = self.world_size();
        if send.len() != world {
            candle_core::bail!("all_to_all: {} tensors for {world} ranks", send.len());
        }
        let dtype = send[0].dtype();
        if let Some(t) = send.iter().find(|t| t.dtype() != dtype) {
            candle_core::bail!(
                "all_to_all: {dtype:?} and {:?} tensors in one call",
                t.dtype()
            );
        }
        let mut mine = Vec::with_capacity(world * HEADER_LEN);
        for t in &send {
            mine.extend(header(dtype, t.dims())?);
        }
        // headers[s] holds rank s's headers for every destination.
        let headers = self.gather_headers(&mine)?;
        let mut recv_shapes = Vec::with_capacity(world);
        for from in &headers {
            let h = &from[self.0.rank() * HEADER_LEN..(self.0.rank() + 1) * HEADER_LEN];
            let (their_dtype, shape) = read_header(h)?;
            if their_dtype != dtype {
                candle_core::bail!("all_to_all: a rank sends {their_dtype:?}, this one {dtype:?}");
            }
            recv_shapes.push(shape);
        }
        let send_counts: Vec<usize> = send.iter().map(Tensor::elem_count).collect();
        let recv_counts: Vec<usize> = recv_shapes.iter().map(|s| s.iter().product()).collect();
        let total: usize = recv_counts.iter().sum();
        let flat: Vec<Tensor> = send
            .iter()
            .filter(|t| t.elem_count() > 0)
            .map(Tensor::flatten_all)
            .collect::<Result<_>>()?;
        let input = if flat.is_empty() {
            Tensor::zeros(1, dtype, self.0.device())?
        } else {
            Tensor::cat(&flat, 0)?
        };
        let received = self.0.run(
            &input,
            FlatCall::AllToAll {
                send: send_counts,
                recv: recv_counts.clone(),
            },
            total,
        )?;
        let mut at = 0;
        recv_shapes
            .iter()
            .zip(&recv_counts)
            .map(|(shape, &n)| {
                let piece = received.narrow(0, at, n)?.reshape(shape.as_slice());
                at += n;
                piece
            })
            .collect()
    }

    fn broadcast(&self, tensor: Option<&Tensor>, root: usize) -> Result<Tensor> {
        if (self.0.rank() == root) != tensor.is_some() {
            let reason = format!(
                "broadcast: rank {} disagrees about root {root}",
                self.0.rank()
            );
            self.abort(&reason);
            return Err(group_error(&reason));
        }
        let mine = match tensor {
            Some(t) => header(t.dtype(), t.dims())?,
            None => [0; HEADER_LEN],
        };
        let h = Tensor::from_slice(&mine, HEADER_LEN, self.0.device())?;
        let h = self
            .0
            .run(&h, FlatCall::Broadcast { root }, HEADER_LEN)?
            .to_vec1::<i64>()?;
        let (dtype, shape) = read_header(&h)?;
        let n: usize = shape.iter().product();
        if n == 0 {
            return Tensor::zeros(shape, dtype, self.0.device());
        }
        let input = match tensor {
            Some(t) => t.clone(),
            None => Tensor::zeros(1, dtype, self.0.device())?,
        };
        self.0
            .run(&input, FlatCall::Broadcast { root }, n)?
            .reshape(shape)
    }

    fn abort(&self, reason: &str) {
        self.0.abort(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_refuse_what_they_cannot_carry() {
        let h = header(DType::BF16, &[3, 0, 7]).unwrap();
        assert_eq!(read_header(&h).unwrap(), (DType::BF16, vec![3, 0, 7]));
        assert!(header(DType::F8E4M3, &[1]).is_err());
        assert!(header(DType::F32, &[1; 7]).is_err());
        assert!(read_header(&[99, 1, 1, 0, 0, 0, 0, 0]).is_err());
        assert!(read_header(&[0, 9, 1, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn merging_the_leading_axis_is_a_concatenation_along_dim() {
        let d = Device::Cpu;
        let parts: Vec<Tensor> = (0i64..3)
            .map(|r| {
                Tensor::arange(r * 8, r * 8 + 8, &d)
                    .unwrap()
                    .reshape((2, 4))
                    .unwrap()
            })
            .collect();
        let stacked = Tensor::stack(&parts, 0).unwrap();
        for dim in 0..2 {
            assert_eq!(
                merge_leading_axis(&stacked, dim)
                    .unwrap()
                    .to_vec2::<i64>()
                    .unwrap(),
                Tensor::cat(&parts, dim).unwrap().to_vec2::<i64>().unwrap(),
                "dim {dim}"
            );
        }
    }

    use crate::parallel::{ThreadGroup, ThreadRank};

    /// The flat calls over the threads backend, moving exactly the counts NCCL would.
    struct FlatThreads(ThreadRank, Device);

    impl FlatTransport for FlatThreads {
        fn rank(&self) -> usize {
            self.0.rank()
        }

        fn world_size(&self) -> usize {
            self.0.world_size()
        }

        fn device(&self) -> &Device {
            &self.1
        }

        fn run(&self, input: &Tensor, call: FlatCall, out_len: usize) -> Result<Tensor> {
            let input = input.flatten_all()?;
            let out = match call {
                FlatCall::AllReduce => self.0.all_reduce_sum(&input)?,
                FlatCall::AllGather => self.0.all_gather(&input, 0)?,
                FlatCall::ReduceScatter => self.0.reduce_scatter_sum(&input, 0)?,
                FlatCall::Broadcast { root } => self
                    .0
                    .broadcast((self.rank() == root).then_some(&input), root)?,
                FlatCall::AllToAll { send, recv } => {
                    let mut at = 0;
                    let mut pieces = Vec::new();
                    for &n in &send {
                        pieces.push(input.narrow(0, at, n)?);
                        at += n;
                    }
                    let got = self.0.all_to_all(pieces)?;
                    for (piece, &n) in got.iter().zip(&recv) {
                        assert_eq!(piece.elem_count(), n, "all_to_all: received count");
                    }
                    Tensor::cat(&got, 0)?
                }
            };
            assert_eq!(out.elem_count(), out_len, "a flat call's output length");
            Ok(out)
        }

        fn abort(&self, reason: &str) {
            self.0.abort(reason)
        }
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Every collective on rank `comm`'s inputs, seeded by its rank, each result with its shape.
    fn battery(comm: &dyn Communicator) -> Vec<(Vec<usize>, Vec<f32>)> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let seed = 1000 * rank as u64;
        let f32s = |t: Tensor| {
            (
                t.dims().to_vec(),
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        };
        let x = random(&[2, 2 * world, 3], seed);
        let mut out = vec![
            f32s(comm.all_reduce_sum(&x).unwrap()),
            f32s(
                comm.all_reduce_sum(&x.to_dtype(DType::BF16).unwrap())
                    .unwrap(),
            ),
            // A strided view, gathered along every dimension.
            f32s(comm.all_gather(&x.transpose(0, 2).unwrap(), 0).unwrap()),
            f32s(comm.all_gather(&x, 1).unwrap()),
            f32s(comm.all_gather(&x, 2).unwrap()),
            f32s(
                comm.all_gather_equal(&x.transpose(1, 2).unwrap(), 2)
                    .unwrap(),
            ),
            f32s(comm.reduce_scatter_sum(&x, 1).unwrap()),
            f32s(
                comm.reduce_scatter_sum(&x.transpose(1, 2).unwrap(), 2)
                    .unwrap(),
            ),
            // Uneven along dim 0 and dim 1; every rank empty.
            f32s(
                comm.all_gather(&random(&[rank + 1, 4], seed + 1), 0)
                    .unwrap(),
            ),
            f32s(
                comm.all_gather(&random(&[3, rank % 2], seed + 2), 1)
                    .unwrap(),
            ),
            f32s(comm.all_gather(&random(&[0, 4], seed + 3), 0).unwrap()),
        ];
        // Ragged pieces, some empty, in f32 and u32; and a rank that sends nothing at all.
        for (k, dtype) in [(0, DType::F32), (1, DType::U32)] {
            let send = (0..world)
                .map(|d| {
                    let rows = if rank == 1 { 0 } else { (rank + d + k) % 3 };
                    let t = random(&[rows, 2, 2], seed + 10 + d as u64);
                    if dtype == DType::U32 {
                        ((t + 1.0).unwrap() * 1000.0)
                            .unwrap()
                            .to_dtype(DType::U32)
                            .unwrap()
                    } else {
                        t
                    }
                })
                .collect();
            for piece in comm.all_to_all(send).unwrap() {
                assert_eq!(piece.dtype(), dtype);
                out.push(f32s(piece));
            }
        }
        for root in 0..world {
            let mine = random(&[2, root + 1], seed + 50);
            out.push(f32s(
                comm.broadcast((rank == root).then_some(&mine), root)
                    .unwrap(),
            ));
        }
        out
    }

    fn on_threads(comms: Vec<Box<dyn Communicator>>) -> Vec<Vec<(Vec<usize>, Vec<f32>)>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| s.spawn(move || battery(c.as_ref())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// The bookkeeping over flat calls gives exactly what the threads backend gives tensor by
    /// tensor: shapes and values, for 1 to 4 ranks.
    #[test]
    fn flat_calls_give_every_collective_of_the_threads_backend() {
        for world in 1..=4 {
            let staged = ThreadGroup::ranks(world)
                .into_iter()
                .map(|r| Box::new(Staged(FlatThreads(r, Device::Cpu))) as Box<dyn Communicator>)
                .collect();
            let direct = ThreadGroup::ranks(world)
                .into_iter()
                .map(|r| Box::new(r) as Box<dyn Communicator>)
                .collect();
            let (got, want) = (on_threads(staged), on_threads(direct));
            assert_eq!(got, want, "{world} ranks");
        }
    }
}
