//! Update compression: top-k sparsification with error feedback, 8-bit
//! quantization, both combined, and a compact binary wire format whose size
//! is known exactly before encoding.
//!
//! Error feedback (Seide et al. 2014; Stich, Cordonnier, Jaggi 2018,
//! "Sparsified SGD with Memory") keeps, per client, whatever the compressor
//! did not send and adds it to the next update, so every coordinate is
//! eventually delivered and the sum of what was sent tracks the sum of the
//! true updates.
//!
//! # Wire format
//!
//! All integers are little-endian. Every payload starts with an 8-byte
//! header: `b"OA"`, format version `1`, a kind byte, and the dense dimension
//! `dim` as `u32`. Then, by kind:
//!
//! | kind | body |
//! |---|---|
//! | 0 dense | `dim` × `f32` |
//! | 1 sparse | `nnz: u32`, `nnz` index varints, `nnz` × `f32` |
//! | 2 quantized | `chunk: u32`, per chunk (`min: f32`, `scale: f32`), `dim` × `u8` |
//! | 3 sparse + quantized | `nnz: u32`, `chunk: u32`, `nnz` index varints, per chunk (`min`, `scale`), `nnz` × `u8` |
//!
//! Indices are strictly increasing; they are sent as LEB128 varints of the
//! first index and then of each gap minus one, so a typical top-1% index
//! costs one or two bytes. Varints must be minimal, so every payload has
//! exactly one encoding. A quantized chunk of `chunk` values (the last may
//! be shorter) decodes as `min + code·scale`.
//!
//! [`decode`] is meant for bytes from untrusted peers: it checks the size
//! bound first, allocates only after checking that the bytes to fill the
//! allocation are present, and refuses wrong dimensions, unsorted,
//! duplicate or out-of-range indices, non-minimal varints, non-finite
//! numbers and trailing bytes, always with an error and never a panic.

use rand::RngCore;

use crate::{Error, Result};

/// Largest dimension a payload may declare (2^28 parameters, 1 GiB as dense
/// `f32`). Far above the project's models, and low enough that the size
/// arithmetic below cannot overflow.
pub const MAX_DIM: usize = 1 << 28;

/// A reasonable default quantization chunk: per-chunk scales cost 8 bytes per
/// 1024 values (under 1%) while adapting to different layers' ranges.
pub const DEFAULT_QUANT_CHUNK: usize = 1024;

const MAGIC: [u8; 2] = *b"OA";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 8;

const KIND_DENSE: u8 = 0;
const KIND_SPARSE: u8 = 1;
const KIND_QUANTIZED: u8 = 2;
const KIND_SPARSE_QUANTIZED: u8 = 3;

fn check_finite(values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite {
            client: None,
            index,
        }),
        None => Ok(()),
    }
}

fn check_dim(dim: usize) -> Result<()> {
    if dim > MAX_DIM {
        return Err(Error::TooLarge {
            what: "dimension",
            limit: MAX_DIM,
            found: dim,
        });
    }
    Ok(())
}

/// Checks that indices are strictly increasing and below `dim`.
fn check_indices(indices: &[u32], dim: usize) -> Result<()> {
    for pair in indices.windows(2) {
        if pair[0] >= pair[1] {
            return Err(Error::invalid(
                "sparse indices",
                format!("not strictly increasing at {} then {}", pair[0], pair[1]),
            ));
        }
    }
    if let Some(&last) = indices.last()
        && last as usize >= dim
    {
        return Err(Error::invalid(
            "sparse indices",
            format!("index {last} out of range for dimension {dim}"),
        ));
    }
    Ok(())
}

/// A sparse vector: the values at a strictly increasing set of indices of a
/// `dim`-dimensional vector, zero elsewhere.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseUpdate {
    dim: usize,
    indices: Vec<u32>,
    values: Vec<f32>,
}

impl SparseUpdate {
    /// Builds a sparse vector, checking that indices are strictly increasing
    /// and in range, that there is one finite value per index, and that the
    /// dimension is at most [`MAX_DIM`].
    pub fn new(dim: usize, indices: Vec<u32>, values: Vec<f32>) -> Result<Self> {
        check_dim(dim)?;
        if indices.len() != values.len() {
            return Err(Error::LengthMismatch {
                client: None,
                expected: indices.len(),
                found: values.len(),
            });
        }
        check_indices(&indices, dim)?;
        check_finite(&values)?;
        Ok(SparseUpdate {
            dim,
            indices,
            values,
        })
    }

    /// The dense dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// The stored indices, strictly increasing.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// The stored values, one per index.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Adds this vector into `dense`, which must have length `dim`.
    pub fn add_to(&self, dense: &mut [f32]) -> Result<()> {
        if dense.len() != self.dim {
            return Err(Error::LengthMismatch {
                client: None,
                expected: self.dim,
                found: dense.len(),
            });
        }
        for (&i, &v) in self.indices.iter().zip(&self.values) {
            if let Some(d) = dense.get_mut(i as usize) {
                *d += v;
            }
        }
        Ok(())
    }

