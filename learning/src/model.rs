//! Model identity and lineage.
//!
//! A model is an [`ArchitectureDescriptor`] plus a flat `f32` parameter
//! vector in the descriptor's layer order. Its [`ModelId`] is the BLAKE3
//! hash of the descriptor's canonical encoding followed by the parameters as
//! little-endian `f32`, so two nodes holding the same model compute the same
//! id, and a model with the same weights but a different architecture gets a
//! different one. [`ModelVersion`] records where a model came from (job,
//! round, parent), which lets the ledger chain rounds together.
//!
//! Updates and models whose descriptor differs from the job's are refused
//! with [`Error::DescriptorMismatch`], naming both architectures.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::compress::MAX_DIM;
use crate::{Error, Result};

/// Longest model or layer name accepted.
pub const MAX_NAME_LEN: usize = 256;
/// Most layers a descriptor may list.
pub const MAX_LAYERS: usize = 4096;
/// Highest tensor rank accepted.
pub const MAX_RANK: usize = 8;

/// Domain tag opening the canonical descriptor encoding; the version lets
/// the encoding change without colliding with old ids.
const DESCRIPTOR_TAG: &[u8] = b"openagi/arch/v1";

/// Element type of the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DType {
    /// IEEE-754 single precision.
    F32,
}

impl DType {
    fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
        }
    }
}

/// One named parameter tensor and its shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerShape {
    /// Tensor name, e.g. `"fc1.weight"`; unique within a descriptor.
    pub name: String,
    /// Dimensions, outermost first; a rank-0 tensor is a scalar.
    pub shape: Vec<u64>,
}

impl LayerShape {
    /// A named tensor shape.
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<u64>>) -> Self {
        LayerShape {
            name: name.into(),
            shape: shape.into(),
        }
    }
}

/// What a flat parameter vector means: the model's name, its parameter
/// tensors in order, and the element type. The parameter count is derived
/// from the shapes (and checked against any count written in a spec).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "DescriptorSpec")]
pub struct ArchitectureDescriptor {
    name: String,
    layers: Vec<LayerShape>,
    dtype: DType,
    param_count: u64,
}

/// The unvalidated form of a descriptor as written in a spec; `param_count`
/// is optional there and, if given, must match the shapes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorSpec {
    name: String,
    layers: Vec<LayerShape>,
    dtype: DType,
    #[serde(default)]
    param_count: Option<u64>,
}

impl TryFrom<DescriptorSpec> for ArchitectureDescriptor {
    type Error = Error;

    fn try_from(spec: DescriptorSpec) -> Result<Self> {
        let d = ArchitectureDescriptor::new(spec.name, spec.layers, spec.dtype)?;
        match spec.param_count {
            Some(n) if n != d.param_count => Err(Error::invalid(
                "parameter count",
                format!("spec says {n}, the shapes give {}", d.param_count),
            )),
            _ => Ok(d),
        }
    }
}