    /// The dense form.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.dim];
        for (&i, &v) in self.indices.iter().zip(&self.values) {
            if let Some(d) = out.get_mut(i as usize) {
                *d = v;
            }
        }
        out
    }
}

/// Indices of the (at most) `k` entries of largest magnitude, ascending;
/// exact zeros are never selected and ties go to the lower index, so the
/// choice is deterministic.
fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32)
        .filter(|&i| values[i as usize] != 0.0)
        .collect();
    let by_magnitude = |a: &u32, b: &u32| {
        let (va, vb) = (values[*a as usize].abs(), values[*b as usize].abs());
        vb.total_cmp(&va).then(a.cmp(b))
    };
    if k < idx.len() {
        if k == 0 {
            idx.clear();
        } else {
            idx.select_nth_unstable_by(k - 1, by_magnitude);
            idx.truncate(k);
        }
    }
    idx.sort_unstable();
    idx
}

/// Keeps the `k` entries of largest magnitude (exact zeros are never sent).
pub fn top_k(values: &[f32], k: usize) -> Result<SparseUpdate> {
    check_dim(values.len())?;
    check_finite(values)?;
    let indices = top_k_indices(values, k);
    let kept = indices.iter().map(|&i| values[i as usize]).collect();
    Ok(SparseUpdate {
        dim: values.len(),
        indices,
        values: kept,
    })
}

/// 8-bit quantized values: each chunk of `chunk` consecutive values is
/// mapped affinely onto 0..=255 between its minimum and maximum.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized {
    chunk: usize,
    mins: Vec<f32>,
    scales: Vec<f32>,
    codes: Vec<u8>,
}

/// How quantization rounds.
enum Rounding<'a> {
    Nearest,
    Stochastic(&'a mut dyn RngCore),
}

impl Quantized {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// Values per chunk (the last chunk may be shorter).
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// The reconstructed values, `min + code·scale` per chunk, clamped to
    /// the finite `f32` range (a hostile `min`/`scale` pair could otherwise
    /// reach infinity).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for ((codes, &min), &scale) in self
            .codes
            .chunks(self.chunk)
            .zip(&self.mins)
            .zip(&self.scales)
        {
            out.extend(codes.iter().map(|&c| {
                let v = f64::from(min) + f64::from(c) * f64::from(scale);
                v.clamp(-f64::from(f32::MAX), f64::from(f32::MAX)) as f32
            }));
        }
        out
    }

    fn chunks_for(len: usize, chunk: usize) -> usize {
        len.div_ceil(chunk)
    }
}

fn quantize_with(values: &[f32], chunk: usize, mut rounding: Rounding<'_>) -> Result<Quantized> {
    if chunk == 0 || chunk > MAX_DIM {
        return Err(Error::invalid(
            "quantization chunk",
            format!("{chunk} is not in 1..={MAX_DIM}"),
        ));
    }
    check_dim(values.len())?;
    check_finite(values)?;
    let n_chunks = Quantized::chunks_for(values.len(), chunk);
    let mut q = Quantized {
        chunk,
        mins: Vec::with_capacity(n_chunks),
        scales: Vec::with_capacity(n_chunks),
        codes: Vec::with_capacity(values.len()),
    };
    for part in values.chunks(chunk) {
        let min = part.iter().copied().fold(f32::INFINITY, f32::min);
        let max = part.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // The range is taken in f64 because max − min can overflow f32; the
        // step itself always fits. Codes are computed with the step as
        // stored, so encoder and decoder agree exactly.
        let scale = ((f64::from(max) - f64::from(min)) / 255.0) as f32;
        q.mins.push(min);
        q.scales.push(scale);
        for &v in part {
            let code = if scale > 0.0 {
                let t = (f64::from(v) - f64::from(min)) / f64::from(scale);
                let rounded = match &mut rounding {
                    Rounding::Nearest => t.round(),
                    Rounding::Stochastic(rng) => {
                        // Round up with probability equal to the fractional
                        // part, so the expected code is exactly t (unbiased).
                        let u = (rng.next_u64() >> 11) as f64 * f64::powi(2.0, -53);
                        let floor = t.floor();
                        if u < t - floor { floor + 1.0 } else { floor }
                    }
                };
                rounded.clamp(0.0, 255.0) as u8
            } else {
                0
            };
            q.codes.push(code);
        }
    }
    Ok(q)
}

/// Quantizes to 8 bits per value with per-chunk min/max scaling and
/// round-to-nearest (error at most half a step, `(max − min)/510`).
/// `chunk = values.len()` gives one scale for the whole tensor.
pub fn quantize(values: &[f32], chunk: usize) -> Result<Quantized> {
    quantize_with(values, chunk, Rounding::Nearest)
}

/// Like [`quantize`] but with stochastic rounding driven by `rng`, so the
/// dequantized value is an unbiased estimate of the input.
pub fn quantize_stochastic<R: RngCore>(
    values: &[f32],
    chunk: usize,
    rng: &mut R,
) -> Result<Quantized> {
    quantize_with(values, chunk, Rounding::Stochastic(rng))
}

/// Top-k sparsification with 8-bit quantized values.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseQuantized {
    dim: usize,
    indices: Vec<u32>,
    values: Quantized,
}

impl SparseQuantized {
    /// The dense dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The stored indices, strictly increasing.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// The quantized values, one per index.
    pub fn values(&self) -> &Quantized {
        &self.values
    }

    /// The sparse vector with dequantized values.
    pub fn to_sparse(&self) -> SparseUpdate {
        SparseUpdate {
            dim: self.dim,
            indices: self.indices.clone(),
            values: self.values.dequantize(),
        }
    }
}

/// Quantizes the values of a sparse vector to 8 bits (chunks of `chunk`),
/// without error feedback.
pub fn quantize_sparse(sparse: &SparseUpdate, chunk: usize) -> Result<SparseQuantized> {
    Ok(SparseQuantized {
        dim: sparse.dim,
        indices: sparse.indices.clone(),
        values: quantize(&sparse.values, chunk)?,
    })
}

/// Per-client error-feedback state: the residual of everything the
/// compressor has not yet sent.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Fresh state (zero residual) for a model of `dim` parameters.
    pub fn new(dim: usize) -> Result<Self> {
        check_dim(dim)?;
        Ok(ErrorFeedback {
            residual: vec![0.0; dim],
        })
    }

    /// What has been withheld so far.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Forgets the residual (e.g. when the job's model changes).
    pub fn reset(&mut self) {
        self.residual.iter_mut().for_each(|r| *r = 0.0);
    }

    /// Adds `update` to the residual and returns the accumulated vector,
    /// leaving the residual untouched on error.
    fn accumulate(&self, update: &[f32]) -> Result<Vec<f32>> {
        if update.len() != self.residual.len() {
            return Err(Error::LengthMismatch {
                client: None,
                expected: self.residual.len(),
                found: update.len(),
            });
        }
        check_finite(update)?;
        let acc: Vec<f32> = self
            .residual
            .iter()
            .zip(update)
            .map(|(&r, &u)| r + u)
            .collect();
        // Finite inputs can still sum past f32::MAX.
        check_finite(&acc)?;
        Ok(acc)
    }

    /// Sends the `k` largest entries of residual + `update` and keeps the
    /// rest as the new residual.
    pub fn compress(&mut self, update: &[f32], k: usize) -> Result<SparseUpdate> {
        let mut acc = self.accumulate(update)?;
        let indices = top_k_indices(&acc, k);
        let mut values = Vec::with_capacity(indices.len());
        for &i in &indices {
            let slot = &mut acc[i as usize];
            values.push(*slot);
            *slot = 0.0;
        }
        self.residual = acc;
        Ok(SparseUpdate {
            dim: self.residual.len(),
            indices,
            values,
        })
    }

    /// Like [`compress`](Self::compress), then quantizes the sent values to
    /// 8 bits (chunks of `chunk`). The quantization error of the sent
    /// values also goes into the residual, so it too is fed back.
    pub fn compress_quantized(
        &mut self,
        update: &[f32],
        k: usize,
        chunk: usize,
    ) -> Result<SparseQuantized> {
        let mut acc = self.accumulate(update)?;
        let indices = top_k_indices(&acc, k);
        let picked: Vec<f32> = indices.iter().map(|&i| acc[i as usize]).collect();
        let values = quantize(&picked, chunk)?;
        for (&i, sent) in indices.iter().zip(values.dequantize()) {
            let slot = &mut acc[i as usize];
            *slot -= sent;
        }
        self.residual = acc;
        Ok(SparseQuantized {
            dim: self.residual.len(),
            indices,
            values,
        })
    }
}

/// A model update in one of the wire representations.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// Every value as `f32`.
    Dense(Vec<f32>),
    /// Selected values as `f32`.
    Sparse(SparseUpdate),
    /// Every value as 8 bits.
    Quantized(Quantized),
    /// Selected values as 8 bits.
    SparseQuantized(SparseQuantized),
}

/// Bytes of the LEB128 varint of `v`.
fn varint_len(v: u32) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0x0fff_ffff => 4,
        _ => 5,
    }
}

/// The values written for strictly increasing indices: the first index,
/// then each gap minus one.
fn index_deltas(indices: &[u32]) -> impl Iterator<Item = u32> + '_ {
    let mut prev: Option<u32> = None;
    indices.iter().map(move |&i| {
        let d = match prev {
            // Strictly increasing, so i > p and this cannot underflow.
            Some(p) => i - p - 1,
            None => i,
        };
        prev = Some(i);
        d
    })
}

fn indices_len(indices: &[u32]) -> usize {
    index_deltas(indices).map(varint_len).sum()
}

impl Payload {
    /// The dense dimension.
    pub fn dim(&self) -> usize {
        match self {
            Payload::Dense(v) => v.len(),
            Payload::Sparse(s) => s.dim,
            Payload::Quantized(q) => q.len(),
            Payload::SparseQuantized(s) => s.dim,
        }
    }