fn check_name(what: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            what,
            format!("{name:?} must be 1..={MAX_NAME_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

impl ArchitectureDescriptor {
    /// Builds a descriptor, checking names (non-empty, unique layer names),
    /// shapes (every dimension ≥ 1, rank ≤ [`MAX_RANK`]) and that the total
    /// parameter count is between 1 and [`MAX_DIM`].
    pub fn new(name: impl Into<String>, layers: Vec<LayerShape>, dtype: DType) -> Result<Self> {
        let name = name.into();
        check_name("model name", &name)?;
        if layers.is_empty() {
            return Err(Error::invalid("layers", "none given"));
        }
        if layers.len() > MAX_LAYERS {
            return Err(Error::TooLarge {
                what: "layer count",
                limit: MAX_LAYERS,
                found: layers.len(),
            });
        }
        let mut names = std::collections::HashSet::new();
        let mut total: u64 = 0;
        for layer in &layers {
            check_name("layer name", &layer.name)?;
            if !names.insert(layer.name.as_str()) {
                return Err(Error::invalid(
                    "layer name",
                    format!("{:?} appears twice", layer.name),
                ));
            }
            if layer.shape.len() > MAX_RANK {
                return Err(Error::invalid(
                    "layer shape",
                    format!("{} has rank {} > {MAX_RANK}", layer.name, layer.shape.len()),
                ));
            }
            let mut count: u64 = 1;
            for &d in &layer.shape {
                if d == 0 {
                    return Err(Error::invalid(
                        "layer shape",
                        format!("{} has a zero dimension", layer.name),
                    ));
                }
                count = count.saturating_mul(d);
            }
            total = total.saturating_add(count);
        }
        if total > MAX_DIM as u64 {
            return Err(Error::TooLarge {
                what: "parameter count",
                limit: MAX_DIM,
                found: usize::try_from(total).unwrap_or(usize::MAX),
            });
        }
        Ok(ArchitectureDescriptor {
            name,
            layers,
            dtype,
            param_count: total,
        })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The parameter tensors, in flat-vector order.
    pub fn layers(&self) -> &[LayerShape] {
        &self.layers
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Total number of parameters (≤ [`MAX_DIM`], so it fits a `usize`).
    pub fn param_count(&self) -> usize {
        self.param_count as usize
    }

    /// Each layer's name and its range in the flat parameter vector.
    pub fn layer_ranges(&self) -> Vec<(&str, Range<usize>)> {
        let mut start = 0usize;
        self.layers
            .iter()
            .map(|l| {
                // Bounded by the validated total, so no overflow.
                let len = l.shape.iter().product::<u64>() as usize;
                let r = start..start + len;
                start += len;
                (l.name.as_str(), r)
            })
            .collect()
    }

    /// The canonical byte encoding hashed into [`ModelId`]s: a versioned
    /// domain tag, then every field length-prefixed, little-endian:
    /// name, dtype code, layer count, per layer (name, rank, dims as `u64`),
    /// and the parameter count. Length prefixes make it self-delimiting, so
    /// appending the parameters cannot be ambiguous.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        fn put_str(out: &mut Vec<u8>, s: &str) {
            // Names are capped at MAX_NAME_LEN bytes.
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let mut out = Vec::with_capacity(64 + 32 * self.layers.len());
        out.extend_from_slice(&(DESCRIPTOR_TAG.len() as u32).to_le_bytes());
        out.extend_from_slice(DESCRIPTOR_TAG);
        put_str(&mut out, &self.name);
        out.push(self.dtype.code());
        out.extend_from_slice(&(self.layers.len() as u32).to_le_bytes());
        for l in &self.layers {
            put_str(&mut out, &l.name);
            out.push(l.shape.len() as u8);
            for &d in &l.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
        out.extend_from_slice(&self.param_count.to_le_bytes());
        out
    }

    /// BLAKE3 of [`canonical_bytes`](Self::canonical_bytes): a short way to
    /// compare architectures.
    pub fn fingerprint(&self) -> [u8; 32] {
        *blake3::hash(&self.canonical_bytes()).as_bytes()
    }

    /// A one-line human description for logs and errors, e.g.
    /// `"mnist-2nn (3 layers, 199210 f32 params, arch 1a2b3c4d)"`.
    pub fn summary(&self) -> String {
        let fp = self.fingerprint();
        format!(
            "{} ({} layers, {} {} params, arch {})",
            self.name,
            self.layers.len(),
            self.param_count,
            self.dtype.name(),
            hex::encode(&fp[..4])
        )
    }

    /// Refuses `found` unless it is exactly this architecture.
    pub fn ensure_matches(&self, found: &ArchitectureDescriptor) -> Result<()> {
        if self == found {
            Ok(())
        } else {
            Err(Error::DescriptorMismatch {
                expected: self.summary(),
                found: found.summary(),
            })
        }
    }

    /// Checks that `params` fits this architecture: the right length and
    /// only finite values.
    pub fn check_params(&self, params: &[f32]) -> Result<()> {
        if params.len() != self.param_count() {
            return Err(Error::LengthMismatch {
                client: None,
                expected: self.param_count(),
                found: params.len(),
            });
        }
        match params.iter().position(|v| !v.is_finite()) {
            Some(index) => Err(Error::NonFinite {
                client: None,
                index,
            }),
            None => Ok(()),
        }
    }
}

/// Content address of a model: BLAKE3(descriptor canonical bytes ‖
/// parameters as little-endian `f32`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelId(pub [u8; 32]);

impl ModelId {
    /// Hashes a model. Refuses parameters that do not fit the descriptor or
    /// are not finite (NaN payloads would make equal-looking models hash
    /// differently).
    pub fn compute(descriptor: &ArchitectureDescriptor, params: &[f32]) -> Result<ModelId> {
        descriptor.check_params(params)?;
        Ok(Self::hash(descriptor, params))
    }

    /// The hash itself, for parameters already checked against the
    /// descriptor.
    fn hash(descriptor: &ArchitectureDescriptor, params: &[f32]) -> ModelId {
        let mut h = blake3::Hasher::new();
        h.update(&descriptor.canonical_bytes());
        // Hash in blocks to avoid materialising a byte copy of the model.
        let mut buf = [0u8; 4096];
        for block in params.chunks(buf.len() / 4) {
            for (dst, v) in buf.chunks_exact_mut(4).zip(block) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
            h.update(&buf[..block.len() * 4]);
        }
        ModelId(*h.finalize().as_bytes())
    }

    /// Lowercase hex of all 32 bytes.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self> {
        let text = text.trim();
        let mut id = [0u8; 32];
        hex::decode_to_slice(text, &mut id)
            .map_err(|_| Error::invalid("model id", format!("{text:?} is not 64 hex digits")))?;
        Ok(ModelId(id))
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({})", self.to_hex())
    }
}

impl FromStr for ModelId {
    type Err = Error;

    /// Parses 64 hex digits.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || Error::invalid("model id", format!("{s:?} is not 64 hex digits"));
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(ModelId(out))
    }
}

/// A model's parameters as bytes: little-endian `f32`s in the flat
/// parameter order, the form models are stored in and sent in (their id is
/// over the same values, [`ModelId::compute`]).
pub fn params_to_bytes(params: &[f32]) -> Vec<u8> {
    params.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Reads [`params_to_bytes`]'s encoding; a length that is not whole `f32`
/// values is refused.
pub fn params_from_bytes(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::invalid(
            "model encoding",
            format!("{} bytes is not whole f32 values", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// A model: its architecture and parameters, checked to agree.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    descriptor: ArchitectureDescriptor,
    params: Vec<f32>,
}

impl Model {
    /// Pairs a descriptor with parameters, refusing a wrong length or
    /// non-finite values.
    pub fn new(descriptor: ArchitectureDescriptor, params: Vec<f32>) -> Result<Self> {
        descriptor.check_params(&params)?;
        Ok(Model { descriptor, params })
    }

    /// The architecture.
    pub fn descriptor(&self) -> &ArchitectureDescriptor {
        &self.descriptor
    }

    /// The flat parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Gives up the parameters.
    pub fn into_params(self) -> Vec<f32> {
        self.params
    }

    /// The parameters of one named layer.
    pub fn layer(&self, name: &str) -> Option<&[f32]> {
        self.descriptor
            .layer_ranges()
            .into_iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, r)| self.params.get(r))
    }

    /// The content address.
    pub fn id(&self) -> ModelId {
        // The constructor already checked the parameters.
        ModelId::hash(&self.descriptor, &self.params)
    }

    /// Refuses a model of another architecture (e.g. one offered as the
    /// base of this job's next round).
    pub fn ensure_compatible(&self, other: &Model) -> Result<()> {
        self.descriptor.ensure_matches(&other.descriptor)
    }
}

/// Where a model sits in a job's history.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelVersion {
    /// The model's content address.
    pub id: ModelId,
    /// The training job it belongs to.
    pub job: String,
    /// The round that produced it; 0 for the initial model.
    pub round: u64,
    /// The model this one was trained from; `None` for the initial model.
    pub parent: Option<ModelId>,
}

impl ModelVersion {
    /// The initial model of a job (round 0, no parent).
    pub fn genesis(job: impl Into<String>, id: ModelId) -> Self {
        ModelVersion {
            id,
            job: job.into(),
            round: 0,
            parent: None,
        }
    }

    /// The version produced by the next round from this one.
    pub fn child(&self, id: ModelId) -> Self {
        ModelVersion {
            id,
            job: self.job.clone(),
            round: self.round.saturating_add(1),
            parent: Some(self.id),
        }
    }

    /// Whether `self` directly follows `parent`: same job, next round, and
    /// `parent`'s id as its parent.
    pub fn follows(&self, parent: &ModelVersion) -> bool {
        self.job == parent.job
            && Some(parent.id) == self.parent
            && parent.round.checked_add(1) == Some(self.round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn mlp() -> ArchitectureDescriptor {
        ArchitectureDescriptor::new(
            "mnist-2nn",
            vec![
                LayerShape::new("fc1.weight", [200, 784]),
                LayerShape::new("fc1.bias", [200]),
                LayerShape::new("fc2.weight", [200, 200]),
                LayerShape::new("fc2.bias", [200]),
                LayerShape::new("out.weight", [10, 200]),
                LayerShape::new("out.bias", [10]),
            ],
            DType::F32,
        )
        .expect("descriptor")
    }

    fn tiny() -> ArchitectureDescriptor {
        ArchitectureDescriptor::new(
            "tiny",
            vec![LayerShape::new("w", [2, 2]), LayerShape::new("b", [2])],
            DType::F32,
        )
        .expect("descriptor")
    }

    #[test]
    fn param_count_and_ranges() {
        // The FedAvg paper's 2NN: 784·200 + 200 + 200·200 + 200 + 200·10 + 10.
        assert_eq!(mlp().param_count(), 199_210);
        let t = tiny();
        assert_eq!(t.layer_ranges(), vec![("w", 0..4), ("b", 4..6)]);
        let m = Model::new(t, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).expect("model");
        assert_eq!(m.layer("b"), Some(&[5.0, 6.0][..]));
        assert_eq!(m.layer("nope"), None);
        assert_eq!(
            m.id(),
            ModelId::compute(m.descriptor(), m.params()).expect("id")
        );
    }

    #[test]
    fn descriptor_validation() {
        let l = |n: &str, s: &[u64]| LayerShape::new(n, s.to_vec());
        assert!(ArchitectureDescriptor::new("", vec![l("a", &[1])], DType::F32).is_err());
        assert!(ArchitectureDescriptor::new("m", vec![], DType::F32).is_err());
        assert!(ArchitectureDescriptor::new("m", vec![l("a", &[0])], DType::F32).is_err());
        assert!(
            ArchitectureDescriptor::new("m", vec![l("a", &[1]), l("a", &[2])], DType::F32).is_err()
        );
        let e = ArchitectureDescriptor::new("m", vec![l("a", &[1 << 20, 1 << 20])], DType::F32)
            .expect_err("too big");
        assert!(matches!(e, Error::TooLarge { .. }));
        let e = ArchitectureDescriptor::new("m", vec![l("a", &[u64::MAX, u64::MAX])], DType::F32)
            .expect_err("overflow");
        assert!(matches!(e, Error::TooLarge { .. }));
        // A scalar is fine.
        assert_eq!(
            ArchitectureDescriptor::new("m", vec![l("s", &[])], DType::F32)
                .expect("scalar")
                .param_count(),
            1
        );
    }

    #[test]
    fn model_id_is_content_addressed() {
        let params = vec![0.5f32, -1.0, 2.0, 0.0, 3.25, 1e-3];
        let id = ModelId::compute(&tiny(), &params).expect("id");
        assert_eq!(id, ModelId::compute(&tiny(), &params).expect("again"));
        // Defined as BLAKE3(canonical descriptor || LE f32 params).
        let mut bytes = tiny().canonical_bytes();
        for p in &params {
            bytes.extend_from_slice(&p.to_le_bytes());
        }
        assert_eq!(id.0, *blake3::hash(&bytes).as_bytes());
        // Any parameter change, even the sign of zero, changes the id.
        let mut other = params.clone();
        other[3] = -0.0;
        assert_ne!(id, ModelId::compute(&tiny(), &other).expect("id"));
        // Same numbers under another architecture: another id.
        let reshaped = ArchitectureDescriptor::new(
            "tiny",
            vec![LayerShape::new("w", [4]), LayerShape::new("b", [2])],
            DType::F32,
        )
        .expect("d");
        assert_ne!(id, ModelId::compute(&reshaped, &params).expect("id"));
        // Hashing in blocks matches hashing at once, past a block boundary.
        let big =
            ArchitectureDescriptor::new("big", vec![LayerShape::new("w", [3001])], DType::F32)
                .expect("d");
        let p: Vec<f32> = (0..3001).map(|i| i as f32 * 0.25).collect();
        let mut bytes = big.canonical_bytes();
        p.iter()
            .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        assert_eq!(
            ModelId::compute(&big, &p).expect("id").0,
            *blake3::hash(&bytes).as_bytes()
        );

        assert!(ModelId::compute(&tiny(), &params[..5]).is_err());
        let mut nan = params.clone();
        nan[0] = f32::NAN;
        assert!(ModelId::compute(&tiny(), &nan).is_err());

        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ModelId>().expect("parse"), id);
        assert!("zz".parse::<ModelId>().is_err());
        assert!(text[..63].parse::<ModelId>().is_err());
        assert!(format!("{}é", &text[..62]).parse::<ModelId>().is_err());
    }

    /// The canonical encoding is pinned: changing it changes every model id
    /// in existing ledgers, so it must be a deliberate, versioned change.
    #[test]
    fn canonical_encoding_is_stable() {
        let d = ArchitectureDescriptor::new("m", vec![LayerShape::new("w", [2, 3])], DType::F32)
            .expect("d");
        let mut want = Vec::new();
        want.extend_from_slice(&15u32.to_le_bytes());
        want.extend_from_slice(b"openagi/arch/v1");
        want.extend_from_slice(&1u32.to_le_bytes());
        want.push(b'm');
        want.push(1);
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.push(b'w');
        want.push(2);
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(&6u64.to_le_bytes());
        assert_eq!(d.canonical_bytes(), want);
    }

    #[test]
    fn mismatched_descriptor_is_refused_naming_both() {
        let e = mlp().ensure_matches(&tiny()).expect_err("mismatch");
        assert_eq!(e.kind(), ErrorKind::Incompatible);
        let text = e.to_string();
        assert!(
            text.contains("mnist-2nn") && text.contains("tiny"),
            "{text}"
        );
        assert!(text.contains("199210"), "{text}");
        mlp().ensure_matches(&mlp()).expect("same");
        let a = Model::new(tiny(), vec![0.0; 6]).expect("m");
        let b = Model::new(mlp(), vec![0.0; 199_210]).expect("m");
        assert!(a.ensure_compatible(&b).is_err());
        assert!(Model::new(tiny(), vec![0.0; 7]).is_err());
    }

    #[test]
    fn descriptor_spec_parsing() {
        let text = r#"
            name = "tiny"
            dtype = "f32"
            param_count = 6
            layers = [ { name = "w", shape = [2, 2] }, { name = "b", shape = [2] } ]
        "#;
        let d: ArchitectureDescriptor = toml::from_str(text).expect("parse");
        assert_eq!(d, tiny());
        let wrong = text.replace("param_count = 6", "param_count = 7");
        assert!(toml::from_str::<ArchitectureDescriptor>(&wrong).is_err());
        let zero = text.replace("[2, 2]", "[2, 0]");
        assert!(toml::from_str::<ArchitectureDescriptor>(&zero).is_err());
        let json = serde_json::to_string(&d).expect("ser");
        assert_eq!(
            serde_json::from_str::<ArchitectureDescriptor>(&json).expect("de"),
            d
        );
    }

    #[test]
    fn lineage() {
        let d = tiny();
        let g = ModelVersion::genesis("job-1", ModelId::compute(&d, &[0.0; 6]).expect("id"));
        assert_eq!((g.round, g.parent), (0, None));
        let c = g.child(ModelId::compute(&d, &[1.0; 6]).expect("id"));
        assert_eq!(c.round, 1);
        assert_eq!(c.parent, Some(g.id));
        assert!(c.follows(&g));
        assert!(!g.follows(&c));
        let mut other_job = c.clone();
        other_job.job = "job-2".into();
        assert!(!other_job.follows(&g));
    }
}