    /// The dense vector this payload stands for.
    pub fn to_dense(&self) -> Vec<f32> {
        match self {
            Payload::Dense(v) => v.clone(),
            Payload::Sparse(s) => s.to_dense(),
            Payload::Quantized(q) => q.dequantize(),
            Payload::SparseQuantized(s) => s.to_sparse().to_dense(),
        }
    }

    /// Exactly how many bytes [`encode`] produces for this payload.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Payload::Dense(v) => 4 * v.len(),
                Payload::Sparse(s) => 4 + indices_len(&s.indices) + 4 * s.nnz(),
                Payload::Quantized(q) => 4 + 8 * q.mins.len() + q.len(),
                Payload::SparseQuantized(s) => {
                    8 + indices_len(&s.indices) + 8 * s.values.mins.len() + s.values.len()
                }
            }
    }
}

/// Bytes of a dense `f32` payload of dimension `dim`: the baseline the
/// compressed forms are compared with.
pub fn dense_encoded_len(dim: usize) -> usize {
    HEADER_LEN + 4 * dim
}

/// No valid payload of dimension `dim` is longer than this. The costliest
/// case is a sparse-quantized payload with every index present and
/// single-value chunks: 16 header bytes, then per value one index byte, 8
/// bytes of chunk scale and one code.
pub fn max_encoded_len(dim: usize) -> usize {
    16 + 10 * dim
}

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn varint(&mut self, mut v: u32) {
        while v >= 0x80 {
            self.0.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn indices(&mut self, indices: &[u32]) {
        for d in index_deltas(indices) {
            self.varint(d);
        }
    }
    fn scales(&mut self, q: &Quantized) {
        for (&min, &scale) in q.mins.iter().zip(&q.scales) {
            self.f32(min);
            self.f32(scale);
        }
    }
}

/// Encodes a payload in the wire format described in the [module
/// docs](self); the result is exactly [`Payload::encoded_len`] bytes.
///
/// Refuses a dense payload longer than [`MAX_DIM`] (the other forms cannot
/// be built that large).
pub fn encode(payload: &Payload) -> Result<Vec<u8>> {
    check_dim(payload.dim())?;
    let mut w = Writer(Vec::with_capacity(payload.encoded_len()));
    let kind = match payload {
        Payload::Dense(_) => KIND_DENSE,
        Payload::Sparse(_) => KIND_SPARSE,
        Payload::Quantized(_) => KIND_QUANTIZED,
        Payload::SparseQuantized(_) => KIND_SPARSE_QUANTIZED,
    };
    w.0.extend_from_slice(&MAGIC);
    w.0.push(VERSION);
    w.0.push(kind);
    // Checked above: dim ≤ MAX_DIM < 2^32.
    w.u32(payload.dim() as u32);
    match payload {
        Payload::Dense(v) => v.iter().for_each(|&x| w.f32(x)),
        Payload::Sparse(s) => {
            w.u32(s.nnz() as u32);
            w.indices(&s.indices);
            s.values.iter().for_each(|&x| w.f32(x));
        }
        Payload::Quantized(q) => {
            w.u32(q.chunk as u32);
            w.scales(q);
            w.0.extend_from_slice(&q.codes);
        }
        Payload::SparseQuantized(s) => {
            w.u32(s.indices.len() as u32);
            w.u32(s.values.chunk as u32);
            w.indices(&s.indices);
            w.scales(&s.values);
            w.0.extend_from_slice(&s.values.codes);
        }
    }
    Ok(w.0)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::malformed(format!(
                "truncated: needed {n} more bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn f32(&mut self) -> Result<f32> {
        let b = self.take(4)?;
        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if !v.is_finite() {
            return Err(Error::malformed(format!(
                "non-finite number at offset {}",
                self.pos - 4
            )));
        }
        Ok(v)
    }

    /// A minimal LEB128 varint of at most 32 bits.
    fn varint(&mut self) -> Result<u32> {
        let start = self.pos;
        let mut value: u64 = 0;
        for shift in (0..35).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if byte == 0 && shift > 0 {
                    return Err(Error::malformed(format!(
                        "non-minimal varint at offset {start}"
                    )));
                }
                return u32::try_from(value).map_err(|_| {
                    Error::malformed(format!("varint over 32 bits at offset {start}"))
                });
            }
        }
        Err(Error::malformed(format!(
            "varint too long at offset {start}"
        )))
    }

    /// `count` strictly increasing indices below `dim`.
    fn indices(&mut self, count: usize, dim: usize) -> Result<Vec<u32>> {
        // Each index takes at least one byte: refuse before allocating.
        if count > self.remaining() {
            return Err(Error::malformed(format!(
                "{count} indices cannot fit in {} bytes",
                self.remaining()
            )));
        }
        let mut out = Vec::with_capacity(count);
        let mut next: u64 = 0;
        for _ in 0..count {
            let idx = next + u64::from(self.varint()?);
            if idx >= dim as u64 {
                return Err(Error::malformed(format!(
                    "index {idx} out of range for dimension {dim}"
                )));
            }
            // idx < dim ≤ MAX_DIM < 2^32.
            out.push(idx as u32);
            next = idx + 1;
        }
        Ok(out)
    }

    fn f32s(&mut self, count: usize) -> Result<Vec<f32>> {
        self.need(count, 4)?;
        (0..count).map(|_| self.f32()).collect()
    }

    fn need(&self, count: usize, width: usize) -> Result<()> {
        let bytes = count.saturating_mul(width);
        if bytes > self.remaining() {
            return Err(Error::malformed(format!(
                "truncated: {count} items need {bytes} bytes, {} left",
                self.remaining()
            )));
        }
        Ok(())
    }

    fn quantized(&mut self, len: usize, chunk: u32) -> Result<Quantized> {
        let chunk = chunk as usize;
        if chunk == 0 {
            return Err(Error::malformed("quantization chunk of 0"));
        }
        let n_chunks = Quantized::chunks_for(len, chunk);
        self.need(n_chunks, 8)?;
        let mut mins = Vec::with_capacity(n_chunks);
        let mut scales = Vec::with_capacity(n_chunks);
        for _ in 0..n_chunks {
            mins.push(self.f32()?);
            let scale = self.f32()?;
            if scale < 0.0 {
                return Err(Error::malformed("negative quantization scale"));
            }
            scales.push(scale);
        }
        let codes = self.take(len)?.to_vec();
        Ok(Quantized {
            chunk,
            mins,
            scales,
            codes,
        })
    }
}

/// Decodes a payload from untrusted bytes, for a model of `expected_dim`
/// parameters.
///
/// Refuses, with [`Error::TooLarge`], input longer than
/// [`max_encoded_len`]`(expected_dim)`, and with [`Error::Malformed`] a bad
/// header, a different dimension, truncation, trailing bytes, indices that
/// are out of range or not strictly increasing, non-minimal varints, a zero
/// chunk size, and non-finite or negative-scale numbers. The decoded values
/// are finite.
pub fn decode(bytes: &[u8], expected_dim: usize) -> Result<Payload> {
    check_dim(expected_dim)?;
    let limit = max_encoded_len(expected_dim);
    if bytes.len() > limit {
        return Err(Error::TooLarge {
            what: "payload",
            limit,
            found: bytes.len(),
        });
    }
    let mut r = Reader { bytes, pos: 0 };
    if r.take(2)? != MAGIC {
        return Err(Error::malformed("bad magic"));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(Error::malformed(format!(
            "unsupported format version {version}"
        )));
    }
    let kind = r.u8()?;
    let dim = r.u32()? as usize;
    if dim != expected_dim {
        return Err(Error::malformed(format!(
            "dimension {dim}, expected {expected_dim}"
        )));
    }
    let payload = match kind {
        KIND_DENSE => Payload::Dense(r.f32s(dim)?),
        KIND_SPARSE => {
            let nnz = r.u32()? as usize;
            if nnz > dim {
                return Err(Error::malformed(format!(
                    "{nnz} entries exceed dimension {dim}"
                )));
            }
            let indices = r.indices(nnz, dim)?;
            let values = r.f32s(nnz)?;
            Payload::Sparse(SparseUpdate {
                dim,
                indices,
                values,
            })
        }
        KIND_QUANTIZED => {
            let chunk = r.u32()?;
            Payload::Quantized(r.quantized(dim, chunk)?)
        }
        KIND_SPARSE_QUANTIZED => {
            let nnz = r.u32()? as usize;
            if nnz > dim {
                return Err(Error::malformed(format!(
                    "{nnz} entries exceed dimension {dim}"
                )));
            }
            let chunk = r.u32()?;
            let indices = r.indices(nnz, dim)?;
            let values = r.quantized(nnz, chunk)?;
            Payload::SparseQuantized(SparseQuantized {
                dim,
                indices,
                values,
            })
        }
        other => return Err(Error::malformed(format!("unknown payload kind {other}"))),
    };
    if r.remaining() != 0 {
        return Err(Error::malformed(format!(
            "{} trailing bytes",
            r.remaining()
        )));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, rng_from_seed};
    use rand::Rng;

    fn random_vec(dim: usize, seed: u8) -> Vec<f32> {
        let mut rng = rng_from_seed([seed; 32]);
        (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn top_k_picks_largest_magnitudes() {
        let v = [0.1, -5.0, 0.0, 3.0, -3.0, 0.2];
        let s = top_k(&v, 3).expect("top-k");
        // |−3| ties with |3|: the lower index wins.
        assert_eq!(s.indices(), &[1, 3, 4]);
        assert_eq!(s.values(), &[-5.0, 3.0, -3.0]);
        assert_eq!(s.to_dense(), vec![0.0, -5.0, 0.0, 3.0, -3.0, 0.0]);
        assert_eq!(top_k(&v, 100).expect("all").nnz(), 5, "zeros are not sent");
        assert_eq!(top_k(&v, 0).expect("none").nnz(), 0);
        assert!(top_k(&[1.0, f32::NAN], 1).is_err());
    }

    #[test]
    fn error_feedback_keeps_what_was_not_sent() {
        let mut ef = ErrorFeedback::new(4).expect("ef");
        let s = ef.compress(&[1.0, -4.0, 2.0, 0.5], 1).expect("c1");
        assert_eq!((s.indices(), s.values()), (&[1u32][..], &[-4.0f32][..]));
        assert_eq!(ef.residual(), &[1.0, 0.0, 2.0, 0.5]);
        let s = ef.compress(&[1.0, 0.0, 0.0, 0.0], 1).expect("c2");
        // Residual 2.0 at index 0 now ties with index 2; the lower wins.
        assert_eq!((s.indices(), s.values()), (&[0u32][..], &[2.0f32][..]));
        assert_eq!(ef.residual(), &[0.0, 0.0, 2.0, 0.5]);
        assert!(ef.compress(&[1.0], 1).is_err());
        assert!(ef.compress(&[f32::INFINITY, 0.0, 0.0, 0.0], 1).is_err());
        assert_eq!(
            ef.residual(),
            &[0.0, 0.0, 2.0, 0.5],
            "errors leave state alone"
        );
    }

    /// Σ sent = Σ true − residual exactly (up to rounding), and the residual
    /// stays bounded, so the average sent update converges to the average
    /// true update.
    #[test]
    fn error_feedback_converges() {
        let dim = 500;
        let steps = 400;
        for quantized in [false, true] {
            let mut ef = ErrorFeedback::new(dim).expect("ef");
            let mut true_sum = vec![0f64; dim];
            let mut sent_sum = vec![0f64; dim];
            let mut max_residual = 0f64;
            for step in 0..steps {
                let u = random_vec(dim, step as u8);
                for (t, &x) in true_sum.iter_mut().zip(&u) {
                    *t += f64::from(x);
                }
                let sent = if quantized {
                    ef.compress_quantized(&u, dim / 20, 64)
                        .expect("cq")
                        .to_sparse()
                } else {
                    ef.compress(&u, dim / 20).expect("c")
                };
                for (s, x) in sent_sum.iter_mut().zip(sent.to_dense()) {
                    *s += f64::from(x);
                }
                let r = crate::dp::l2_norm(ef.residual());
                max_residual = max_residual.max(r);
            }
            for i in 0..dim {
                let gap = true_sum[i] - sent_sum[i] - f64::from(ef.residual()[i]);
                assert!(gap.abs() < 1e-3, "bookkeeping off at {i}: {gap}");
            }
            let true_norm =
                crate::dp::l2_norm(&true_sum.iter().map(|&x| x as f32).collect::<Vec<_>>());
            let diff: f64 = true_sum
                .iter()
                .zip(&sent_sum)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt();
            // The residual does not grow with the number of steps, so the
            // relative gap between the sums shrinks like 1/steps.
            assert!(diff <= max_residual + 1e-6);
            assert!(diff / (steps as f64) < 0.1, "quantized={quantized}: {diff}");
            assert!(diff < true_norm, "quantized={quantized}");
        }
    }

    #[test]
    fn quantization_error_is_within_half_a_step() {
        let v = random_vec(3000, 1);
        for chunk in [1, 7, 256, 3000] {
            let q = quantize(&v, chunk).expect("q");
            let back = q.dequantize();
            for (orig, got) in v.chunks(chunk).zip(back.chunks(chunk)) {
                let min = orig.iter().copied().fold(f32::INFINITY, f32::min);
                let max = orig.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let half_step = (max - min) / 510.0;
                for (a, b) in orig.iter().zip(got) {
                    assert!((a - b).abs() <= half_step * 1.001 + 1e-7, "{a} vs {b}");
                }
            }
        }
        // A constant chunk round-trips exactly.
        assert_eq!(
            quantize(&[2.5; 10], 4).expect("q").dequantize(),
            vec![2.5; 10]
        );
        assert!(quantize(&v, 0).is_err());
        // Extreme ranges do not overflow.
        let wide = [f32::MAX, -f32::MAX, 0.0];
        let back = quantize(&wide, 3).expect("q").dequantize();
        assert!(back.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_seeded() {
        let mut rng = rng_from_seed([2; 32]);
        let mut total = 0.0f64;
        let n = 4000;
        for _ in 0..n {
            // Chunk of [0, 1, 0.3]: step 1/255, and 0.3 lies between codes.
            let q = quantize_stochastic(&[0.0, 1.0, 0.3], 3, &mut rng).expect("q");
            total += f64::from(q.dequantize()[2]);
        }
        assert!(
            (total / f64::from(n) - 0.3).abs() < 1e-3,
            "{}",
            total / f64::from(n)
        );
        let a =
            quantize_stochastic(&random_vec(100, 3), 10, &mut rng_from_seed([4; 32])).expect("q");
        let b =
            quantize_stochastic(&random_vec(100, 3), 10, &mut rng_from_seed([4; 32])).expect("q");
        assert_eq!(a, b);
    }

    fn sample_payloads() -> Vec<Payload> {
        let v = random_vec(1000, 5);
        let mut ef = ErrorFeedback::new(1000).expect("ef");
        vec![
            Payload::Dense(v.clone()),
            Payload::Dense(vec![]),
            Payload::Sparse(top_k(&v, 17).expect("tk")),
            Payload::Sparse(
                SparseUpdate::new(1000, vec![0, 129, 999], vec![1.0, 2.0, 3.0]).expect("s"),
            ),
            Payload::Sparse(top_k(&v, 0).expect("tk")),
            Payload::SparseQuantized(
                quantize_sparse(&top_k(&v, 100).expect("tk"), 32).expect("qs"),
            ),
            Payload::Quantized(quantize(&v, 64).expect("q")),
            Payload::Quantized(quantize(&v, 1).expect("q")),
            Payload::SparseQuantized(ef.compress_quantized(&v, 50, 16).expect("sq")),
            Payload::SparseQuantized(ef.compress_quantized(&v, 1000, 1).expect("sq")),
        ]
    }

    #[test]
    fn encode_decode_round_trip_with_exact_lengths() {
        for p in sample_payloads() {
            let bytes = encode(&p).expect("encode");
            assert_eq!(bytes.len(), p.encoded_len(), "{p:?}");
            assert!(bytes.len() <= max_encoded_len(p.dim()));
            let back = decode(&bytes, p.dim()).expect("decode");
            assert_eq!(back, p);
        }
        assert_eq!(
            encode(&Payload::Dense(vec![0.0; 10]))
                .expect("encode")
                .len(),
            dense_encoded_len(10)
        );
    }

    /// One small payload of each kind with its exact encoding, written down
    /// once: any change to the wire format (header, field order, varint
    /// scheme, byte order) fails here, and the old bytes must still decode to
    /// the same payload. The values are exact in `f32`, so the bytes can be
    /// checked by hand against the table in the module docs.
    #[test]
    fn wire_format_golden_bytes() {
        let golden: [(Payload, &str); 4] = [
            (
                Payload::Dense(vec![1.0, -2.5, 0.0]),
                concat!(
                    "4f41", "01", "00", "03000000", // "OA", v1, dense, dim 3
                    "0000803f", "000020c0", "00000000", // 1.0, -2.5, 0.0
                ),
            ),
            (
                Payload::Sparse(SparseUpdate {
                    dim: 300,
                    indices: vec![2, 200],
                    values: vec![0.5, -1.0],
                }),
                concat!(
                    "4f41", "01", "01", "2c010000", // "OA", v1, sparse, dim 300
                    "02000000", // nnz 2
                    "02", "c501", // index 2, then gap 200 - 2 - 1 = 197
                    "0000003f", "000080bf", // 0.5, -1.0
                ),
            ),
            (
                Payload::Quantized(Quantized {
                    chunk: 2,
                    mins: vec![-1.0, 0.0],
                    scales: vec![0.5, 0.25],
                    codes: vec![0, 4, 255],
                }),
                concat!(
                    "4f41", "01", "02", "03000000", // "OA", v1, quantized, dim 3
                    "02000000", // chunk 2
                    "000080bf", "0000003f", // chunk 0: min -1.0, scale 0.5
                    "00000000", "0000803e", // chunk 1: min 0.0, scale 0.25
                    "0004ff",   // codes 0, 4, 255
                ),
            ),
            (
                Payload::SparseQuantized(SparseQuantized {
                    dim: 1000,
                    indices: vec![0, 129, 999],
                    values: Quantized {
                        chunk: 2,
                        mins: vec![1.0, -3.0],
                        scales: vec![0.125, 0.0],
                        codes: vec![8, 255, 0],
                    },
                }),
                concat!(
                    "4f41", "01", "03", "e8030000", // "OA", v1, sparse+quantized, dim 1000
                    "03000000", "02000000", // nnz 3, chunk 2
                    "00", "8001", "e506", // index 0, gaps 128 and 869
                    "0000803f", "0000003e", // chunk 0: min 1.0, scale 0.125
                    "000040c0", "00000000", // chunk 1: min -3.0, scale 0.0
                    "08ff00",   // codes 8, 255, 0
                ),
            ),
        ];
        for (payload, expected_hex) in golden {
            let expected = hex::decode(expected_hex).expect("golden hex");
            let bytes = encode(&payload).expect("encode");
            assert_eq!(hex::encode(&bytes), expected_hex, "{payload:?}");
            assert_eq!(bytes.len(), payload.encoded_len(), "{payload:?}");
            let back = decode(&expected, payload.dim()).expect("golden bytes decode");
            assert_eq!(back, payload);
        }
    }

    #[test]
    fn top1_percent_8bit_is_over_10x_smaller() {
        let dim = 100_000;
        let v = random_vec(dim, 6);
        let mut ef = ErrorFeedback::new(dim).expect("ef");
        let sq = Payload::SparseQuantized(
            ef.compress_quantized(&v, dim / 100, DEFAULT_QUANT_CHUNK)
                .expect("sq"),
        );
        let dense = dense_encoded_len(dim);
        let small = encode(&sq).expect("encode").len();
        assert!(small * 10 < dense, "{small} vs {dense}");
        // 1000 entries: ~1.1 bytes of index and 1 byte of code each.
        assert!(small < 2_600, "{small}");
        let q8 = Payload::Quantized(quantize(&v, DEFAULT_QUANT_CHUNK).expect("q"));
        let ratio = dense as f64 / encode(&q8).expect("encode").len() as f64;
        assert!(ratio > 3.9, "8-bit alone is ~4x: {ratio}");
    }

    #[test]
    fn decode_refuses_hostile_input() {
        let sparse = Payload::Sparse(
            SparseUpdate::new(1000, vec![3, 200, 999], vec![1.0, 2.0, 3.0]).expect("s"),
        );
        let good = encode(&sparse).expect("encode");
        let bad = |bytes: &[u8], dim: usize| decode(bytes, dim).expect_err("must fail");

        assert_eq!(
            bad(&good, 999).kind(),
            ErrorKind::BadUpdate,
            "wrong dimension"
        );
        assert_eq!(bad(&[], 1000).kind(), ErrorKind::BadUpdate);
        for cut in 0..good.len() {
            assert_eq!(
                bad(&good[..cut], 1000).kind(),
                ErrorKind::BadUpdate,
                "cut {cut}"
            );
        }
        let mut extra = good.clone();
        extra.push(0);
        bad(&extra, 1000);
        let mut magic = good.clone();
        magic[0] = b'X';
        bad(&magic, 1000);
        let mut version = good.clone();
        version[2] = 9;
        bad(&version, 1000);
        let mut kind = good.clone();
        kind[3] = 7;
        bad(&kind, 1000);

        // Header 8 bytes, nnz at 8..12, indices from 12: 3, gap 196 (2
        // bytes), gap 798 (2 bytes).
        let mut out_of_range = good.clone();
        out_of_range[16] = 0x7f; // the last gap's high byte: index > 16000
        assert!(matches!(bad(&out_of_range, 1000), Error::Malformed { .. }));
        let mut huge_nnz = good.clone();
        huge_nnz[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        bad(&huge_nnz, 1000);
        let mut nnz_fits_dim = good.clone();
        nnz_fits_dim[8..12].copy_from_slice(&1000u32.to_le_bytes());
        bad(&nnz_fits_dim, 1000);

        // Non-minimal varint: index 3 written as 0x83 0x00.
        let mut overlong = good[..12].to_vec();
        overlong.extend_from_slice(&[0x83, 0x00]);
        overlong.extend_from_slice(&good[12 + 1..]);
        bad(&overlong, 1000);

        // A NaN value.
        let mut nan = good.clone();
        let n = nan.len();
        nan[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        bad(&nan, 1000);

        // Too large overall, before parsing anything.
        let big = vec![0u8; max_encoded_len(10) + 1];
        assert!(matches!(bad(&big, 10), Error::TooLarge { .. }));
        assert!(matches!(bad(&good, MAX_DIM + 1), Error::TooLarge { .. }));

        // Quantized payloads: zero chunk, negative scale.
        let q = encode(&Payload::Quantized(
            quantize(&[1.0, 2.0, 3.0], 2).expect("q"),
        ))
        .expect("encode");
        let mut zero_chunk = q.clone();
        zero_chunk[8..12].copy_from_slice(&0u32.to_le_bytes());
        bad(&zero_chunk, 3);
        let mut neg_scale = q.clone();
        neg_scale[16..20].copy_from_slice(&(-1.0f32).to_le_bytes());
        bad(&neg_scale, 3);
        assert!(decode(&q, 3).is_ok());
    }

    /// Random corruption of valid payloads must never panic, and anything
    /// that decodes must re-encode to the same bytes (one encoding per
    /// payload).
    #[test]
    fn decode_survives_random_corruption() {
        let mut rng = rng_from_seed([8; 32]);
        for p in sample_payloads() {
            let good = encode(&p).expect("encode");
            for _ in 0..300 {
                let mut b = good.clone();
                for _ in 0..rng.random_range(1..4) {
                    if b.is_empty() {
                        break;
                    }
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
                if rng.random_bool(0.2) {
                    let cut = rng.random_range(0..=b.len());
                    b.truncate(cut);
                }
                if let Ok(back) = decode(&b, p.dim()) {
                    assert_eq!(encode(&back).expect("encode"), b);
                    assert!(back.to_dense().iter().all(|x| x.is_finite()));
                }
            }
        }
    }

    #[test]
    fn sparse_update_validation() {
        assert!(SparseUpdate::new(10, vec![1, 1], vec![0.0, 0.0]).is_err());
        assert!(SparseUpdate::new(10, vec![2, 1], vec![0.0, 0.0]).is_err());
        assert!(SparseUpdate::new(10, vec![10], vec![0.0]).is_err());
        assert!(SparseUpdate::new(10, vec![1], vec![]).is_err());
        assert!(SparseUpdate::new(10, vec![1], vec![f32::NAN]).is_err());
        let s = SparseUpdate::new(3, vec![0, 2], vec![1.0, 2.0]).expect("ok");
        let mut d = vec![1.0; 3];
        s.add_to(&mut d).expect("add");
        assert_eq!(d, vec![2.0, 1.0, 3.0]);
        assert!(s.add_to(&mut [0.0; 2]).is_err());
    }
}
